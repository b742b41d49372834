"""The target (backend) half of an agent: take a handed-in connection, give it back at End.

Handoff: check the target is one of our handoff addresses -> egress SNAT (before the restore:
anything the socket sends must leave as VIP:vport) -> restore bound to target address:port,
without a window probe -> install kTLS -> reply with our MAC. The socket reaches the app only
at Ready (the owner's redirect is in place), after a window probe (nudge) so an idle client
answers now;
a Ready that never comes means the owner kept the flow: the copy is dropped silently.

Give back: ESTABLISHED -> block, capture, End(DONE); the client closed (CLOSE_WAIT) -> finish
the close through the still-installed rules, then End(CLIENT_CLOSED); reset -> End(CLIENT_RESET).
On an End the owner refuses or never answers, the app keeps the socket (repair off, unblock).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

import xo.tcp
import xo.tls
from xo import uapi
from xo.agent import validate
from xo.agent.config import Peer
from xo.agent.context import Context, PhaseTimer, open_tcp_tuples, quiesce, tcp_state_of
from xo.agent.local import AppConn, NoApp
from xo.agent.machine import Event, Machine, State, StateError
from xo.agent.rpc import RpcFailed
from xo.agent.validate import ProtocolError
from xo.datapath import Action, DatapathError, Direction
from xo.datapath.layout import parse_mac
from xo.flow import FlowKey
from xo.freeze import inbound_flow
from xo.v1 import local_pb2, offload_pb2

log = logging.getLogger("xo.agent.target")

# An owner that gave up before our reply shows as an expired gRPC deadline and is handled at
# once (abandon); this only catches an owner that died between our reply and its Ready.
READY_DEADLINE_S = 30.0
END_TIMEOUT_S = 5.0
# A client-closed End carries no state and is idempotent: retry it so the owner's redirect
# does not outlive the connection when one reply is lost.
CLOSED_END_ATTEMPTS = 3
# How long a client-closed connection may take to finish its close (our FIN, its ACK).
CLOSE_WAIT_S = 2.0
CLOSE_POLL_S = 0.0002
# How often the target looks for handed-in sockets their app closed without a give back.
SWEEP_INTERVAL_S = 1.0


@dataclass
class HostedFlow:
    handoff_id: str
    owner: Peer
    flow: FlowKey  # as the owner sees it: client -> VIP:vport
    local: FlowKey  # as we see it: client -> our handoff address:port
    app: str
    preread: bytes = field(repr=False)
    app_state: bytes = field(repr=False)
    sock: socket.socket | None = None
    machine: Machine = field(default_factory=Machine.target)
    expiry: asyncio.TimerHandle | None = None


def _refuse(reason: offload_pb2.Reason, detail: str) -> offload_pb2.HandoffReply:
    log.info("handoff refused: %s", detail)
    return offload_pb2.HandoffReply(accepted=False, reason=reason, detail=detail)


class Target:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.flows: dict[tuple[str, str], HostedFlow] = {}

    # --- handoff ---------------------------------------------------------------------------
    def handoff(self, peer: Peer, req: offload_pb2.HandoffRequest) -> offload_pb2.HandoffReply:
        timer = PhaseTimer()
        try:
            hid, key, target = validate.handoff(req)
        except ProtocolError as e:
            return _refuse(e.reason, e.detail)
        if not self.ctx.cfg.handoff.contains(target):
            return _refuse(offload_pb2.REFUSED, f"{target} is not one of our handoff addresses")
        app = req.app
        try:
            self.ctx.local.pick(app)
        except NoApp as e:
            return _refuse(offload_pb2.REFUSED, str(e))
        if (peer.name, hid) in self.flows:
            return _refuse(offload_pb2.REFUSED, f"handoff {hid} already taken")
        if req.HasField("tls") and not self.ctx.tls.supported:
            return _refuse(offload_pb2.UNSUPPORTED, "kTLS state but no kTLS on this host")
        try:
            state = xo.tcp.TcpState.from_proto(req.tcp)
        except (xo.tcp.TcpError, ValueError) as e:
            return _refuse(offload_pb2.REFUSED, f"bad tcp state: {e}")
        local = FlowKey(key.client, target)
        rec = HostedFlow(hid, peer, key, local, app, req.preread, req.app_state)
        dp = self.ctx.dp
        try:
            dp.snat(local, key.vip)
        except DatapathError as e:
            return _refuse(offload_pb2.INTERNAL, f"source rewrite failed: {e}")
        timer.mark("snat")
        try:
            # No window probe here: the owner's redirect is not in place yet, the client's
            # answer would be dropped (and it answers one per 500 ms). nudge() at Ready.
            sock = xo.tcp.restore(state, local=target, probe=False)
        except xo.tcp.AddressInUseError as e:
            dp.remove(local)
            return _refuse(offload_pb2.REFUSED, f"restore: {e}")
        except (xo.tcp.TcpError, OSError) as e:
            dp.remove(local)
            return _refuse(offload_pb2.INTERNAL, f"restore: {e}")
        if req.HasField("tls"):
            try:
                self.ctx.tls.install(sock, req.tls)
            except (xo.tls.TlsError, OSError, NotImplementedError, ValueError) as e:
                xo.tcp.release(sock)  # silently: the owner keeps the connection
                dp.remove(local)
                return _refuse(offload_pb2.UNSUPPORTED, f"tls install: {e}")
        timer.mark("restore")
        rec.sock = sock
        rec.machine.advance(Event.RESTORED)
        self.flows[(peer.name, hid)] = rec
        rec.expiry = asyncio.get_running_loop().call_later(
            READY_DEADLINE_S, self._expire, peer.name, hid)
        self.ctx.record("handoff", hid, timer.phases)
        return offload_pb2.HandoffReply(accepted=True, target_mac=parse_mac(dp.mac))

    def _expire(self, owner: str, hid: str) -> None:
        if (owner, hid) in self.flows:
            log.warning("no Ready for %s from %s: dropping the restored copy", hid, owner)
        self.abandon(owner, hid)

    def abandon(self, owner: str, hid: str) -> None:
        """The owner kept the flow (it gave up on our reply): drop our copy without a trace."""
        rec = self.flows.get((owner, hid))
        if rec is None or rec.machine.state != State.RESTORED:
            return
        if rec.expiry is not None:
            rec.expiry.cancel()
        rec.machine.advance(Event.EXPIRED)
        if rec.sock is not None:
            xo.tcp.release(rec.sock)
        self.ctx.dp.remove(rec.local)
        del self.flows[(owner, hid)]

    # --- ready -----------------------------------------------------------------------------
    async def ready(self, peer: Peer, req: offload_pb2.ReadyRequest) -> offload_pb2.ReadyReply:
        try:
            hid = validate.handoff_id(req.handoff_id)
        except ProtocolError as e:
            return offload_pb2.ReadyReply(ok=False, detail=e.detail)
        rec = self.flows.get((peer.name, hid))
        if rec is None or rec.sock is None:
            return offload_pb2.ReadyReply(ok=False, detail=f"no handoff {hid}")
        try:
            rec.machine.advance(Event.READY)
        except StateError as e:
            return offload_pb2.ReadyReply(ok=False, detail=str(e))
        if rec.expiry is not None:
            rec.expiry.cancel()
        sock, rec.sock = rec.sock, None
        with contextlib.suppress(xo.tcp.TcpError):
            xo.tcp.nudge(sock)
        msg = local_pb2.LocalMessage(handed_in=local_pb2.HandedIn(
            handoff_id=hid, flow=rec.flow.to_proto(), preread=rec.preread,
            app_state=rec.app_state))
        try:
            await self.ctx.local.pick(rec.app).send(msg, sock.fileno())
        except (NoApp, OSError) as e:
            # The app went away between Handoff and Ready: give the flow straight back.
            log.error("handoff %s: app %r gone (%s): returning the flow", hid, rec.app, e)
            await self._give_back(rec, sock, b"", b"")
            return offload_pb2.ReadyReply(ok=True, detail="returned at once: app gone")
        finally:
            sock.close()
        return offload_pb2.ReadyReply(ok=True)

    # --- give back -------------------------------------------------------------------------
    async def give_back(self, conn: AppConn, msg: local_pb2.GiveBack,
                        fd: int | None) -> local_pb2.GiveBackResult:
        result = local_pb2.GiveBackResult(handoff_id=msg.handoff_id)
        if fd is None:
            result.detail = "no socket came with the give back"
            return result
        sock = socket.socket(fileno=fd)
        try:
            rec = self._find(msg.handoff_id, sock) or self._adopt(conn.app, msg.handoff_id, sock)
            if rec is None:
                result.detail = f"no handed-in connection {msg.handoff_id!r} with this socket"
                return result
            try:
                validate.blob(msg.preread, "preread")
                validate.blob(msg.app_state, "app_state")
            except ProtocolError as e:
                result.detail = e.detail
                return result
            result.ok, result.detail = await self._give_back(rec, sock, msg.preread,
                                                             msg.app_state)
            return result
        finally:
            sock.close()

    def _find(self, hid: str, sock: socket.socket) -> HostedFlow | None:
        """The record of `hid`; a socket still connected must be that flow's socket (a reset
        one has no addresses left to compare)."""
        try:
            key: FlowKey | None = inbound_flow(sock)
        except (OSError, ValueError):
            key = None
        for (_, h), rec in self.flows.items():
            if h == hid and (key is None or rec.local == key):
                return rec
        return None

    def _adopt(self, app: str, hid: str, sock: socket.socket) -> HostedFlow | None:
        """A connection handed in before this agent restarted: its source rewrite is still in
        the pinned map, the record died with the old process. Rebuild it from the map (the
        client -> VIP name) and the handoff id, which the owner minted with its name as prefix
        (the owner checks id and flow again at End: a wrong guess is refused, not obeyed)."""
        try:
            hid = validate.handoff_id(hid)
            local = inbound_flow(sock)
        except (OSError, ValueError, ProtocolError):
            return None
        owner = max((p for p in self.ctx.cfg.peers if hid.startswith(f"{p.identity}-")),
                    key=lambda p: len(p.identity), default=None)
        if owner is None or (owner.name, hid) in self.flows:
            return None
        for e in self.ctx.dp.flows():
            if (e.direction == Direction.EGRESS and e.action == Action.SNAT
                    and e.flow == local and e.target is not None):
                rec = HostedFlow(hid, owner, FlowKey(local.client, e.target), local, app,
                                 b"", b"", machine=Machine(State.SERVING))
                self.flows[(owner.name, hid)] = rec
                log.info("adopted handed-in flow %s (%s) after a restart", rec.flow, hid)
                return rec
        return None

    async def _give_back(self, rec: HostedFlow, sock: socket.socket, preread: bytes,
                         app_state: bytes) -> tuple[bool, str]:
        try:
            rec.machine.advance(Event.BLOCK)
        except StateError as e:
            return False, str(e)
        state = tcp_state_of(sock)
        if state == uapi.TCP_ESTABLISHED:
            return await self._return_live(rec, sock, preread, app_state)
        reason = offload_pb2.CLIENT_RESET
        if state == uapi.TCP_CLOSE_WAIT:
            reason = offload_pb2.CLIENT_CLOSED
            await self._finish_close(sock)
        # The socket is closed (unhashed): a stray segment of the client (e.g. a duplicate of
        # its last ACK) would meet no socket and draw an RST. Drop strays until the owner has
        # removed its redirect (End below); _forget removes the block with the rewrite.
        self.ctx.dp.block(rec.local)
        end = offload_pb2.EndRequest(handoff_id=rec.handoff_id, flow=rec.flow.to_proto(),
                                     reason=reason)
        for _ in range(CLOSED_END_ATTEMPTS):
            ok, detail = await self._send_end(rec, end)
            if ok:
                break
            log.warning("end of closed flow %s not confirmed: %s", rec.flow, detail)
        self._forget(rec, Event.CLOSED)
        return True, ""

    async def _finish_close(self, sock: socket.socket) -> None:
        """Send our FIN and wait for the client's ACK while both rules still route it."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_WAIT_S
        while loop.time() < deadline and tcp_state_of(sock) == uapi.TCP_LAST_ACK:
            await asyncio.sleep(CLOSE_POLL_S)

    async def _return_live(self, rec: HostedFlow, sock: socket.socket, preread: bytes,
                           app_state: bytes) -> tuple[bool, str]:
        timer = PhaseTimer()
        dp = self.ctx.dp
        try:
            await quiesce(self.ctx.tls, sock)
        except xo.tls.TlsError as e:  # nothing happened yet: the app keeps serving
            rec.machine.advance(Event.FAILED)
            log.info("give back of %s refused: tls: %s", rec.flow, e)
            return False, f"tls: {e}"
        timer.mark("quiesce")
        dp.block(rec.local)
        timer.mark("block")
        try:
            # TLS first: a refusal must come while the socket is still out of repair mode.
            tls = self.ctx.tls.capture(sock)
            state = xo.tcp.capture(sock)
        except xo.tls.TlsError as e:
            dp.unblock(rec.local)
            rec.machine.advance(Event.FAILED)
            log.info("give back of %s refused: tls: %s", rec.flow, e)
            return False, f"tls: {e}"
        except (xo.tcp.TcpError, OSError) as e:
            dp.unblock(rec.local)
            rec.machine.advance(Event.FAILED)
            log.warning("give back of %s: capture failed: %s", rec.flow, e)
            return False, f"capture failed: {e}"
        timer.mark("capture")
        end = offload_pb2.EndRequest(handoff_id=rec.handoff_id, flow=rec.flow.to_proto(),
                                     reason=offload_pb2.DONE, tcp=state.to_proto(),
                                     preread=preread, app_state=app_state)
        if tls is not None:
            end.tls.CopyFrom(tls)
        ok, detail = await self._send_end(rec, end)
        timer.mark("end_rpc")
        if not ok:
            xo.tcp.resume(sock)
            dp.unblock(rec.local)
            rec.machine.advance(Event.FAILED)
            log.warning("give back of %s: owner refused: %s", rec.flow, detail)
            return False, f"owner did not take the connection back: {detail}"
        xo.tcp.release(sock)
        self._forget(rec, Event.ENDED)
        timer.mark("release")
        self.ctx.record("give_back", rec.handoff_id, timer.phases)
        return True, ""

    async def _send_end(self, rec: HostedFlow, end: offload_pb2.EndRequest) -> tuple[bool, str]:
        try:
            reply = await self.ctx.channels.end(rec.owner, end, END_TIMEOUT_S)
        except RpcFailed as e:
            return False, str(e)
        return reply.ok, reply.detail

    def _forget(self, rec: HostedFlow, event: Event) -> None:
        rec.machine.advance(event)
        self.ctx.dp.remove(rec.local)
        self.flows.pop((rec.owner.name, rec.handoff_id), None)

    async def sweep(self) -> None:
        """Forever: end flows whose app closed the socket without giving it back.

        An app may close a handed-in socket itself (on EOF, an error, or by dying). Its FIN
        leaves through our rewrite and the close completes through the owner's redirect; once
        the 4-tuple is gone or in TIME_WAIT, End(CLIENT_CLOSED) lets both sides drop their
        rules, so no rule outlives its connection.
        """
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            serving = [r for r in self.flows.values()
                       if r.machine.state == State.SERVING and r.sock is None]
            if not serving:
                continue
            live = open_tcp_tuples()
            for rec in serving:
                state = live.get((rec.local.vip, rec.local.client))
                if state is not None and state not in (uapi.TCP_TIME_WAIT, uapi.TCP_CLOSE):
                    continue
                log.info("flow %s closed by its app without a give back: ending it", rec.flow)
                rec.machine.advance(Event.BLOCK)
                self.ctx.dp.block(rec.local)  # strays of a closed flow: drop, do not reset
                end = offload_pb2.EndRequest(handoff_id=rec.handoff_id,
                                             flow=rec.flow.to_proto(),
                                             reason=offload_pb2.CLIENT_CLOSED)
                ok, detail = await self._send_end(rec, end)
                if not ok:
                    log.warning("end of %s not confirmed: %s", rec.flow, detail)
                self._forget(rec, Event.CLOSED)

    def reconcile(self) -> int:
        """After a restart: remove source rewrites whose socket is gone (the connection died
        with the previous agent's host or app); keep those an app still holds. Returns how
        many were removed."""
        live = open_tcp_tuples()
        removed = 0
        for e in self.ctx.dp.flows():
            if e.direction != Direction.EGRESS or e.action != Action.SNAT:
                continue
            if (e.flow.vip, e.flow.client) not in live:
                self.ctx.dp.remove(e.flow)
                removed += 1
        if removed:
            log.info("removed %d source rewrites left by a previous run", removed)
        return removed

    def close_all(self) -> None:
        """Shutdown: drop restored copies never handed to an app, and their rules."""
        for rec in list(self.flows.values()):
            if rec.sock is None:
                continue  # an app serves it: its source rewrite outlives us (restart, upgrade)
            xo.tcp.release(rec.sock)
            self.ctx.dp.remove(rec.local)
        self.flows.clear()
