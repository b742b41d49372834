"""The agent's hardware tier: its RuleQueue seam backed by xo.hwrules.HwRuleQueue.

The owner submits a flow's flower rule right after the eBPF redirect is in (the eBPF entry
serves the flow from that moment and stays authoritative); the queue's worker thread issues it
off the event loop. When the flow ends the rule is cancelled while still queued, or deleted
once an in-flight add returns. Where the kernel or NIC takes no flower rules the queue says so
once and every rule fails without a syscall: flows keep working on eBPF, failures are counted.

Which flows get a rule is the SizePolicy's call, from the transfer size the app announced with
its offload (hw_rules_min_bytes, hw_rules_unknown_size in the config): a flow it skips shows
`skipped` as its hardware state in `xo status` until it ends.
"""

from __future__ import annotations

import contextlib
import logging

from xo.datapath import Datapath, Redirect
from xo.flow import FlowKey
from xo.hwrules import (
    HwRuleQueue,
    NetlinkTransport,
    QueueClosed,
    RuleState,
    SizePolicy,
    redirect_rule,
)

log = logging.getLogger("xo.agent.hwrules")
CLOSE_TIMEOUT_S = 2.0


class HwRules:
    """RuleQueue (xo.agent.context) + the per-flow states `xo status` shows (RuleStates)."""

    def __init__(self, dp: Datapath, policy: SizePolicy, netns: str | None = None) -> None:
        self._dp = dp
        # The agent process already lives in its namespace (threads inherit it): netns=None.
        self.queue = HwRuleQueue(NetlinkTransport(netns), policy)

    def submit(self, flow: FlowKey, redirect: Redirect, size: int | None = None) -> None:
        """Queue the flower twin of `redirect` if the policy wants one for a transfer of
        `size` bytes (None: unknown). Never blocks: the worker issues it."""
        try:
            ticket = self.queue.submit(
                redirect_rule(flow, redirect, self._dp.ifindex, self._dp.mac), size=size)
        except (ValueError, TypeError, QueueClosed) as e:
            # The flow is redirected by eBPF already; a missing hardware rule costs nothing else.
            log.warning("no hardware rule for %s: %s", flow, e)
            return
        if ticket.state is RuleState.SKIPPED:
            log.debug("no hardware rule for %s by policy: %s", flow, ticket.reason)

    def cancel(self, flow: FlowKey) -> None:
        """The flow ended: cancel its queued rule, or have the worker delete an issued one
        (the queue drops the ticket once final)."""
        with contextlib.suppress(KeyError):  # no ticket, e.g. a flow adopted after a restart
            self.queue.end(flow)

    def state(self, flow: FlowKey) -> RuleState | None:
        return self.queue.state(flow)

    def depth(self) -> int:
        counts = self.queue.counts
        done = sum(counts[s] for s in ("in_hw", "in_sw", "failed", "cancelled"))
        return max(counts["queued"] - done, 0)

    def close(self) -> None:
        """Stop the worker (queued rules cancelled, issued ones deleted); log what happened."""
        self.queue.close(timeout=CLOSE_TIMEOUT_S)
        counts = dict(sorted(self.queue.counts.items()))
        log.info("hardware rule queue closed: %s%s", counts,
                 f" (unsupported: {self.queue.unsupported_reason})"
                 if self.queue.unsupported_reason else "")
