"""The hardware tier: a flow's eBPF REDIRECT/BLOCK as a TC flower rule, issued by a queue.

    from xo.hwrules import HwRuleQueue, NetlinkTransport, redirect_rule
    queue = HwRuleQueue(NetlinkTransport(netns))            # policy: transfers >= 2 MiB
    dp.redirect(flow, target)                                # eBPF first: serves the flow now
    queue.submit(redirect_rule(flow, target, dp.ifindex, dp.mac), size=object_size)
    ...
    queue.end(flow)       # cancelled if still queued; deleted after an in-flight add returns
    queue.close()

See docs/hwrules.md.
"""

from xo.hwrules.policy import DEFAULT_THRESHOLD, SizePolicy
from xo.hwrules.queue import FINAL as FINAL_STATES
from xo.hwrules.queue import HwRuleQueue, QueueClosed, RuleState, Ticket
from xo.hwrules.rules import FlowerRule, Placement, block_rule, redirect_rule, snat_rule
from xo.hwrules.transport import NetlinkTransport, RuleRejected, Transport

__all__ = [
    "DEFAULT_THRESHOLD",
    "FINAL_STATES",
    "FlowerRule",
    "HwRuleQueue",
    "NetlinkTransport",
    "Placement",
    "QueueClosed",
    "RuleRejected",
    "RuleState",
    "SizePolicy",
    "Ticket",
    "Transport",
    "block_rule",
    "redirect_rule",
    "snat_rule",
]
