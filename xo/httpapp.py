"""A small HTTP/1.1 app pair built on xo.app: the demo's and the net tests' real workload.

The frontend serves small responses itself and offloads requests for large ones to a backend
(round robin), handing over the request it already read. A backend serves the handed-in
request, waits until the client acknowledged every byte (so nothing of the response goes back
through the frontend in the captured send queue), and gives the connection back with whatever
the client sent meanwhile (the next request). Keep-alive connections therefore move
frontend -> backend -> frontend -> ... while the client sees one ordinary connection.

GET /size/N returns N bytes of `body(N)`; the `X-Served-By` header names the host.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from xo import uapi
from xo.agent.labkit import LabAgents
from xo.app import AgentError, AgentUnavailable, Connection, Kind, Server
from xo.lab import Host, Lab

log = logging.getLogger("xo.httpapp")

PATTERN = bytes(range(256))
MAX_HEADER = 16 * 1024
RECV_SIZE = 64 * 1024
# Responses up to this size are cheaper to send than to hand off.
DEFAULT_SMALL = 16 * 1024
DRAIN_POLL_S = 0.0005
DRAIN_TIMEOUT_S = 5.0
ACCEPT_POLL_S = 0.2
# A client silent for this long is gone; no worker thread waits on it forever.
IDLE_TIMEOUT_S = 30.0
# How long a backend waits for the next keep-alive request before giving a connection back.
NEXT_REQUEST_WAIT_S = 0.05
_INT = struct.Struct("i")


class BadRequest(ValueError):
    """A request this app cannot parse or serve."""


def body(n: int) -> bytes:
    """The deterministic body of /size/n (clients check it byte for byte)."""
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def split_request(buf: bytes) -> tuple[bytes, bytes] | None:
    """(one request, the rest) if buf holds a whole GET request; None if it needs more."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEADER:
            raise BadRequest("request header too large")
        return None
    return buf[: end + 4], buf[end + 4 :]


def parse(request: bytes) -> tuple[int, bool]:
    """(size asked for, keep-alive) of 'GET /size/N HTTP/1.1'."""
    line, _, headers = request.partition(b"\r\n")
    parts = line.split()
    if len(parts) != 3 or parts[0] != b"GET" or not parts[1].startswith(b"/size/"):
        raise BadRequest(f"unsupported request line {line[:80]!r}")
    try:
        size = int(parts[1][len(b"/size/") :])
    except ValueError:
        raise BadRequest(f"bad size in {line[:80]!r}") from None
    close = b"connection: close" in headers.lower()
    return size, parts[2] == b"HTTP/1.1" and not close


