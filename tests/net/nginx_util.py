"""Helpers of the nginx tests (nginx itself runs through xo.nginxlab): an fd-passing
stand-in for the xo agent's local API, a keep-alive client that checks every body, and the
site (frontend + backends in a lab) with its curl, counters and wait helpers.

The stand-in speaks proto/xo/v1/local.proto exactly as the agent does towards apps (Hello,
OffloadRequest -> HandedIn + OffloadResult, GiveBack -> Returned + GiveBackResult) but moves
sockets between nginx instances by fd passing only, without TCP_REPAIR: it exercises the
module's whole control flow against real nginx and real clients, independently of the agent.
"""

from __future__ import annotations

import array
import contextlib
import http.client
import ipaddress
import itertools
import os
import re
import selectors
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

from xo import nginxlab
from xo.lab import Host, Lab
from xo.nginx_bench import wrk_requests
from xo.nginxlab import Nginx
from xo.v1 import local_pb2, offload_pb2

HEADER = struct.Struct("!I")
FD_SIZE = array.array("i").itemsize
STOP_TIMEOUT_S = 10.0
HTTP_PORT = 80
HTTP_TIMEOUT_S = 10.0
WRK_THREADS = 2
WRK_TIMEOUT_S = 60
POLL_S = 0.1
LOG_TAIL = 4000  # characters of each log printed when a site fails
CONNECTED = "handoff: connected to agent"
BACKEND_PORT = 8080
FILES = {"small.bin": 1000, "64k.bin": 64 * 1024, "1m.bin": 1024 * 1024}
BACK_WORKERS = 2


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
            got = nginxlab.fingerprint(body)
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


def reload_during_traffic(
    site: Site, name: str, seconds: float, connections: int, pause: float
) -> Traffic:
    """keepalive_traffic on `name` while the frontend, then (after `pause`) the backends get a
    HUP; returns its outcome once the old workers of every nginx have exited."""
    result: list[Traffic] = []
    args = (site.client, str(site.lab.vip4), f"/files/{name}", site.files[name])
    traffic = threading.Thread(
        target=lambda: result.append(keepalive_traffic(*args, seconds, connections))
    )
    traffic.start()
    try:
        time.sleep(pause)
        site.front.reload()
        time.sleep(pause)
        for b in site.backs:
            b.reload()
    finally:
        traffic.join()
    for n in site.nginx:  # the old workers finished and exited
        wait_for(f"{n.host.name} workers", lambda n=n: len(n.worker_pids()), n.workers)
    (t,) = result
    return t


@dataclass
class Site:
    """A frontend nginx and its backends in a lab, serving `files` (name -> size, sha256)."""

    lab: Lab
    front: Nginx
    backs: list[Nginx]
    files: dict[str, tuple[int, str]]
    directory: Path

    @property
    def client(self) -> Host:
        return self.lab.clients[0]

    @property
    def nginx(self) -> tuple[Nginx, ...]:
        return (self.front, *self.backs)

    def url(self, name: str, v6: bool = False) -> str:
        host = f"[{self.lab.vip6}]" if v6 else str(self.lab.vip4)
        return f"http://{host}/files/{name}"


@contextlib.contextmanager
def files_lab(prefix: str) -> Iterator[tuple[Lab, Path, dict[str, tuple[int, str]]]]:
    """A lab (c0, f0, b0, b1) and a directory nginx can read whose www/files holds FILES
    (returned as name -> size, sha256); both are removed afterwards."""
    directory = nginxlab.shared_dir(prefix)
    files = nginxlab.make_files(directory / "www" / "files", FILES)
    try:
        with Lab(clients=1, frontends=1, backends=2) as lab:
            yield lab, directory, files
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def http_nginx(
    lab: Lab,
    directory: Path,
    module: Path,
    targets: Iterable[str],
    options: str,
    agent_path: Callable[[Host], Path],
    front_workers: int = 1,
    back_stub: bool = False,
) -> tuple[Nginx, list[Nginx]]:
    """The plain-HTTP site of a files_lab: front_server on f0, handoff_in backends on v4 and
    v6 naming themselves in X-Served-By (and a /stub if back_stub); not started."""
    www = directory / "www"
    return nginxlab.lab_nginx(
        lab,
        directory,
        module,
        front_server(lab, www, targets, options),
        lambda b: nginxlab.backend_server(
            b, www, BACKEND_PORT, v6=True, served_by=True, stub=back_stub
        ),
        agent_path,
        front_workers,
        BACK_WORKERS,
    )


def front_server(lab: Lab, www: Path, targets: Iterable[str], options: str) -> str:
    """The frontend's server{} on VIP:80 (v4 and v6): /files/ handed off to `targets` with the
    extra handoff `options` lines, X-Served-By f0 when served locally, /stub status."""
    return f"""
    server {{
        listen {lab.vip4}:{HTTP_PORT};
        listen [{lab.vip6}]:{HTTP_PORT};
        root {www};
        add_header X-Served-By f0 always;
        location /files/ {{
            handoff_out;
{nginxlab.handoff_targets(targets)}
{options}
        }}
        location = /stub {{ stub_status; }}
    }}"""


