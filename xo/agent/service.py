"""The gRPC servicer of xo.v1.Offload: authorize the caller, then hand over to owner/target.

Every call first maps the caller's certificate to a configured peer (PERMISSION_DENIED
otherwise). Malformed requests get an error reply from the validators; anything unexpected
becomes INTERNAL with a generic message, so no state bytes leak into errors or logs.

Handoff, Ready and End arrive either as unary calls or as messages on a peer's `Session`
stream (authorized once, when the stream opens); both paths run the same handlers below.
`handed_off` and `ended` see every reply (the agent's metrics count them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine

import grpc
import grpc.aio

from xo.agent import rpc, validate
from xo.agent.config import Peer
from xo.agent.context import Context
from xo.agent.owner import Owner
from xo.agent.target import Target
from xo.agent.validate import ProtocolError
from xo.v1 import offload_pb2, offload_pb2_grpc

log = logging.getLogger("xo.agent.service")
PROTOCOL_VERSION = 1
MS = 1000


def _deadline_passed(context: grpc.aio.ServicerContext) -> Callable[[], bool]:
    def passed() -> bool:
        left = context.time_remaining()
        return left is not None and left <= 0

    return passed


class OffloadService(offload_pb2_grpc.OffloadServicer):
    def __init__(self, ctx: Context, owner: Owner, target: Target) -> None:
        self.ctx = ctx
        self.owner = owner
        self.target = target

    def handed_off(self, reply: offload_pb2.HandoffReply) -> None:
        """Called with every Handoff reply (metrics hook)."""

    def ended(self, reply: offload_pb2.EndReply) -> None:
        """Called with every End reply (metrics hook)."""

    async def _peer(self, context: grpc.aio.ServicerContext) -> Peer:
        try:
            return rpc.authorize(self.ctx.cfg, rpc.caller_identities(context))
        except rpc.PeerRefused as e:
            log.warning("refused: %s", e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            raise  # abort raises; this line only satisfies the type checker

    # --- the handlers, whatever carried the request ------------------------------------------
    def handoff(self, peer: Peer, request: offload_pb2.HandoffRequest,
                deadline_passed: Callable[[], bool]) -> offload_pb2.HandoffReply:
        if log.isEnabledFor(logging.DEBUG):  # describe() walks the message: not per call
            log.debug("from %s: %s", peer.name, validate.describe(request))
        try:
            reply = self.target.handoff(peer, request)
            if reply.accepted and deadline_passed():
                # The owner stopped waiting: it keeps the socket, so our copy must go.
                self.target.abandon(peer.name, request.handoff_id)
                reply = offload_pb2.HandoffReply(accepted=False, reason=offload_pb2.TIMEOUT,
                                                 detail="the owner's deadline passed")
        except Exception:
            log.exception("handoff from %s failed", peer.name)
            reply = offload_pb2.HandoffReply(accepted=False, reason=offload_pb2.INTERNAL,
                                             detail="internal error on the target")
        self.handed_off(reply)
        return reply

    async def ready(self, peer: Peer, request: offload_pb2.ReadyRequest) -> offload_pb2.ReadyReply:
        try:
            return await self.target.ready(peer, request)
        except Exception:
            log.exception("ready from %s failed", peer.name)
            return offload_pb2.ReadyReply(ok=False, detail="internal error on the target")

    async def end(self, peer: Peer, request: offload_pb2.EndRequest,
                  deadline_passed: Callable[[], bool]) -> offload_pb2.EndReply:
        if log.isEnabledFor(logging.DEBUG):  # describe() walks the message: not per call
            log.debug("from %s: %s", peer.name, validate.describe(request))
        try:
            reply = await self.owner.end(peer, request, deadline_passed)
        except ProtocolError as e:
            reply = offload_pb2.EndReply(ok=False, detail=e.detail)
        except Exception:
            log.exception("end from %s failed", peer.name)
            reply = offload_pb2.EndReply(ok=False, detail="internal error on the owner")
        self.ended(reply)
        return reply

    # --- unary calls -------------------------------------------------------------------------
    async def Handoff(self, request: offload_pb2.HandoffRequest,  # noqa: N802 (gRPC name)
                      context: grpc.aio.ServicerContext) -> offload_pb2.HandoffReply:
        peer = await self._peer(context)
        return self.handoff(peer, request, _deadline_passed(context))

    async def Ready(self, request: offload_pb2.ReadyRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> offload_pb2.ReadyReply:
        peer = await self._peer(context)
        return await self.ready(peer, request)

    async def End(self, request: offload_pb2.EndRequest,  # noqa: N802
                  context: grpc.aio.ServicerContext) -> offload_pb2.EndReply:
        peer = await self._peer(context)
        return await self.end(peer, request, _deadline_passed(context))

    async def Peer(self, request: offload_pb2.PeerInfoRequest,  # noqa: N802
                   context: grpc.aio.ServicerContext) -> offload_pb2.PeerInfo:
        await self._peer(context)
        h = self.ctx.cfg.handoff
        return offload_pb2.PeerInfo(
            name=self.ctx.cfg.name, protocol=PROTOCOL_VERSION,
            handoff_addresses=[offload_pb2.Endpoint(addr=a.packed) for a in h.addresses],
            handoff_port_min=h.port_min, handoff_port_max=h.port_max,
            ktls=self.ctx.tls.supported,
            active_flows=len(self.owner.by_flow) + len(self.target.flows),
        )

    # --- the session stream ------------------------------------------------------------------
    async def Session(self, request_iterator: AsyncIterator[offload_pb2.PeerMessage],  # noqa: N802
                      context: grpc.aio.ServicerContext) -> None:
        peer = await self._peer(context)
        await _Session(self, peer, context).serve()


class _Session:
    """One peer's Session stream on our side: its requests in, our replies out.

    Handoff runs inline (it does not wait on anything; a Ready read after it finds the flow),
    its reply is written by a task; Ready and End wait on apps, so each runs as a task and
    replies when done. A Handoff whose reply cannot be written is abandoned at once (the owner
    keeps the connection), and an End still running when the stream ends sees its deadline
    passed, like a cancelled unary call.
    """

    def __init__(self, service: OffloadService, peer: Peer,
                 context: grpc.aio.ServicerContext) -> None:
        self.service = service
        self.peer = peer
        self.context = context
        self.closed = False
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def _deadline(self, timeout_ms: int) -> Callable[[], bool]:
        end = time.monotonic() + timeout_ms / MS if timeout_ms else None

        def passed() -> bool:
            return self.closed or (end is not None and time.monotonic() >= end)

        return passed

    async def _write(self, msg: offload_pb2.PeerMessage) -> bool:
        try:
            async with self._write_lock:
                await self.context.write(msg)
            return True
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, RuntimeError) as e:
            log.warning("session with %s: reply %d not sent: %s", self.peer.name, msg.id, e)
            return False

    async def serve(self) -> None:
        try:
            while True:
                msg = await self.context.read()
                if msg is grpc.aio.EOF:
                    break
                body = msg.WhichOneof("body")
                if body == "handoff":
                    # Handled here, so a Ready read next finds the flow; the reply is sent by
                    # a task: waiting for the write would hold every later message of the peer.
                    reply = self.service.handoff(self.peer, msg.handoff,
                                                 self._deadline(msg.timeout_ms))
                    self._spawn(self._handoff_reply(msg, reply))
                elif body in ("ready", "end"):
                    self._spawn(self._later(msg))
                else:
                    await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                             f"session message {msg.id}: not a request ({body})")
        finally:
            self.closed = True

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)  # a reference until done: the loop keeps only weak ones
        task.add_done_callback(self._tasks.discard)

    async def _handoff_reply(self, msg: offload_pb2.PeerMessage,
                             reply: offload_pb2.HandoffReply) -> None:
        sent = await self._write(offload_pb2.PeerMessage(id=msg.id, handoff_reply=reply))
        if reply.accepted and not sent:
            self.service.target.abandon(self.peer.name, msg.handoff.handoff_id)

    async def _later(self, msg: offload_pb2.PeerMessage) -> None:
        if msg.WhichOneof("body") == "ready":
            ready = await self.service.ready(self.peer, msg.ready)
            out = offload_pb2.PeerMessage(id=msg.id, ready_reply=ready)
        else:
            end = await self.service.end(self.peer, msg.end, self._deadline(msg.timeout_ms))
            out = offload_pb2.PeerMessage(id=msg.id, end_reply=end)
        if not self.closed:
            await self._write(out)
