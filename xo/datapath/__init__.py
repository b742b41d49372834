"""The eBPF datapath: a TC flow table that blocks, redirects or source-rewrites TCP flows.

    dp = Datapath.attach("eth0", netns="xo3f9a1c-f0")
    dp.block(flow)                                    # freeze the client's packets
    dp.redirect(flow, Redirect(Endpoint(b_ip, hport), mac=b_mac))
    dp.snat(FlowKey(client, Endpoint(b_ip, hport)), vip)   # on the backend
    dp.stats(flow), dp.flows(), dp.counters()
    dp.remove(flow); dp.detach()

See docs/datapath.md for the map layout, the key semantics and the measured costs.
"""

from xo.datapath.datapath import Datapath, FlowEntry, FlowStats
from xo.datapath.errors import (
    DatapathError,
    DatapathPermissionError,
    FlowTableFull,
    InterfaceNotFound,
    UnknownFlow,
)
from xo.datapath.freezer import BlockFreezer
from xo.datapath.layout import Action, Direction, Redirect

__all__ = [
    "Action",
    "BlockFreezer",
    "Datapath",
    "DatapathError",
    "DatapathPermissionError",
    "Direction",
    "FlowEntry",
    "FlowStats",
    "FlowTableFull",
    "InterfaceNotFound",
    "Redirect",
    "UnknownFlow",
]
