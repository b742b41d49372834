"""The Python app side of XO: accept, offload, give back, through the local agent.

One call, `Server.accept()`, returns the next connection whichever way it came (Socket
Launcher's accept, seed 000): a fresh client from the listening socket, a connection handed in
by another host's agent (this host is the target), or one returned after an offload (this host
is the owner). The app then serves it the same way in all three cases, and may `offload` it to
a peer or `give_back` a handed-in one. Everything goes over the agent's unix socket
(xo.agent.framing), so the app needs no privileges and any process can do the same.

    from xo.app import AgentUnavailable, Server
    srv = Server(listener, "/run/xo/f0.sock", app="http")
    while True:
        conn = srv.accept()          # conn.sock, conn.kind, conn.preread, conn.handoff_id
        ...
        try:
            res = srv.offload(conn.sock, "b0", preread=request)
        except AgentUnavailable:     # the agent is restarting: nothing was sent
            res = None               # serve conn.sock here
        if res and res.accepted: conn.sock.close()   # it lives on b0 now

The app outlives its agent: when the agent restarts (an upgrade, a crash) the app keeps
serving its own listener, reconnects in the background with bounded backoff and the same Hello,
and receives handed-in and returned connections again once the agent is back. Meanwhile
`offload` fails at once with AgentUnavailable and `give_back` waits for the agent up to a
deadline (docs/operations.md, "Restart and upgrade").
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import os
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from xo.agent import framing
from xo.flow import FlowKey
from xo.v1 import local_pb2

log = logging.getLogger("xo.app")

DEFAULT_TIMEOUT = 5.0
MAX_EXPECTED_BYTES = (1 << 64) - 1  # OffloadRequest.expected_bytes is a uint64
# Reconnect backoff once the agent went away: the first retry comes soon, then it doubles up
# to a low ceiling. The ceiling is how long a connection returned right after the agent's
# restart may wait for us (the agent holds it meanwhile); a failed connect to a unix socket
# costs microseconds, so a few tries a second cost nothing.
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 0.25
# How long give_back waits for an agent that is away. A handed-in connection has no other way
# home, and it keeps working meanwhile (its rules are pinned in the kernel); an agent restart
# takes seconds (BCC compiles the TC programs: over 10 s seen on a loaded host). The owner keeps
# a silent target's flows about as long (60 health checks, xo.agent.owner): no point beyond.
GIVE_BACK_WAIT_S = 60.0

_Key = tuple[str, str]


class AgentError(ConnectionError):
    """The agent refused the app, went away, or did not answer in time."""


class AgentUnavailable(AgentError):
    """Not connected to the agent (it is restarting or stopped): the request was not sent and
    the socket is still the caller's to serve."""


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


@dataclass
class _Link:
    """One connection to the agent, after its Hello: the socket, its decoder, and the frames
    that arrived right behind the HelloReply (they must not be lost)."""

    sock: socket.socket
    decoder: framing.Decoder
    frames: list[framing.Frame]


