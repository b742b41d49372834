"""The gRPC servicer of xo.v1.Offload: authorize the caller, then hand over to owner/target.

Every call first maps the caller's certificate to a configured peer (PERMISSION_DENIED
otherwise). Malformed requests get an error reply from the validators; anything unexpected
becomes INTERNAL with a generic message, so no state bytes leak into errors or logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

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

    async def _peer(self, context: grpc.aio.ServicerContext) -> Peer:
        try:
            return rpc.authorize(self.ctx.cfg, rpc.caller_identities(context))
        except rpc.PeerRefused as e:
            log.warning("refused: %s", e)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
            raise  # abort raises; this line only satisfies the type checker

    async def Handoff(self, request: offload_pb2.HandoffRequest,  # noqa: N802 (gRPC name)
                      context: grpc.aio.ServicerContext) -> offload_pb2.HandoffReply:
        peer = await self._peer(context)
        if log.isEnabledFor(logging.DEBUG):  # describe() walks the message: not per call
            log.debug("from %s: %s", peer.name, validate.describe(request))
        try:
            reply = self.target.handoff(peer, request)
            left = context.time_remaining()
            if reply.accepted and left is not None and left <= 0:
                # The owner stopped waiting: it keeps the socket, so our copy must go.
                self.target.abandon(peer.name, request.handoff_id)
                return offload_pb2.HandoffReply(accepted=False, reason=offload_pb2.TIMEOUT,
                                                detail="the owner's deadline passed")
            return reply
        except Exception:
            log.exception("handoff from %s failed", peer.name)
            return offload_pb2.HandoffReply(accepted=False, reason=offload_pb2.INTERNAL,
                                            detail="internal error on the target")

    async def Ready(self, request: offload_pb2.ReadyRequest,  # noqa: N802
                    context: grpc.aio.ServicerContext) -> offload_pb2.ReadyReply:
        peer = await self._peer(context)
        try:
            return await self.target.ready(peer, request)
        except Exception:
            log.exception("ready from %s failed", peer.name)
            return offload_pb2.ReadyReply(ok=False, detail="internal error on the target")

    async def End(self, request: offload_pb2.EndRequest,  # noqa: N802
                  context: grpc.aio.ServicerContext) -> offload_pb2.EndReply:
        peer = await self._peer(context)
        if log.isEnabledFor(logging.DEBUG):  # describe() walks the message: not per call
            log.debug("from %s: %s", peer.name, validate.describe(request))
        try:
            return await self.owner.end(peer, request, _deadline_passed(context))
        except ProtocolError as e:
            return offload_pb2.EndReply(ok=False, detail=e.detail)
        except Exception:
            log.exception("end from %s failed", peer.name)
            return offload_pb2.EndReply(ok=False, detail="internal error on the owner")

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
