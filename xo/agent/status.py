"""A snapshot of one agent: its flows joined with the datapath's entries, peers, apps, counters.

Why a join: the records (owner/target state machines) say what the agent believes, the
pinned eBPF map says what the NIC does. `xo status` and the metrics endpoint show both side by
side, and map entries no record claims (e.g. source rewrites kept across a restart) appear as
role "rule" instead of being hidden.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import grpc
import grpc.aio

from xo.agent.context import Context
from xo.agent.metrics import Family
from xo.agent.owner import Owner
from xo.agent.target import Target
from xo.datapath import Action, Direction, FlowEntry
from xo.flow import FlowKey
from xo.v1 import local_pb2, offload_pb2

PROBE_TIMEOUT_S = 0.5
MS_PER_S = 1000
NONE = "none"


@runtime_checkable
class RuleStates(Protocol):
    """A hardware rule queue that can report per-flow states and its backlog."""

    def state(self, flow: FlowKey) -> enum.Enum | None: ...

    def depth(self) -> int: ...


class Ages:
    """When this agent took each flow (by handoff id); adopted flows date from the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._since: dict[str, float] = {}

    def seen(self, handoff_id: str) -> None:
        self._since.setdefault(handoff_id, time.monotonic())

    def age(self, handoff_id: str) -> float:
        return time.monotonic() - self._since.get(handoff_id, self.started)

    def keep(self, handoff_ids: Iterable[str]) -> None:
        """Forget flows that are gone (called at each snapshot, so the table stays small)."""
        live = set(handoff_ids)
        for hid in [h for h in self._since if h not in live]:
            del self._since[hid]


@dataclass
class Sources:
    """Everything a snapshot reads; the daemon fills it once at start."""

    ctx: Context
    owner: Owner
    target: Target
    ages: Ages
    reattached: bool


def _rule(entry: FlowEntry | None) -> str:
    return entry.action.name.lower() if entry else NONE


def _hw(ctx: Context, flow: FlowKey) -> str:
    if not isinstance(ctx.rules, RuleStates):
        return NONE
    state = ctx.rules.state(flow)
    return str(state.value) if state is not None else NONE


def _flows(src: Sources) -> list[local_pb2.FlowStatus]:
    ctx = src.ctx
    entries = {(e.flow, e.direction): e for e in ctx.dp.flows()}
    out = []
    for rec in list(src.owner.by_flow.values()):
        e = entries.pop((rec.flow, Direction.INGRESS), None)
        entries.pop((rec.flow, Direction.EGRESS), None)
        out.append(local_pb2.FlowStatus(
            role="owner", handoff_id=rec.handoff_id, flow=rec.flow.to_proto(),
            target=rec.target.to_proto(), peer=rec.peer.name, app=rec.app,
            state=rec.machine.state.value, ebpf_rule=_rule(e), hw_rule=_hw(ctx, rec.flow),
            age_s=src.ages.age(rec.handoff_id), packets=e.packets if e else 0,
            bytes=e.bytes if e else 0))
    for hosted in list(src.target.flows.values()):
        e = entries.pop((hosted.local, Direction.EGRESS), None)
        entries.pop((hosted.local, Direction.INGRESS), None)
        out.append(local_pb2.FlowStatus(
            role="target", handoff_id=hosted.handoff_id, flow=hosted.flow.to_proto(),
            target=hosted.local.vip.to_proto(), peer=hosted.owner.name, app=hosted.app,
            state=hosted.machine.state.value, ebpf_rule=_rule(e), hw_rule=NONE,
            age_s=src.ages.age(hosted.handoff_id), packets=e.packets if e else 0,
            bytes=e.bytes if e else 0))
    for e in entries.values():
        out.append(_unclaimed(src, e))
    src.ages.keep(f.handoff_id for f in out if f.handoff_id)
    return out


def _unclaimed(src: Sources, e: FlowEntry) -> local_pb2.FlowStatus:
    """A map entry without a record. A source rewrite is keyed by the backend's own tuple:
    report it under the client -> VIP name the owner uses."""
    st = local_pb2.FlowStatus(role="rule", state="unknown", ebpf_rule=_rule(e), hw_rule=NONE,
                              age_s=src.ages.age(""), packets=e.packets, bytes=e.bytes)
    if e.action == Action.SNAT and e.target is not None:
        st.flow.CopyFrom(FlowKey(e.flow.client, e.target).to_proto())
        st.target.CopyFrom(e.flow.vip.to_proto())
    else:
        st.flow.CopyFrom(e.flow.to_proto())
        if e.target is not None:
            st.target.CopyFrom(e.target.to_proto())
    return st


