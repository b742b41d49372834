"""The Python app side of XO: accept, offload, give back, through the local agent.

One call, `Server.accept()`, returns the next connection whichever way it came (Socket
Launcher's accept, seed 000): a fresh client from the listening socket, a connection handed in
by another host's agent (this host is the target), or one returned after an offload (this host
is the owner). The app then serves it the same way in all three cases, and may `offload` it to
a peer or `give_back` a handed-in one. Everything goes over the agent's unix socket
(xo.agent.framing), so the app needs no privileges and any process can do the same.

    from xo.app import Server
    srv = Server(listener, "/run/xo/f0.sock", app="http")
    while True:
        conn = srv.accept()          # conn.sock, conn.kind, conn.preread, conn.handoff_id
        ...
        res = srv.offload(conn.sock, "b0", preread=request)
        if res.accepted: conn.sock.close()   # it lives on b0 now
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import queue
import select
import socket
import threading
from dataclasses import dataclass, field

from xo.agent import framing
from xo.flow import FlowKey
from xo.v1 import local_pb2

DEFAULT_TIMEOUT = 5.0
MAX_EXPECTED_BYTES = (1 << 64) - 1  # OffloadRequest.expected_bytes is a uint64


class AgentError(ConnectionError):
    """The agent refused the app, went away, or did not answer in time."""


class Kind(enum.Enum):
    FRESH = "fresh"  # accepted from the listening socket
    HANDED_IN = "handed-in"  # this host is the target of an offload
    RETURNED = "returned"  # this host is the owner; the target gave it back
    CLOSED = "closed"  # returned without a socket: the client closed or reset while away


@dataclass
class Connection:
    kind: Kind
    sock: socket.socket | None
    handoff_id: str = ""
    flow: FlowKey | None = None
    preread: bytes = field(default=b"", repr=False)
    app_state: bytes = field(default=b"", repr=False)
    reason: int = 0


@dataclass(frozen=True)
class OffloadOutcome:
    accepted: bool
    handoff_id: str
    reason: int
    detail: str


class AgentClient:
    """A connection to the local agent; a reader thread routes replies and incoming sockets."""

    def __init__(self, path: str, app: str, accept_connections: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise AgentError(f"cannot reach the agent at {path}: {e.strerror}") from None
        self._send_lock = threading.Lock()
        self._waiting: dict[tuple[str, str], queue.Queue[framing.Frame]] = {}
        self._waiting_lock = threading.Lock()
        self.incoming: queue.Queue[Connection] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ids = itertools.count(1)
        self._closed = False
        hello = local_pb2.LocalMessage(
            hello=local_pb2.Hello(app=app, accept_connections=accept_connections)
        )
        reply = self._call(hello, None, ("hello_reply", ""))
        if not reply.msg.hello_reply.ok:
            raise AgentError(f"agent refused app {app!r}: {reply.msg.hello_reply.detail}")
        self.agent_name = reply.msg.hello_reply.agent
        self._reader = threading.Thread(target=self._read_loop, name="xo-app-agent", daemon=True)
        self._reader.start()

    @property
    def closed(self) -> bool:
        """The agent went away (it stopped or crashed); handed-in sockets stop coming."""
        return self._closed

    @property
    def wakeup_fd(self) -> int:
        """Readable when `incoming` has a connection (for select() in accept loops)."""
        return self._wake_r

    def _call(self, msg: local_pb2.LocalMessage, fd: int | None,
              key: tuple[str, str]) -> framing.Frame:
        box: queue.Queue[framing.Frame] = queue.Queue(maxsize=1)
        with self._waiting_lock:
            self._waiting[key] = box
        try:
            with self._send_lock:
                framing.send(self._sock, msg, fd)
            if key[0] == "hello_reply":  # before the reader thread runs: read inline
                return self._read_one()
            try:
                return box.get(timeout=self.timeout)
            except queue.Empty:
                raise AgentError(f"agent did not answer {key[0]} within {self.timeout}s") from None
        finally:
            with self._waiting_lock:
                self._waiting.pop(key, None)

    def _read_one(self) -> framing.Frame:
        dec = framing.Decoder()
        while True:
            frames = framing.recv_into(self._sock, dec)
            if frames is None:
                raise AgentError("agent closed the connection")
            if frames:
                return frames[0]

    def _read_loop(self) -> None:
        dec = framing.Decoder()
        while True:
            try:
                frames = framing.recv_into(self._sock, dec)
            except (OSError, framing.FrameError):
                frames = None
            if frames is None:
                self._closed = True
                os.write(self._wake_w, b"x")
                return
            for f in frames:
                self._route(f)

    def _route(self, f: framing.Frame) -> None:
        body = f.msg.WhichOneof("body")
        if body == "offload_result":
            key = (body, str(f.msg.offload_result.request_id))
        elif body == "give_back_result":
            key = (body, f.msg.give_back_result.handoff_id)
        elif body in ("handed_in", "returned"):
            self.incoming.put(_connection(f))
            os.write(self._wake_w, b"x")
            return
        else:
            f.close()
            return
        with self._waiting_lock:
            box = self._waiting.get(key)
        if box is None:
            f.close()
        else:
            box.put(f)

    def offload(self, sock: socket.socket, target: str, preread: bytes = b"",
                app_state: bytes = b"", app: str = "",
                expected_bytes: int | None = None) -> OffloadOutcome:
        """Ask the agent to move `sock` to `target`; on acceptance close `sock` yourself.

        `expected_bytes`: what the target will send the client (None: unknown); the agent's
        policy gives only large transfers a hardware rule.
        """
        if expected_bytes is not None and not 0 <= expected_bytes <= MAX_EXPECTED_BYTES:
            raise ValueError(f"expected_bytes must be a uint64, got {expected_bytes}")
        rid = next(self._ids)
        msg = local_pb2.LocalMessage(offload=local_pb2.OffloadRequest(
            request_id=rid, target=target, preread=preread, app_state=app_state, app=app,
            expected_bytes=expected_bytes))
        r = self._call(msg, sock.fileno(), ("offload_result", str(rid))).msg.offload_result
        return OffloadOutcome(r.accepted, r.handoff_id, r.reason, r.detail)

    def give_back(self, sock: socket.socket, handoff_id: str, preread: bytes = b"",
                  app_state: bytes = b"") -> None:
        """Return a handed-in socket to its owner; on success close `sock` yourself."""
        msg = local_pb2.LocalMessage(give_back=local_pb2.GiveBack(
            handoff_id=handoff_id, preread=preread, app_state=app_state))
        r = self._call(msg, sock.fileno(), ("give_back_result", handoff_id)).msg.give_back_result
        if not r.ok:
            raise AgentError(f"give back of {handoff_id} failed: {r.detail}")

    def get(self, timeout: float | None = None) -> Connection | None:
        """The next handed-in or returned connection, or None after `timeout` seconds."""
        try:
            conn = self.incoming.get(timeout=timeout)
        except queue.Empty:
            return None
        _drain(self._wake_r)
        return conn

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return  # already closed
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join()
        self._sock.close()
        while not self.incoming.empty():
            c = self.incoming.get_nowait()
            if c.sock is not None:
                c.sock.close()
        os.close(self._wake_w)
        os.close(self._wake_r)


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.read(fd, 4096)


def _connection(f: framing.Frame) -> Connection:
    fd = f.take_fd()
    sock = socket.socket(fileno=fd) if fd is not None else None
    if sock is not None:
        sock.setblocking(True)
    if f.msg.WhichOneof("body") == "handed_in":
        m = f.msg.handed_in
        return Connection(Kind.HANDED_IN, sock, m.handoff_id, FlowKey.from_proto(m.flow),
                          m.preread, m.app_state)
    r = f.msg.returned
    return Connection(Kind.RETURNED if sock else Kind.CLOSED, sock, r.handoff_id,
                      FlowKey.from_proto(r.flow), r.preread, r.app_state, r.reason)


class Server:
    """A listening socket plus the agent: `accept()` returns either kind of connection."""

    def __init__(self, listener: socket.socket, agent_path: str, app: str,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.listener = listener
        self.agent = AgentClient(agent_path, app, accept_connections=True, timeout=timeout)

    def accept(self, timeout: float | None = None) -> Connection | None:
        """A fresh, handed-in or returned connection; None after `timeout` seconds."""
        while True:
            conn = self.agent.get(timeout=0)
            if conn is not None:
                return conn
            fds = [self.listener.fileno(), self.agent.wakeup_fd]
            ready, _, _ = select.select(fds, [], [], timeout)
            if not ready:
                return None
            if self.agent.wakeup_fd in ready and self.agent.incoming.empty():
                _drain(self.agent.wakeup_fd)
                if self.agent.closed:
                    raise AgentError("the agent closed the connection")
            if self.listener.fileno() in ready:
                try:
                    sock, _ = self.listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(True)
                return Connection(Kind.FRESH, sock)

    def offload(self, sock: socket.socket, target: str, preread: bytes = b"",
                app_state: bytes = b"", app: str = "",
                expected_bytes: int | None = None) -> OffloadOutcome:
        return self.agent.offload(sock, target, preread, app_state, app, expected_bytes)

    def give_back(self, sock: socket.socket, handoff_id: str, preread: bytes = b"",
                  app_state: bytes = b"") -> None:
        self.agent.give_back(sock, handoff_id, preread, app_state)

    def close(self) -> None:
        """Close the agent link and the listening socket (the Server owns both)."""
        self.agent.close()
        self.listener.close()
