"""The owner (frontend) half of an agent: offload a client socket, take it back at End.

Offload: block -> capture (socket stays in repair mode) -> Handoff -> redirect (eBPF, the
block entry is replaced in place, so this is also the unblock) -> queue the hardware rule ->
release the repair-mode socket (no FIN, no RST) -> Ready. Any failure before the target's
acceptance turns repair off and unblocks: the app keeps the very same socket, with a reason.

End: block (replacing the redirect) -> restore bound to the VIP -> unblock -> window probe ->
hand the socket to the app. A target that stops answering health checks loses its flows: the
redirects are removed so no rule outlives its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import grpc.aio

import xo.tcp
import xo.tls
from xo.agent import validate
from xo.agent.config import Peer
from xo.agent.context import Context, PhaseTimer, quiesce
from xo.agent.liveness import host_alive
from xo.agent.local import AppConn, expected_bytes
from xo.agent.machine import Event, Machine, State, StateError
from xo.agent.rpc import RpcFailed
from xo.agent.validate import ProtocolError
from xo.datapath import Action, DatapathError, Direction, Redirect
from xo.datapath.layout import format_mac
from xo.flow import Endpoint, FlowKey
from xo.freeze import inbound_flow
from xo.v1 import local_pb2, offload_pb2

log = logging.getLogger("xo.agent.owner")

MAC_LEN = 6
PEER_TIMEOUT_S = 1.0
READY_TIMEOUT_S = 1.0
HEALTH_INTERVAL_S = 1.0
# Consecutive failed health checks before a target's flows are declared lost.
HEALTH_FAILURES = 3
# ... unless its host still answers TCP (only the agent is away: a restart or an upgrade, the
# apps there keep serving): then a minute of checks, time for a slow restart (BCC compile).
RESTART_GRACE_CHECKS = 60
OLD_SOCKET_WAIT_S = 1.0
OLD_SOCKET_POLL_S = 0.001


class OffloadRefused(Exception):
    """The offload did not happen; the app keeps its socket. Carries a protocol Reason."""

    def __init__(self, reason: offload_pb2.Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class OwnedFlow:
    handoff_id: str
    flow: FlowKey
    peer: Peer
    target: Endpoint
    app: str  # the owner's app: it gets the connection back
    mac: str = ""  # the target's MAC, the redirect's destination
    machine: Machine = field(default_factory=Machine.owner)


@dataclass
class PeerView:
    info: offload_pb2.PeerInfo
    next_port: Iterator[int]


class Owner:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.flows: dict[str, OwnedFlow] = {}
        self.by_flow: dict[FlowKey, OwnedFlow] = {}
        self._peers: dict[str, PeerView] = {}
        self._prefix = f"{ctx.cfg.name}-{secrets.token_hex(3)}"
        self._ids = itertools.count(1)
        self._failures: dict[str, int] = {}

    # --- offload ---------------------------------------------------------------------------
    async def offload(self, conn: AppConn, req: local_pb2.OffloadRequest,
                      fd: int | None) -> local_pb2.OffloadResult:
        result = local_pb2.OffloadResult(request_id=req.request_id)
        if fd is None:
            result.reason, result.detail = offload_pb2.REFUSED, "no socket came with the request"
            return result
        sock = socket.socket(fileno=fd)
        try:
            result.handoff_id = await self._offload(sock, req, conn.app)
            result.accepted = True
        except OffloadRefused as e:
            result.reason, result.detail = e.reason, e.detail
            log.info("offload refused: %s", e.detail)
        finally:
            sock.close()  # our copy; after acceptance it was already released in repair mode
        return result

    async def _offload(self, sock: socket.socket, req: local_pb2.OffloadRequest,
                       app: str) -> str:
        cfg = self.ctx.cfg
        peer = cfg.peer(req.target)
        if peer is None:
            raise OffloadRefused(offload_pb2.REFUSED, f"unknown target {req.target!r}")
        try:
            validate.blob(req.preread, "preread")
            validate.blob(req.app_state, "app_state")
            key = inbound_flow(sock)
        except (OSError, ProtocolError, ValueError) as e:
            raise OffloadRefused(offload_pb2.REFUSED, f"not an offloadable socket: {e}") from None
        if key.vip.ip not in cfg.vips:
            raise OffloadRefused(offload_pb2.REFUSED, f"{key.vip} is not one of our VIPs")
        if key in self.by_flow:
            raise OffloadRefused(offload_pb2.REFUSED, f"flow {key} is already offloaded")
        target = await self._pick_target(peer, key.family)
        hid = f"{self._prefix}-{next(self._ids)}"
        rec = OwnedFlow(hid, key, peer, target, app)
        timer = PhaseTimer()
        self.by_flow[key] = rec
        try:
            await self._handoff(sock, rec, req, timer)
        except BaseException:
            self.by_flow.pop(key, None)
            raise
        self.flows[hid] = rec
        await self._ready(rec, timer)
        self.ctx.record("offload", hid, timer.phases)
        return hid

    async def _handoff(self, sock: socket.socket, rec: OwnedFlow,
                       req: local_pb2.OffloadRequest, timer: PhaseTimer) -> None:
        dp, m = self.ctx.dp, rec.machine
        try:
            await quiesce(self.ctx.tls, sock)
        except xo.tls.TlsError as e:  # nothing happened yet: the app keeps serving
            raise OffloadRefused(offload_pb2.REFUSED, f"tls: {e}") from None
        timer.mark("quiesce")
        try:
            dp.block(rec.flow)
        except DatapathError as e:  # e.g. the flow table is full: the app keeps serving
            raise OffloadRefused(offload_pb2.REFUSED, f"block failed: {e}") from None
        m.advance(Event.BLOCK)
        timer.mark("block")
        try:
            # TLS first: a refusal must come while the socket is still out of repair mode.
            tls = self.ctx.tls.capture(sock)
            state = xo.tcp.capture(sock)
        except xo.tls.TlsError as e:
            dp.unblock(rec.flow)
            m.advance(Event.FAILED)
            raise OffloadRefused(offload_pb2.REFUSED, f"tls: {e}") from None
        except (xo.tcp.TcpError, OSError) as e:
            dp.unblock(rec.flow)
            m.advance(Event.FAILED)
            raise OffloadRefused(offload_pb2.INTERNAL, f"capture failed: {e}") from None
        m.advance(Event.CAPTURE)
        timer.mark("capture")
        request = offload_pb2.HandoffRequest(
            handoff_id=rec.handoff_id, flow=rec.flow.to_proto(), tcp=state.to_proto(),
            preread=req.preread, app_state=req.app_state, app=req.app or rec.app,
            target=rec.target.to_proto(),
        )
        if tls is not None:
            request.tls.CopyFrom(tls)
        m.advance(Event.SEND)
        try:
            reply = await self._rpc_handoff(rec.peer, request)
            redirect = Redirect(rec.target, mac=format_mac(reply.target_mac))
            rec.mac = redirect.mac
        except OffloadRefused:
            self._keep_local(sock, rec)
            raise
        timer.mark("handoff_rpc")
        try:
            dp.redirect(rec.flow, redirect)
        except DatapathError as e:
            # The target holds a restored copy; without Ready it discards it silently.
            self._keep_local(sock, rec)
            raise OffloadRefused(offload_pb2.INTERNAL, f"redirect failed: {e}") from None
        timer.mark("redirect")
        self.ctx.rules.submit(rec.flow, redirect, expected_bytes(req))
        m.advance(Event.ACCEPTED)
        xo.tcp.release(sock)
        timer.mark("release")

    async def _rpc_handoff(self, peer: Peer,
                           request: offload_pb2.HandoffRequest) -> offload_pb2.HandoffReply:
        timeout = self.ctx.cfg.handoff_timeout_ms / 1000
        try:
            reply = await self.ctx.channels.handoff(peer, request, timeout)
        except RpcFailed as e:
            reason = (offload_pb2.TIMEOUT if e.code == grpc.StatusCode.DEADLINE_EXCEEDED
                      else offload_pb2.INTERNAL)
            self._peers.pop(peer.name, None)  # re-read its info next time
            raise OffloadRefused(reason, f"{peer.name}: {e}") from None
        if not reply.accepted:
            raise OffloadRefused(reply.reason or offload_pb2.REFUSED,
                                 f"{peer.name} refused: {reply.detail}")
        if len(reply.target_mac) != MAC_LEN:
            raise OffloadRefused(offload_pb2.INTERNAL, f"{peer.name} sent a bad target MAC")
        return reply

    def _keep_local(self, sock: socket.socket, rec: OwnedFlow) -> None:
        """The handoff failed: the same socket leaves repair mode and the flow is unblocked."""
        try:
            xo.tcp.resume(sock)
        finally:
            self.ctx.dp.unblock(rec.flow)
            rec.machine.advance(Event.FAILED)

    async def _ready(self, rec: OwnedFlow, timer: PhaseTimer) -> None:
        try:
            reply = await self.ctx.channels.ready(
                rec.peer, offload_pb2.ReadyRequest(handoff_id=rec.handoff_id), READY_TIMEOUT_S)
            ok = reply.ok
        except RpcFailed as e:
            ok = False
            log.warning("ready %s to %s failed: %s", rec.handoff_id, rec.peer.name, e.code.name)
        with contextlib.suppress(StateError):  # an End may already have arrived
            rec.machine.advance(Event.READY if ok else Event.FAILED)
        timer.mark("ready")

    async def _pick_target(self, peer: Peer, family: int) -> Endpoint:
        view = await self._peer_view(peer)
        addrs = [ipaddress.ip_address(a.addr) for a in view.info.handoff_addresses
                 if len(a.addr) == (4 if family == 4 else 16)]
        if not addrs:
            raise OffloadRefused(offload_pb2.UNSUPPORTED,
                                 f"{peer.name} has no IPv{family} handoff address")
        busy = {r.target for r in self.by_flow.values() if r.peer.name == peer.name}
        span = view.info.handoff_port_max - view.info.handoff_port_min + 1
        for _ in range(span):
            ep = Endpoint(addrs[0], next(view.next_port))
            if ep not in busy:
                return ep
        raise OffloadRefused(offload_pb2.REFUSED, f"every handoff port of {peer.name} is busy")

    async def _peer_view(self, peer: Peer) -> PeerView:
        view = self._peers.get(peer.name)
        if view is not None:
            return view
        try:
            info = await self.ctx.channels.stub(peer).Peer(offload_pb2.PeerInfoRequest(),
                                                            timeout=PEER_TIMEOUT_S,
                                                            wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            reason = (offload_pb2.TIMEOUT if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                      else offload_pb2.INTERNAL)
            raise OffloadRefused(reason, f"{peer.name} unreachable: {e.code().name}") from None
        lo, hi = info.handoff_port_min, info.handoff_port_max
        if not 0 < lo <= hi < 65536:
            raise OffloadRefused(offload_pb2.INTERNAL, f"{peer.name} advertises ports {lo}..{hi}")
        view = PeerView(info, itertools.cycle(range(lo, hi + 1)))
        self._peers[peer.name] = view
        return view

    # --- end -------------------------------------------------------------------------------
    async def end(self, peer: Peer, req: offload_pb2.EndRequest,
                  deadline_passed: Callable[[], bool] = lambda: False) -> offload_pb2.EndReply:
        hid, key = validate.end(req)
        rec = self.flows.get(hid) or self._adopted(key, hid)
        if rec is None or rec.flow != key:
            return offload_pb2.EndReply(ok=False, detail=f"no offloaded flow {hid} for {key}")
        if rec.peer.name != peer.name:
            return offload_pb2.EndReply(ok=False, detail=f"flow {hid} is not offloaded to you")
        try:
            rec.machine.advance(Event.END)
        except StateError as e:
            return offload_pb2.EndReply(ok=False, detail=str(e))
        timer = PhaseTimer()
        if not req.HasField("tcp"):
            self._forget(rec, Event.CLOSED)
            await self._deliver(rec, req, None)
            return offload_pb2.EndReply(ok=True)
        dp = self.ctx.dp
        mac = rec.mac
        dp.block(key)
        timer.mark("block")
        try:
            state = xo.tcp.TcpState.from_proto(req.tcp)
            sock = await self._restore_local(state, key.vip)
        except (xo.tcp.TcpError, OSError, ValueError) as e:
            self._keep_offloaded(rec, mac)
            return offload_pb2.EndReply(ok=False, detail=f"restore failed: {e}")
        try:
            if req.HasField("tls"):
                self.ctx.tls.install(sock, req.tls)
        except (xo.tls.TlsError, OSError, NotImplementedError, ValueError) as e:
            xo.tcp.release(sock)  # silently: the target resumes serving the connection
            self._keep_offloaded(rec, mac)
            return offload_pb2.EndReply(ok=False, detail=f"tls install failed: {e}")
        timer.mark("restore")
        if deadline_passed():
            # The target stopped waiting and resumes serving: our copy must vanish silently.
            xo.tcp.release(sock)
            self._keep_offloaded(rec, mac)
            return offload_pb2.EndReply(ok=False, detail="the target's deadline passed")
        dp.remove(key)
        self.ctx.rules.cancel(key)
        timer.mark("unblock")
        with contextlib.suppress(xo.tcp.TcpError):
            xo.tcp.nudge(sock)
        self._forget(rec, Event.RESTORED)
        await self._deliver(rec, req, sock)
        timer.mark("deliver")
        self.ctx.record("end", hid, timer.phases)
        return offload_pb2.EndReply(ok=True)

    async def _restore_local(self, state: xo.tcp.TcpState, vip: Endpoint) -> socket.socket:
        """Restore bound to the VIP. The app closes its copy of the old, released socket only
        after its OffloadResult; a fast target can give the flow back before that, while the
        old 4-tuple still exists (EADDRNOTAVAIL): wait for the app's close, briefly."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + OLD_SOCKET_WAIT_S
        while True:
            try:
                # No window probe yet: the redirect still points at the target, so the
                # client's answer would be lost; nudge() once the redirect is removed.
                return xo.tcp.restore(state, local=vip, probe=False)
            except xo.tcp.AddressInUseError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(OLD_SOCKET_POLL_S)

    def _keep_offloaded(self, rec: OwnedFlow, mac: str) -> None:
        """A failed End: the redirect goes back, the target keeps serving (it resumes)."""
        self.ctx.dp.redirect(rec.flow, Redirect(rec.target, mac=mac))
        rec.machine.state = State.OFFLOADED

    def _forget(self, rec: OwnedFlow, event: Event) -> None:
        rec.machine.advance(event)
        if event != Event.RESTORED:
            self.ctx.dp.remove(rec.flow)
            self.ctx.rules.cancel(rec.flow)
        self.flows.pop(rec.handoff_id, None)
        self.by_flow.pop(rec.flow, None)

    async def _deliver(self, rec: OwnedFlow, req: offload_pb2.EndRequest | None,
                       sock: socket.socket | None) -> None:
        """Send Returned (with the socket if there is one) to the app that owned the flow."""
        msg = local_pb2.LocalMessage(returned=local_pb2.Returned(
            handoff_id=rec.handoff_id, flow=rec.flow.to_proto(),
            reason=req.reason if req else offload_pb2.INTERNAL,
            preread=req.preread if req else b"", app_state=req.app_state if req else b""))
        # An app not connected right now (reconnecting after our restart) gets a few seconds.
        await self.ctx.local.deliver(rec.app, msg, sock)

    # --- restart and target failure --------------------------------------------------------
    def reconcile(self) -> list[OwnedFlow]:
        """Adopt REDIRECT entries left in the pinned maps by a previous run; drop BLOCKs.

        A BLOCK means we died mid-handoff before the target accepted: the app kept its socket
        (its offload call failed with the agent), so the block must go or the flow stays dark.
        """
        adopted = []
        for e in self.ctx.dp.flows():
            if e.direction != Direction.INGRESS or e.flow.vip.ip not in self.ctx.cfg.vips:
                continue
            if e.action == Action.BLOCK:
                self.ctx.dp.remove(e.flow, Direction.INGRESS)
                continue
            if e.action != Action.REDIRECT or e.target is None:
                continue
            peer = self._peer_for(e.target)
            if peer is None:
                log.warning("redirect of %s to %s: no configured peer, removed", e.flow, e.target)
                self.ctx.dp.remove(e.flow)
                continue
            rec = OwnedFlow("", e.flow, peer, e.target, "", e.dst_mac or "",
                            Machine(State.OFFLOADED))
            self.by_flow[e.flow] = rec
            adopted.append(rec)
        if adopted:
            log.info("reconciled %d offloaded flows from the pinned maps", len(adopted))
        return adopted

    def _peer_for(self, target: Endpoint) -> Peer | None:
        for p in self.ctx.cfg.peers:
            if Endpoint.parse(p.address).ip == target.ip:
                return p
        return None

    def _adopted(self, key: FlowKey, hid: str) -> OwnedFlow | None:
        rec = self.by_flow.get(key)
        if rec is None or rec.handoff_id:
            return None
        rec.handoff_id = hid
        self.flows[hid] = rec
        return rec

    async def health(self) -> None:
        """Forever: ask targets holding our flows for PeerInfo; lost targets lose their flows."""
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            busy = {r.peer.name: r.peer for r in self.by_flow.values()
                    if r.machine.state in (State.OFFLOADED, State.REDIRECTED)}
            for peer in busy.values():
                await self._check(peer)

    async def _check(self, peer: Peer) -> None:
        try:
            await self.ctx.channels.stub(peer).Peer(offload_pb2.PeerInfoRequest(),
                                                    timeout=PEER_TIMEOUT_S)
            failures = 0
        except grpc.aio.AioRpcError:
            failures = self._failures.get(peer.name, 0) + 1
        self._failures[peer.name] = failures
        if failures < HEALTH_FAILURES:
            return
        if failures < RESTART_GRACE_CHECKS and await host_alive(peer.address):
            if failures == HEALTH_FAILURES:
                log.warning("target %s: agent not answering, host up: keeping its flows",
                            peer.name)
            return
        lost = [r for r in self.by_flow.values()
                if r.peer.name == peer.name and r.machine.state in (State.OFFLOADED,
                                                                    State.REDIRECTED)]
        log.error("target %s failed %d health checks: dropping %d redirects", peer.name,
                  failures, len(lost))
        for rec in lost:
            self._forget(rec, Event.LOST)
            await self._deliver(rec, None, None)
        self._peers.pop(peer.name, None)