async def _probe(ctx: Context, peer_name: str) -> tuple[float, str]:
    """PeerInfo round trip in ms, or (0, reason)."""
    peer = ctx.cfg.peer(peer_name)
    if peer is None:
        return 0.0, "not configured"
    t0 = time.perf_counter()
    try:
        await ctx.channels.stub(peer).Peer(offload_pb2.PeerInfoRequest(),
                                           timeout=PROBE_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        return 0.0, f"{e.code().name}: {e.details()}"
    return (time.perf_counter() - t0) * MS_PER_S, ""


async def snapshot(src: Sources, failures: dict[str, int], refusals: dict[str, int],
                   probe: bool) -> local_pb2.StatusReply:
    """The agent's state now. `failures`: consecutive failed health checks per peer (the
    owner's health loop); `probe`: also call each peer once (what `xo status` does)."""
    ctx = src.ctx
    flows = _flows(src)
    per_peer = Counter(f.peer for f in flows if f.peer)
    names = [p.name for p in ctx.cfg.peers]
    probes = (await asyncio.gather(*(_probe(ctx, n) for n in names)) if probe
              else [(0.0, "")] * len(names))
    peers = []
    for p, (rtt, detail) in zip(ctx.cfg.peers, probes, strict=True):
        failed = failures.get(p.name, 0)
        peers.append(local_pb2.PeerStatus(
            name=p.name, address=p.address, healthy=failed == 0 and not detail,
            failed_checks=failed, flows=per_peer[p.name], rtt_ms=rtt, detail=detail))
    reply = local_pb2.StatusReply(
        agent=ctx.cfg.name, interface=ctx.cfg.interface,
        uptime_s=time.monotonic() - src.ages.started, reattached=src.reattached,
        flows=flows, peers=peers,
        hw_queue_depth=ctx.rules.depth() if isinstance(ctx.rules, RuleStates) else 0)
    reply.refusals.update(refusals)
    reply.datapath.update(ctx.dp.counters())
    reply.apps.update(Counter(c.app for c in ctx.local.conns if c.app))
    return reply


def gauges(st: local_pb2.StatusReply) -> list[Family]:
    """The scrape-time metric families of a snapshot."""
    up = Family("xo_agent_uptime_seconds", "Seconds since this agent process started", "gauge")
    up.samples[()] = st.uptime_s
    reatt = Family("xo_datapath_reattached",
                   "1 if the datapath reused pinned maps at start (a restart)", "gauge")
    reatt.samples[()] = int(st.reattached)
    flows = Family("xo_flows", "Flows the agent holds, by role and handoff state", "gauge")
    rules = Family("xo_rules", "Datapath rules of the agent's flows, by tier and state", "gauge")
    for f in st.flows:
        k = (("role", f.role), ("state", f.state))
        flows.samples[k] = flows.samples.get(k, 0) + 1
        for tier, state in (("ebpf", f.ebpf_rule), ("hw", f.hw_rule)):
            if state != NONE:
                rk = (("tier", tier), ("state", state))
                rules.samples[rk] = rules.samples.get(rk, 0) + 1
    depth = Family("xo_hw_queue_depth", "Hardware rules queued or being issued", "gauge")
    depth.samples[()] = st.hw_queue_depth
    dp = Family("xo_datapath_packets_total",
                "Packets the TC programs handled, by verdict (errors: rewrite failures)",
                "counter")
    for verdict, n in st.datapath.items():
        dp.samples[(("verdict", verdict),)] = n
    peer_up = Family("xo_peer_healthy", "1 unless the peer failed its last health check",
                     "gauge")
    failed = Family("xo_peer_failed_checks", "Consecutive failed health checks of a peer",
                    "gauge")
    for p in st.peers:
        peer_up.samples[(("peer", p.name),)] = int(p.healthy)
        failed.samples[(("peer", p.name),)] = p.failed_checks
    apps = Family("xo_apps", "App connections on the local API, by app name", "gauge")
    for name, n in st.apps.items():
        apps.samples[(("app", name),)] = n
    return [up, reatt, flows, rules, depth, dp, peer_up, failed, apps]
