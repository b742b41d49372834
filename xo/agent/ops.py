"""Operations hooks of the agent: metrics, flow ages, the status snapshot, the scrape endpoint.

Why one object: the daemon owns the protocol; this keeps everything an operator reads in one
place, plugged in through a handful of calls (record, count, status, start/stop) so the
protocol code stays free of monitoring concerns.
"""

from __future__ import annotations

import logging

from xo.agent.context import Context
from xo.agent.exporter import MetricsServer
from xo.agent.metrics import CountingHandler, Metrics
from xo.agent.owner import Owner
from xo.agent.service import OffloadService
from xo.agent.status import Ages, Sources, gauges, snapshot
from xo.agent.target import Target
from xo.v1 import local_pb2, offload_pb2

AGENT_LOGGER = "xo"
# Phase records that start a flow's life on this agent (Context.record kinds).
STARTS = ("offload", "handoff")


class Ops:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.ages = Ages()
        self._sources: Sources | None = None
        self._server: MetricsServer | None = None
        self._handler = CountingHandler(self.metrics)

    def record(self, kind: str, handoff_id: str, phases_us: dict[str, float]) -> None:
        """Context.record's observer: one finished handoff step."""
        self.metrics.observe(kind, phases_us)
        if kind in STARTS:
            self.ages.seen(handoff_id)

    async def start(self, sources: Sources, listen: str | None) -> None:
        self._sources = sources
        logging.getLogger(AGENT_LOGGER).addHandler(self._handler)
        if listen:
            self._server = MetricsServer(listen, self.scrape)
            await self._server.start()

    def _src(self) -> Sources:
        if self._sources is None:
            raise RuntimeError("the agent has not started")
        return self._sources

    async def status(self, probe: bool = True) -> local_pb2.StatusReply:
        src = self._src()
        # The owner's health loop keeps the consecutive failures per target.
        failures = dict(src.owner._failures)
        return await snapshot(src, failures, self.metrics.refusals(), probe)

    async def scrape(self) -> str:
        return self.metrics.render(gauges(await self.status(probe=False)))

    async def stop(self) -> None:
        logging.getLogger(AGENT_LOGGER).removeHandler(self._handler)
        if self._server is not None:
            await self._server.close()
            self._server = None


class CountingService(OffloadService):
    """The gRPC service, counting the results of the calls a peer makes on us."""

    def __init__(self, ops: Ops, ctx: Context, owner: Owner, target: Target) -> None:
        super().__init__(ctx, owner, target)
        self._ops = ops

    def handed_off(self, reply: offload_pb2.HandoffReply) -> None:
        self._ops.metrics.handoff(reply)

    def ended(self, reply: offload_pb2.EndReply) -> None:
        self._ops.metrics.end(reply)