def response(size: int, host: str, keep_alive: bool) -> bytes:
    head = (f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: "
            f"application/octet-stream\r\nX-Served-By: {host}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode() + body(size)


def wait_acked(sock: socket.socket, timeout: float = DRAIN_TIMEOUT_S) -> bool:
    """Wait until the send queue is empty (every byte acknowledged by the client)."""
    deadline = time.monotonic() + timeout
    buf = bytearray(_INT.size)
    while time.monotonic() < deadline:
        fcntl.ioctl(sock.fileno(), uapi.SIOCOUTQ, buf)
        if _INT.unpack(buf)[0] == 0:
            return True
        time.sleep(DRAIN_POLL_S)
    return False


@dataclass
class Stats:
    """What a host served; the demo's summary and the tests read it."""

    requests: int = 0
    bytes: int = 0
    offloaded: int = 0
    refused: int = 0
    handoff_ms: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def served(self, nbytes: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += nbytes


class HttpApp:
    """The shared accept loop: one thread per connection, whatever its kind."""

    def __init__(self, server: Server, name: str,
                 on_request: Callable[[str, int], None] | None = None) -> None:
        self.server = server
        self.name = name
        self.on_request = on_request  # (host, size) after each response: live progress
        self.stats = Stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"http-{name}", daemon=True)
        self._workers: set[threading.Thread] = set()

    def start(self) -> HttpApp:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self.server.accept(timeout=ACCEPT_POLL_S)
            except OSError:
                return
            if conn is None:
                continue
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self._workers.add(t)
            t.start()

    def _run(self, conn: Connection) -> None:
        if conn.sock is not None:
            conn.sock.settimeout(IDLE_TIMEOUT_S)
        try:
            self.handle(conn)
        except (OSError, BadRequest, AgentError) as e:
            log.info("%s: connection ended: %s", self.name, e)
            if conn.sock is not None:
                conn.sock.close()
        finally:
            self._workers.discard(threading.current_thread())

    def handle(self, conn: Connection) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        for t in list(self._workers):
            t.join(DRAIN_TIMEOUT_S)
        self.server.close()


def _read_request(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
    while True:
        got = split_request(buf)
        if got is not None:
            return got
        data = sock.recv(RECV_SIZE)
        if not data:
            return None
        buf += data


class Frontend(HttpApp):
    """Serves small responses, offloads large ones to `backends` round robin."""

    def __init__(self, server: Server, name: str, backends: list[str],
                 small: int = DEFAULT_SMALL,
                 on_request: Callable[[str, int], None] | None = None,
                 backend_app: str = "") -> None:
        super().__init__(server, name, on_request)
        self.small = small
        self.backend_app = backend_app  # the app name on the backends; empty: ours
        self._rr = itertools.cycle(backends) if backends else None
        self._rr_lock = threading.Lock()

    def _next_backend(self) -> str | None:
        with self._rr_lock:
            return next(self._rr) if self._rr else None

    def handle(self, conn: Connection) -> None:
        if conn.kind == Kind.CLOSED or conn.sock is None:
            return  # the client left while a backend had it: the agents cleaned up
        sock, buf = conn.sock, conn.preread
        while True:
            got = _read_request(sock, buf)
            if got is None:
                sock.close()
                return
            request, buf = got
            size, keep_alive = parse(request)
            target = self._next_backend() if size > self.small else None
            if target is not None:
                t0 = time.perf_counter()
                try:
                    # the body size: the agent's policy gives large transfers a hardware rule
                    res = self.server.offload(sock, target, preread=request + buf,
                                              app=self.backend_app, expected_bytes=size)
                    refusal = res.detail
                except AgentUnavailable as e:  # the agent is restarting: nothing was sent
                    res, refusal = None, str(e)
                if res is not None and res.accepted:
                    sock.close()  # at once: the 4-tuple must be free when the flow returns
                    with self.stats.lock:
                        self.stats.offloaded += 1
                        self.stats.handoff_ms.append((time.perf_counter() - t0) * 1000)
                    return  # the connection comes back as a new Connection (RETURNED)
                with self.stats.lock:
                    self.stats.refused += 1
                log.warning("offload to %s refused (%s): serving locally", target, refusal)
            data = response(size, self.name, keep_alive)
            sock.sendall(data)
            self.stats.served(len(data))
            if self.on_request:
                self.on_request(self.name, size)
            if not keep_alive:
                sock.close()
                return


class Backend(HttpApp):
    """Serves handed-in requests, then gives each connection back to its owner."""

    def handle(self, conn: Connection) -> None:
        if conn.kind != Kind.HANDED_IN or conn.sock is None:
            if conn.sock is not None:  # a fresh client on the backend's own port: not ours
                conn.sock.close()
            return
        sock = conn.sock
        got = split_request(conn.preread)
        if got is None:
            raise BadRequest("handed-in connection without a whole request")
        request, rest = got
        size, keep_alive = parse(request)
        data = response(size, self.name, keep_alive)
        sock.sendall(data)
        self.stats.served(len(data))
        if self.on_request:
            self.on_request(self.name, size)
        wait_acked(sock)
        if keep_alive:
            rest = self._next_request(sock, rest)
        self.server.give_back(sock, conn.handoff_id, preread=rest)
        sock.close()

    @staticmethod
    def _next_request(sock: socket.socket, buf: bytes) -> bytes:
        """Wait briefly for the client's next request, to hand it over as preread.

        A keep-alive client sends its next request right after a response; given back while
        that request is in flight, it is dropped by the capture's block and resent only after
        the client's loss-probe timer (~200 ms). Read first, and the client is idle during the
        return, as it is during the offload. Bytes never read travel in the captured state.
        """
        sock.settimeout(NEXT_REQUEST_WAIT_S)
        try:
            while split_request(buf) is None:
                data = sock.recv(RECV_SIZE)
                if not data:
                    break  # the client closed: the agent sees it and ends the flow
                buf += data
        except TimeoutError:
            pass  # an idle client: give back now
        finally:
            sock.settimeout(IDLE_TIMEOUT_S)
        return buf


HTTP_PORT = 80


@dataclass
class LabApps:
    """The app pair running in a lab: a Frontend on the v4 VIP, a Backend per backend host."""

    frontend: Frontend
    backends: list[Backend]

    def stop(self) -> None:
        for a in [self.frontend, *self.backends]:
            a.stop()


def listener(h: Host, addr: str, port: int) -> socket.socket:
    with h.enter():
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        return socket.create_server((addr, port), family=family, backlog=1024)


@contextmanager
def lab_apps(lab: Lab, agents: LabAgents, small: int = DEFAULT_SMALL,
             on_request: Callable[[str, int], None] | None = None) -> Iterator[LabApps]:
    """Start the apps against the lab's agents (app name "http"); stop them at exit."""
    f = lab.frontends[0]
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, [b.name for b in lab.backends], small=small, on_request=on_request)
    bes = [Backend(Server(listener(b, str(b.ip4), HTTP_PORT), agents.socket_path(b), "http"),
                   b.name, on_request) for b in lab.backends]
    apps = LabApps(fe, bes)
    for a in [fe, *bes]:
        a.start()
    try:
        yield apps
    finally:
        apps.stop()
