"""gRPC transport between agents: mutual TLS credentials, peer identity, client channels.

Both sides present certificates from the same CA (xo.pki). The server requires a client
certificate; every handler then maps the certificate's name to a configured peer and refuses
anyone else, so a valid certificate alone is not enough to hand us a connection.

Handoff, Ready and End travel on one long-lived `Session` stream per peer (PeerSession):
measured here, a unary grpc.aio call costs about twice a message round trip on an open
stream (per-call HTTP/2 stream setup, metadata, a task per call on the server), and those
calls are the handoff's critical path. A peer without `Session` gets the unary calls.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from typing import TypeVar

import grpc
import grpc.aio

from xo.agent.config import AgentConfig, Peer
from xo.pki import TlsFiles
from xo.v1 import offload_pb2, offload_pb2_grpc

log = logging.getLogger("xo.agent.rpc")
M = TypeVar("M")

# A handoff RPC is a few hundred bytes; keep messages bounded (a state with queues fits).
MAX_MESSAGE = 8 * 1024 * 1024
KEEPALIVE_MS = 2000
# A peer session stays open while exchanges start at least this often (see PeerSession).
SESSION_IDLE_S = 0.2
# ... and carries one unanswered request at a time; concurrent ones go as unary calls.
SESSION_MAX_WAITING = 1
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Agents are in the same L2/L3 neighbourhood; fail fast instead of backing off for seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]

# The server must accept the clients' keepalive pings, or it answers GOAWAY "too_many_pings"
# and in-flight handoffs on that channel fail.
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


class PeerRefused(PermissionError):
    """The caller is not a configured peer."""


class RpcFailed(Exception):
    """A call to a peer failed (unreachable, timed out, stream broken): no reply came."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def of(cls, e: grpc.aio.AioRpcError) -> RpcFailed:
        return cls(e.code(), e.details() or "")


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    return files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    ca, cert, key = _read(files)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = _read(files)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def caller_identities(context: grpc.aio.ServicerContext) -> list[str]:
    """Names in the caller's verified certificate (common name and DNS SANs)."""
    auth = context.auth_context()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names += [v.decode() for v in auth.get(key, [])]
    return names


def authorize(cfg: AgentConfig, identities: Iterable[str]) -> Peer:
    """The configured peer the caller is; PeerRefused for anyone else."""
    names = list(identities)
    for name in names:
        peer = cfg.peer_by_identity(name)
        if peer is not None:
            return peer
    raise PeerRefused(f"caller {names or ['<no certificate>']} is not a configured peer")