class AgentClient:
    """A connection to the local agent; a reader thread routes replies and incoming sockets.

    The first connect must succeed (a wrong path or a refused Hello is a configuration error).
    After that the reader thread survives the agent: when the link drops it fails the calls in
    flight, logs once, reconnects with bounded backoff and logs once more when it is back.
    """

    def __init__(self, path: str, app: str, accept_connections: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.app = app
        self.timeout = timeout
        self.agent_name = ""
        self._hello = local_pb2.LocalMessage(
            hello=local_pb2.Hello(app=app, accept_connections=accept_connections))
        self._send_lock = threading.Lock()  # one frame at a time on the socket
        self._link_lock = threading.Lock()  # the current socket, the waiting calls, up/down
        self._waiting: dict[_Key, queue.Queue[framing.Frame | None]] = {}
        self._up = threading.Event()
        self._stop = threading.Event()
        self._down_since = 0.0
        self.incoming: queue.Queue[Connection] = queue.Queue()
        self._ids = itertools.count(1)
        link = self._connect()
        self._sock = link.sock
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._up.set()
        self._reader = threading.Thread(target=self._run, args=(link,), name="xo-app-agent",
                                        daemon=True)
        self._reader.start()

    @property
    def connected(self) -> bool:
        """The link to the agent is up (False while the agent restarts)."""
        return self._up.is_set()

    @property
    def wakeup_fd(self) -> int:
        """Readable when `incoming` has a connection (for select() in accept loops)."""
        return self._wake_r

    # --- the link: connect, read, reconnect --------------------------------------------------
    def _connect(self) -> _Link:
        """Connect and say Hello; AgentError if the agent is not there or refuses us."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dec = framing.Decoder()
        try:
            sock.settimeout(self.timeout)
            frames = self._handshake(sock, dec)
            sock.settimeout(None)
        except BaseException:
            dec.close()
            sock.close()
            raise
        return _Link(sock, dec, frames)

    def _handshake(self, sock: socket.socket, dec: framing.Decoder) -> list[framing.Frame]:
        try:
            sock.connect(self.path)
        except OSError as e:
            raise AgentError(f"cannot reach the agent at {self.path}: "
                             f"{e.strerror or e}") from None
        frames: list[framing.Frame] = []
        try:
            framing.send(sock, self._hello)
            while not frames:
                got = framing.recv_into(sock, dec)
                if got is None:
                    raise AgentError(f"the agent at {self.path} closed the connection "
                                     "during Hello")
                frames = got
        except TimeoutError:
            raise AgentError(f"the agent at {self.path} did not answer Hello within "
                             f"{self.timeout}s") from None
        except AgentError:
            raise
        except (OSError, framing.FrameError) as e:
            raise AgentError(f"Hello to the agent at {self.path} failed: {e}") from None
        reply = frames.pop(0)
        body = reply.msg.WhichOneof("body")
        if body != "hello_reply" or not reply.msg.hello_reply.ok:
            for f in (reply, *frames):
                f.close()
            if body != "hello_reply":
                raise AgentError(f"the agent at {self.path} answered Hello with {body}")
            raise AgentError(f"agent refused app {self.app!r}: {reply.msg.hello_reply.detail}")
        self.agent_name = reply.msg.hello_reply.agent
        return frames

    def _run(self, link: _Link) -> None:
        """The reader thread: route frames; when the link drops, reconnect until close()."""
        current: _Link | None = link
        while current is not None:
            for f in current.frames:
                self._route(f)
            self._read(current)
            self._link_down(current)
            current = self._reconnect()

    def _read(self, link: _Link) -> None:
        while True:
            try:
                frames = framing.recv_into(link.sock, link.decoder)
            except (OSError, framing.FrameError):
                return
            if frames is None:
                return
            for f in frames:
                self._route(f)

    def _link_down(self, link: _Link) -> None:
        """Fail the calls waiting for an answer: none can come on another connection."""
        with self._link_lock:
            self._up.clear()
            self._down_since = time.monotonic()
            boxes = list(self._waiting.values())
        for box in boxes:
            with contextlib.suppress(queue.Full):  # its answer came just before the drop
                box.put_nowait(None)
        with self._send_lock:  # no sender is between fileno() and sendmsg() on it
            link.sock.close()
        link.decoder.close()
        if not self._stop.is_set():
            log.warning("app %r: the agent at %s went away: serving locally, reconnecting",
                        self.app, self.path)

    def _reconnect(self) -> _Link | None:
        """Retry with bounded backoff until the agent is back (the link) or close() (None)."""
        delay = RECONNECT_FIRST_S
        while not self._stop.wait(delay):
            try:
                link = self._connect()
            except AgentError as e:
                log.debug("app %r: agent still away: %s", self.app, e)
                delay = min(2 * delay, RECONNECT_MAX_S)
                continue
            with self._link_lock:
                if self._stop.is_set():  # close() came while we connected
                    link.decoder.close()
                    link.sock.close()
                    return None
                self._sock = link.sock
                self._up.set()
                away = time.monotonic() - self._down_since
            log.info("app %r: reconnected to agent %s at %s after %.1f s", self.app,
                     self.agent_name, self.path, away)
            return link
        return None

    def _away(self) -> str:
        away = time.monotonic() - self._down_since
        return (f"not connected to the agent at {self.path} (away for {away:.1f} s, "
                "reconnecting): nothing was sent, the socket is still yours")

    # --- calls -------------------------------------------------------------------------------
    def _call(self, msg: local_pb2.LocalMessage, fd: int | None, key: _Key) -> framing.Frame:
        box: queue.Queue[framing.Frame | None] = queue.Queue(maxsize=1)
        with self._link_lock:
            if self._stop.is_set():
                raise AgentUnavailable(f"the link to the agent at {self.path} is closed")
            if not self._up.is_set():
                raise AgentUnavailable(self._away())
            self._waiting[key] = box
            sock = self._sock
        try:
            try:
                with self._send_lock:
                    framing.send(sock, msg, fd)
            except OSError as e:  # a frame cut short is dropped by the agent unread
                raise AgentUnavailable(f"the agent at {self.path} went away ({e}): the "
                                       f"{_request(key)} was not sent, the socket is still "
                                       "yours") from None
            try:
                got = box.get(timeout=self.timeout)
            except queue.Empty:
                raise AgentError(f"agent did not answer {key[0]} within {self.timeout}s") from None
            if got is None:
                raise AgentError(f"the agent at {self.path} went away before answering the "
                                 f"{_request(key)}: its outcome is unknown")
            return got
        finally:
            with self._link_lock:
                self._waiting.pop(key, None)

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
        with self._link_lock:
            box = self._waiting.get(key)
        if box is None:
            f.close()
        else:
            box.put(f)

    def offload(self, sock: socket.socket, target: str, preread: bytes = b"",
                app_state: bytes = b"", app: str = "",
                expected_bytes: int | None = None) -> OffloadOutcome:
        """Ask the agent to move `sock` to `target`; on acceptance close `sock` yourself.

        AgentUnavailable at once while the agent is away: serve `sock` yourself.
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
                  app_state: bytes = b"", wait: float = GIVE_BACK_WAIT_S) -> None:
        """Return a handed-in socket to its owner; on success close `sock` yourself.

        While the agent is away this waits up to `wait` seconds for it to come back, then
        raises AgentUnavailable: the socket is still yours (and still works), serve it or try
        again later.
        """
        msg = local_pb2.LocalMessage(give_back=local_pb2.GiveBack(
            handoff_id=handoff_id, preread=preread, app_state=app_state))
        deadline = time.monotonic() + wait
        while True:
            try:
                frame = self._call(msg, sock.fileno(), ("give_back_result", handoff_id))
                break
            except AgentUnavailable:
                left = deadline - time.monotonic()
                if self._stop.is_set() or left <= 0 or not self._up.wait(left):
                    raise
        r = frame.msg.give_back_result
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
        with self._link_lock:
            if self._stop.is_set():
                return  # already closed
            self._stop.set()
            with contextlib.suppress(OSError):  # wakes the reader (a closed link: EBADF)
                self._sock.shutdown(socket.SHUT_RDWR)
        self._reader.join()
        while not self.incoming.empty():
            c = self.incoming.get_nowait()
            if c.sock is not None:
                c.sock.close()
        os.close(self._wake_w)
        os.close(self._wake_r)


def _request(key: _Key) -> str:
    """'offload' / 'give_back': the request a reply key answers (for messages)."""
    return key[0].removesuffix("_result")


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
    """A listening socket plus the agent: `accept()` returns either kind of connection.

    Fresh clients never depend on the agent: while it is away `accept()` keeps returning
    them, and handed-in or returned connections resume once the link is back.
    """

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
                  app_state: bytes = b"", wait: float = GIVE_BACK_WAIT_S) -> None:
        self.agent.give_back(sock, handoff_id, preread, app_state, wait)

    def close(self) -> None:
        """Close the agent link and the listening socket (the Server owns both)."""
        self.agent.close()
        self.listener.close()
