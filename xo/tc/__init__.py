"""pyroute2 message plugins for the tc kinds pyroute2 0.9 lacks: flower, pedit, csum.

pyroute2 looks tc kinds up in two dicts (filters/qdiscs in `tcmsg.plugins`, actions in
`common_act.plugins`); without an entry it silently drops every argument of a flower
request. `register()` adds ours, the same way pyroute2 registers its own:

    from xo import tc
    tc.register()
    with IPRoute(ext_ack=True) as ipr:
        ipr.tc("add-filter", "flower", idx, parent=tc.INGRESS, protocol=ETH_P_IP, prio=10,
               ip_proto="tcp", dst_ip="198.18.0.100", dst_port=80, skip_hw=True,
               action=[{"kind": "pedit", "keys": [("tcp", "dport", 61000)], "action": "pipe"},
                       {"kind": "csum", "update": ["iph", "tcp"], "action": "pipe"},
                       {"kind": "mirred", "direction": "egress", "action": "redirect",
                        "ifindex": out}])

Attribute order follows iproute2's `tc`, so requests are byte-identical to its own
(tests/unit/test_tc_*.py check that against recorded bytes).
"""

from __future__ import annotations

from pyroute2.netlink.rtnl.tcmsg import common_act
from pyroute2.netlink.rtnl.tcmsg import plugins as tc_plugins

from xo.tc.errors import TcError

from . import csum, flower, pedit

# clsact hook points (TC_H_CLSACT | TC_H_MIN_INGRESS / TC_H_MIN_EGRESS)
INGRESS = 0xFFFFFFF2
EGRESS = 0xFFFFFFF3

__all__ = ["EGRESS", "INGRESS", "TcError", "csum", "flower", "pedit", "register"]


def register() -> None:
    """Make pyroute2 encode and decode flower filters and pedit/csum actions (idempotent)."""
    tc_plugins["flower"] = flower
    common_act.plugins["pedit"] = pedit
    common_act.plugins["csum"] = csum
