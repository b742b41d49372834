"""Helpers of the nginx net tests (nginx itself runs through xo.nginxlab): an fd-passing
stand-in for the xo agent's local API, and a keep-alive client that checks every body.

The stand-in speaks proto/xo/v1/local.proto exactly as the agent does towards apps (Hello,
OffloadRequest -> HandedIn + OffloadResult, GiveBack -> Returned + GiveBackResult) but moves
sockets between nginx instances by fd passing only, without TCP_REPAIR: it exercises the
module's whole control flow against real nginx and real clients, independently of the agent.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import http.client
import ipaddress
import itertools
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from xo.lab import Host
from xo.v1 import local_pb2, offload_pb2

HEADER = struct.Struct("!I")
FD_SIZE = array.array("i").itemsize
STOP_TIMEOUT_S = 10.0
HTTP_PORT = 80
HTTP_TIMEOUT_S = 10.0


def _endpoint(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> offload_pb2.Endpoint:
    return offload_pb2.Endpoint(addr=ipaddress.ip_address(sockaddr[0]).packed, port=sockaddr[1])


@dataclass(eq=False)
class _AppConn:
    sock: socket.socket
    host: str
    accepts: bool = False


class StandInAgent:
    """Per-host agent sockets in one thread; routes sockets between hosts by fd passing.

    `targets` maps an OffloadRequest target ("ADDR:PORT") to the host name serving it.
    """

    def __init__(self, directory: Path, hosts: list[str], targets: dict[str, str]) -> None:
        self.paths = {h: directory / f"agent-{h}.sock" for h in hosts}
        self.targets = targets
        self.refuse = False
        self.handed_in: dict[str, int] = {h: 0 for h in hosts}
        self.returned = 0
        self.errors: list[str] = []
        self._owners: dict[str, str] = {}
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self._conns: list[_AppConn] = []
        self._listeners: dict[socket.socket, str] = {}
        self._sel = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="stand-in-agent", daemon=True)

    def path(self, host: str) -> Path:
        return self.paths[host]

    def start(self) -> StandInAgent:
        for host, path in self.paths.items():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(str(path))
            path.chmod(0o666)  # nginx workers run as nobody
            lsock.listen(64)
            self._listeners[lsock] = host
            self._sel.register(lsock, selectors.EVENT_READ)
        self._sel.register(self._stop_r, selectors.EVENT_READ)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(STOP_TIMEOUT_S)
        for lsock, host in self._listeners.items():
            lsock.close()
            with contextlib.suppress(FileNotFoundError):
                self.paths[host].unlink()
        for conn in self._conns:
            conn.sock.close()
        self._sel.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def __enter__(self) -> StandInAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            for key, _ in self._sel.select():
                if key.fileobj == self._stop_r:
                    return
                if key.fileobj in self._listeners:
                    sock, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    conn = _AppConn(sock, self._listeners[key.fileobj])  # type: ignore[index]
                    self._conns.append(conn)
                    self._sel.register(sock, selectors.EVENT_READ, conn)
                    continue
                conn = key.data
                if conn not in self._conns:  # dropped earlier in this batch
                    continue
                try:
                    msg, fd = self._read_frame(conn.sock)
                except ConnectionError:  # the worker exited (or reloaded)
                    self._drop(conn, "closed")
                    continue
                except (OSError, ValueError) as e:
                    self._drop(conn, str(e))
                    continue
                try:
                    self._handle(conn, msg, fd)
                except Exception as e:  # noqa: BLE001 - recorded and checked by the tests
                    self.errors.append(f"{type(e).__name__}: {e}")

    def _drop(self, conn: _AppConn, why: str) -> None:
        if conn not in self._conns:
            return
        if why != "closed":
            self.errors.append(why)
        self._sel.unregister(conn.sock)
        conn.sock.close()
        self._conns.remove(conn)

    @staticmethod
    def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
        buf = b""
        while len(buf) < n:
            data, anc, _, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(4 * FD_SIZE))
            if not data:
                raise ConnectionError("closed")
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(raw[: len(raw) - len(raw) % FD_SIZE])
                    fds.extend(arr)
            buf += data
        return buf

    def _read_frame(self, sock: socket.socket) -> tuple[local_pb2.LocalMessage, int | None]:
        fds: list[int] = []
        (length,) = HEADER.unpack(self._recv_exact(sock, HEADER.size, fds))
        body = self._recv_exact(sock, length, fds)
        if len(fds) > 1:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"frame carried {len(fds)} fds")
        return local_pb2.LocalMessage.FromString(body), (fds[0] if fds else None)

    @staticmethod
    def _send(conn: _AppConn, msg: local_pb2.LocalMessage, fd: int | None = None) -> None:
        body = msg.SerializeToString()
        anc = []
        if fd is not None:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        conn.sock.sendmsg([HEADER.pack(len(body)) + body], anc)

    def _deliver(self, host: str, msg: local_pb2.LocalMessage, fd: int) -> str | None:
        """Send msg + fd to one accepting connection of host (round robin), skipping ones that
        went away (an exiting nginx worker); returns the host or None."""
        while conns := [c for c in self._conns if c.host == host and c.accepts]:
            conn = conns[next(self._rr) % len(conns)]
            try:
                self._send(conn, msg, fd)
                return host
            except OSError:
                self._drop(conn, "closed")
        return None

    @staticmethod
    def _flow(fd: int) -> offload_pb2.Flow:
        with socket.socket(fileno=os.dup(fd)) as s:
            peer, local = s.getpeername(), s.getsockname()
        return offload_pb2.Flow(client=_endpoint(peer), vip=_endpoint(local))

    def _handle(self, conn: _AppConn, msg: local_pb2.LocalMessage, fd: int | None) -> None:
        kind = msg.WhichOneof("body")
        try:
            if kind == "hello":
                conn.accepts = msg.hello.accept_connections
                self._send(
                    conn,
                    local_pb2.LocalMessage(
                        hello_reply=local_pb2.HelloReply(ok=True, agent=f"stand-in-{conn.host}")
                    ),
                )
            elif kind == "offload":
                self._offload(conn, msg.offload, fd)
            elif kind == "give_back":
                self._give_back(conn, msg.give_back, fd)
            else:
                self.errors.append(f"unexpected {kind} from {conn.host}")
        finally:
            if fd is not None:
                os.close(fd)

    def _offload(self, conn: _AppConn, req: local_pb2.OffloadRequest, fd: int | None) -> None:
        target_host = self.targets.get(req.target)
        hid = f"{conn.host}-{next(self._ids)}"
        delivered = None
        if fd is not None and target_host is not None and not self.refuse:
            handed_in = local_pb2.HandedIn(
                handoff_id=hid, flow=self._flow(fd), preread=req.preread, app_state=req.app_state
            )
            delivered = self._deliver(target_host, local_pb2.LocalMessage(handed_in=handed_in), fd)
        if delivered:
            self._owners[hid] = conn.host
            self.handed_in[delivered] += 1
        result = local_pb2.OffloadResult(
            request_id=req.request_id,
            accepted=delivered is not None,
            handoff_id=hid if delivered else "",
            reason=offload_pb2.REASON_UNSPECIFIED if delivered else offload_pb2.REFUSED,
        )
        self._send(conn, local_pb2.LocalMessage(offload_result=result))

    def _give_back(self, conn: _AppConn, gb: local_pb2.GiveBack, fd: int | None) -> None:
        owner = self._owners.get(gb.handoff_id)
        ok = False
        detail = "owner not reachable"
        try:
            flow = self._flow(fd) if fd is not None else None
        except OSError as e:  # the client reset it (e.g. wrk stopping): nothing to give back
            flow, owner, detail = None, None, f"connection gone: {e.strerror}"
        if fd is not None and owner is not None:
            returned = local_pb2.Returned(
                handoff_id=gb.handoff_id,
                flow=flow,
                reason=offload_pb2.DONE,
                preread=gb.preread,
                app_state=gb.app_state,
            )
            ok = self._deliver(owner, local_pb2.LocalMessage(returned=returned), fd) is not None
        if ok:
            del self._owners[gb.handoff_id]
            self.returned += 1
        result = local_pb2.GiveBackResult(
            handoff_id=gb.handoff_id, ok=ok, detail="" if ok else detail
        )
        self._send(conn, local_pb2.LocalMessage(give_back_result=result))


class _NetnsHTTPConnection(http.client.HTTPConnection):
    """http.client whose sockets are created inside a lab host."""

    def __init__(self, host: Host, addr: str, port: int) -> None:
        super().__init__(addr, port, timeout=HTTP_TIMEOUT_S)
        self._ns = host

    def connect(self) -> None:
        with self._ns.enter():
            super().connect()


@dataclass
class Traffic:
    """Outcome of keepalive_traffic: `retried` counts requests that found their keep-alive
    connection closed by the server before any response byte (what HTTP clients retry);
    `losses` are failures after the response began, or wrong bodies."""

    ok: int = 0
    retried: int = 0
    losses: list[str] = field(default_factory=list)


def keepalive_traffic(
    host: Host, addr: str, path: str, expect: tuple[int, str], seconds: float, connections: int
) -> Traffic:
    """GET path over `connections` persistent connections for `seconds`, checking every body."""
    result = Traffic()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker() -> None:
        conn = _NetnsHTTPConnection(host, addr, HTTP_PORT)
        while time.monotonic() < end:
            try:
                conn.request("GET", path)
                resp = conn.getresponse()
            except OSError:  # includes RemoteDisconnected: no response byte arrived
                conn.close()
                with lock:
                    result.retried += 1
                continue
            try:
                body = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                with lock:
                    result.losses.append(f"mid-response: {e!r}")
                continue
            got = (len(body), hashlib.sha256(body).hexdigest())
            with lock:
                if resp.status == HTTPStatus.OK and got == expect:
                    result.ok += 1
                else:
                    result.losses.append(f"status {resp.status}, {got[0]} bytes")
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result