@contextlib.contextmanager
def serving(site: Site, logs: Callable[[], str] = str) -> Iterator[Site]:
    """Run the site's nginx; on a failure print their error logs and `logs()` (pytest shows
    them); after success, no alert/crit/emerg line in any error.log."""
    with nginxlab.running(*site.nginx):
        try:
            yield site
        except BaseException:
            for n in site.nginx:
                print(f"--- nginx {n.host.name}\n{n.log_text()[-LOG_TAIL:]}")
            print(logs())
            raise
        for n in site.nginx:
            assert n.bad_log_lines() == [], n.host.name


def wait_for(what: str, probe: Callable[[], object], want: object, timeout: float = 20.0) -> None:
    """Poll until probe() == want; fails naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    while (got := probe()) != want:
        assert time.monotonic() < deadline, f"{what}: {got} != {want}"
        time.sleep(POLL_S)


def wait_connected(nginx: Iterable[Nginx], timeout: float, at_least: int | None = None) -> None:
    """Until every worker of every nginx (or `at_least` hellos each) reached its agent."""
    for n in nginx:
        want = n.workers if at_least is None else at_least

        def hellos(n: Nginx = n, want: int = want) -> int:
            return min(n.log_text().count(CONNECTED), want)

        wait_for(f"{n.host.name} agent hellos", hellos, want, timeout)


def fd_counts(site: Site) -> dict[str, int]:
    """File descriptors held by the workers of each nginx of the site."""
    return {n.host.name: n.open_fds() for n in site.nginx}


def stub_active(site: Site) -> int:
    """Active connections of the frontend's /stub (stub_status), the probe's own included."""
    res = site.client.run(["curl", "-sS", f"http://{site.lab.vip4}/stub"], timeout=10)
    return int(re.search(r"Active connections: (\d+)", res.stdout).group(1))  # type: ignore[union-attr]


def rst_counts(
    lab: Lab, client_counters: Sequence[str], server_counters: Sequence[str]
) -> dict[str, int]:
    """nstat reset/abort counters: `client_counters` on the clients, the others elsewhere."""
    out = {}
    for h in lab.hosts:
        counters = h.nstat()
        names = client_counters if h in lab.clients else server_counters
        out.update({f"{h.name}.{k}": counters.get(k, 0) for k in names})
    return out


def curl_files(
    site: Site, urls: list[str], names: list[str], extra: Sequence[str] = (), timeout: float = 60
) -> tuple[list[str], int]:
    """GET urls in order with one curl (keep-alive), each body checked against site.files of
    its name; returns the X-Served-By header of each response and curl's TCP connects."""
    out = site.directory / "curl"
    out.mkdir(exist_ok=True)
    argv = ["curl", "-sS", "--http1.1", "--fail", *extra]
    argv += ["-D", str(out / "headers"), "-w", "%{num_connects}\n"]
    for i, url in enumerate(urls):
        argv += ["-o", str(out / f"body{i}"), url]
    res = site.client.run(argv, timeout=timeout)
    for i, name in enumerate(names):
        assert nginxlab.fingerprint((out / f"body{i}").read_bytes()) == site.files[name], name
    served = re.findall(r"^X-Served-By: (\S+)", (out / "headers").read_text(), re.M)
    return served, sum(int(x) for x in res.stdout.split())


def assert_round_robin(
    site: Site, names: list[str], v6: bool, rsts: Callable[[Site], dict[str, int]]
) -> None:
    """GET names on one keep-alive connection: each request handed off to the next backend in
    turn, each body exact, no counter of rsts(site) moved, the access logs agreeing."""
    before = rsts(site)
    served, connects = curl_files(site, [site.url(n, v6) for n in names], names)
    assert connects == 1  # one client connection throughout
    backs = len(site.backs)
    assert served == [site.backs[i % backs].host.name for i in range(len(names))]
    assert rsts(site) == before
    assert [r["hs"] for r in site.front.access()] == ["out"] * len(names)
    for i, back in enumerate(site.backs):
        rows = back.access()
        assert [r["hs"] for r in rows] == ["in"] * len(names[i::backs])
        assert [int(r["bytes"]) for r in rows] == [FILES[n] for n in names[i::backs]]


def wrk_leaves_no_leak(site: Site, name: str, connections: int, seconds: int, wait: float) -> None:
    """wrk GETs `name` over persistent connections: requests done without socket errors or
    non-2xx; within `wait` the frontend's stub_status counts only the probe's own connection
    and every nginx's workers hold the fds they held before."""
    base_fds = fd_counts(site)
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", site.url(name)]
    out = site.client.run(argv, timeout=WRK_TIMEOUT_S).stdout
    assert wrk_requests(out) > 0, out  # socket errors or non-2xx responses raise
    wait_for("frontend stub_status active", lambda: stub_active(site), 1, wait)
    wait_for("worker fds", lambda: fd_counts(site), base_fds, wait)
