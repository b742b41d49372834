"""xo.freeze.Freezer backed by the datapath's BLOCK entries.

Why: freezing a flow is on the critical path of every handoff (block before TCP_REPAIR, thaw
once something owns the 4-tuple again). A map update costs microseconds where an nftables
transaction costs about half a millisecond (BENCHMARKS.md, section datapath). The block sits
at TC ingress, before the stack, so a frozen segment never reaches the socket being captured.
"""

from __future__ import annotations

from xo.datapath.datapath import Datapath
from xo.datapath.errors import DatapathError
from xo.flow import FlowKey
from xo.freeze import FreezeError


class BlockFreezer:
    """Freeze = BLOCK entry for the flow's inbound packets; thaw = drop it if still a BLOCK.

    The Datapath must be attached to the interface the flow's packets arrive on, in the
    namespace of the socket (xo.freeze.inbound_flow(sock) gives the flow: peer -> local).
    """

    def __init__(self, datapath: Datapath) -> None:
        self.datapath = datapath

    def freeze(self, flow: FlowKey) -> None:
        try:
            self.datapath.block(flow)
        except DatapathError as e:
            raise FreezeError(f"freeze {flow}: {e}") from e

    def thaw(self, flow: FlowKey) -> None:
        """Deliver again; a REDIRECT that replaced the block meanwhile stays in place."""
        try:
            self.datapath.unblock(flow)
        except DatapathError as e:
            raise FreezeError(f"thaw {flow}: {e}") from e