class PeerSession:
    """Our requests to one peer on one `Session` stream, replies matched by id.

    Opened on first use and again after it breaks; a broken stream fails every request
    waiting on it (the callers' failure paths keep the connection). Writes are serialized
    (grpc.aio allows one pending write per call); one reader task resolves the replies.
    Closed (cancelled, which is clean while both ends live) after SESSION_IDLE_S without a
    request: an agent killed while a stream is open draws a TCP RST from its peer's gRPC
    (which resets the stream), so an idle pair of agents keeps none open.
    """

    def __init__(self, stub: offload_pb2_grpc.OffloadStub, name: str) -> None:
        self._stub = stub
        self._name = name
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[offload_pb2.PeerMessage]] = {}
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()
        self._last_use = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def is_open(self) -> bool:
        return self._call is not None

    @property
    def waiting(self) -> int:
        """Requests sent (or queued to be) and not answered yet."""
        return len(self._pending)

    def _touch(self) -> None:
        """A request started or ended: the idle close counts from now."""
        loop = asyncio.get_running_loop()
        self._last_use = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_later(SESSION_IDLE_S, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self._call is None:
            return
        loop = asyncio.get_running_loop()
        left = self._last_use + SESSION_IDLE_S - loop.time()
        if self._pending or left > 0:
            self._idle_timer = loop.call_later(SESSION_IDLE_S if self._pending else left,
                                               self._idle)
            return
        self._drop(self._call, RpcFailed(grpc.StatusCode.CANCELLED, "idle"))

    def _open(self) -> grpc.aio.StreamStreamCall:
        if self._call is None:
            # wait_for_ready: a channel still backing off after a peer restart reconnects
            # within the request's deadline instead of failing at once.
            call = self._stub.Session(wait_for_ready=True)
            self._call = call
            self._reader = asyncio.get_running_loop().create_task(self._read(call))
        return self._call

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        failure = RpcFailed(grpc.StatusCode.UNAVAILABLE, f"session to {self._name} closed")
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                fut = self._pending.pop(msg.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except grpc.aio.AioRpcError as e:
            failure = RpcFailed.of(e)
        except asyncio.CancelledError:
            failure = RpcFailed(grpc.StatusCode.CANCELLED, f"session to {self._name} closed")
        finally:
            self._drop(call, failure)

    def _drop(self, call: grpc.aio.StreamStreamCall, failure: RpcFailed) -> None:
        """Forget a stream (the next request opens a new one); its waiters get `failure`."""
        call.cancel()
        if self._call is not call:
            return  # already replaced
        self._call = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(failure)
        self._pending.clear()

    async def request(self, msg: offload_pb2.PeerMessage,
                      timeout: float) -> offload_pb2.PeerMessage:
        """Send `msg` (its id and timeout are set here) and wait for its reply."""
        call = self._open()
        self._touch()
        msg.id = next(self._ids)
        msg.timeout_ms = max(1, round(timeout * 1000))
        fut: asyncio.Future[offload_pb2.PeerMessage] = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = fut
        writing = False
        try:
            async with asyncio.timeout(timeout):
                async with self._write_lock:
                    writing = True
                    await call.write(msg)
                    writing = False
                return await fut
        except TimeoutError:
            if writing:  # stuck in the write itself (peer unreachable): start afresh next time
                self._drop(call, RpcFailed(grpc.StatusCode.UNAVAILABLE, "write timed out"))
            raise RpcFailed(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except grpc.aio.AioRpcError as e:
            raise RpcFailed.of(e) from None
        except asyncio.InvalidStateError:  # the stream ended under the write
            raise RpcFailed(grpc.StatusCode.UNAVAILABLE,
                            f"session to {self._name} closed") from None
        finally:
            self._pending.pop(msg.id, None)
            self._touch()

    async def close(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


class Channels:
    """One secure channel + stub + session per peer, created lazily and reused.

    `handoff`, `ready` and `end` go over the peer's session while exchanges with it are
    frequent, with the unary RPCs otherwise (`_use_session`); a peer that answers
    UNIMPLEMENTED (an agent from before sessions) gets the unary RPCs from then on.
    Every failure, either way, is an RpcFailed.
    """

    def __init__(self, cfg: AgentConfig) -> None:
        self._cfg = cfg
        self._creds = channel_credentials(cfg.tls)
        self._open: dict[str, tuple[grpc.aio.Channel, offload_pb2_grpc.OffloadStub]] = {}
        self._sessions: dict[str, PeerSession] = {}
        self._unary_only: set[str] = set()
        self._last_start: dict[str, float] = {}

    def stub(self, peer: Peer) -> offload_pb2_grpc.OffloadStub:
        entry = self._open.get(peer.name)
        if entry is None:
            options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", peer.identity)]
            channel = grpc.aio.secure_channel(peer.address, self._creds, options=options)
            entry = (channel, offload_pb2_grpc.OffloadStub(channel))
            self._open[peer.name] = entry
        return entry[1]

    def session(self, peer: Peer) -> PeerSession:
        s = self._sessions.get(peer.name)
        if s is None:
            s = self._sessions[peer.name] = PeerSession(self.stub(peer), peer.name)
        return s

    def _use_session(self, peer: Peer, starts: bool) -> bool:
        """Handoff and End start an exchange: on the session if one is open or the previous
        exchange with this peer started less than SESSION_IDLE_S ago (traffic is flowing);
        otherwise unary, so an isolated handoff leaves no stream open. Ready follows its
        Handoff: on the session only if one is open. A session with SESSION_MAX_WAITING
        requests unanswered takes no more: one stream is one queue (a Ready would wait behind
        every Handoff sent before it), while unary calls run side by side; with 200 concurrent
        connections on a loaded box, session requests timed out where unary ones did not
        (with up to 4 waiting; not located further), so a session serves one exchange at a
        time: the serial case the latency goal is about."""
        if peer.name in self._unary_only:
            return False
        s = self._sessions.get(peer.name)
        if s is not None and s.is_open:
            return s.waiting < SESSION_MAX_WAITING
        if not starts:
            return False
        now = asyncio.get_running_loop().time()
        last = self._last_start.get(peer.name)
        self._last_start[peer.name] = now
        return last is not None and now - last < SESSION_IDLE_S

    async def _session_call(self, peer: Peer, msg: offload_pb2.PeerMessage, timeout: float,
                            starts: bool) -> offload_pb2.PeerMessage | None:
        """The reply on the peer's session; None if the call should be unary instead."""
        if not self._use_session(peer, starts):
            return None
        try:
            return await self.session(peer).request(msg, timeout)
        except RpcFailed as e:
            if e.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("peer %s has no sessions: unary calls from now on", peer.name)
            self._unary_only.add(peer.name)
            return None

    async def handoff(self, peer: Peer, req: offload_pb2.HandoffRequest,
                      timeout: float) -> offload_pb2.HandoffReply:
        reply = await self._session_call(peer, offload_pb2.PeerMessage(handoff=req), timeout,
                                         starts=True)
        if reply is not None:
            return _body(reply, "handoff_reply", offload_pb2.HandoffReply)
        try:
            out: offload_pb2.HandoffReply = await self.stub(peer).Handoff(
                req, timeout=timeout, wait_for_ready=True)
        except grpc.aio.AioRpcError as e:
            raise RpcFailed.of(e) from None
        return out

    async def ready(self, peer: Peer, req: offload_pb2.ReadyRequest,
                    timeout: float) -> offload_pb2.ReadyReply:
        try:
            reply = await self._session_call(peer, offload_pb2.PeerMessage(ready=req), timeout,
                                             starts=False)
            if reply is not None:
                return _body(reply, "ready_reply", offload_pb2.ReadyReply)
        except RpcFailed as e:
            # Ready is idempotent and the target waits for it holding the connection: a
            # broken session must not lose it, so try once more with the unary call.
            log.warning("ready to %s on the session failed (%s): unary", peer.name, e)
        try:
            out: offload_pb2.ReadyReply = await self.stub(peer).Ready(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise RpcFailed.of(e) from None
        return out

    async def end(self, peer: Peer, req: offload_pb2.EndRequest,
                  timeout: float) -> offload_pb2.EndReply:
        reply = await self._session_call(peer, offload_pb2.PeerMessage(end=req), timeout,
                                         starts=True)
        if reply is not None:
            return _body(reply, "end_reply", offload_pb2.EndReply)
        try:
            out: offload_pb2.EndReply = await self.stub(peer).End(req, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise RpcFailed.of(e) from None
        return out

    async def close(self) -> None:
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()
        for channel, _ in self._open.values():
            await channel.close()
        self._open.clear()


def _body(msg: offload_pb2.PeerMessage, field: str, kind: type[M]) -> M:
    """The reply body `field` of a session message; RpcFailed if the peer sent another."""
    if msg.WhichOneof("body") != field:
        raise RpcFailed(grpc.StatusCode.INTERNAL, f"expected {field}, got {msg.WhichOneof('body')}")
    body: M = getattr(msg, field)
    return body
