"""TLS offload end to end on Debian's stock kernel (VM tier), with unmodified clients.

One keep-alive TLS connection per case: the frontend f0 terminates TLS (user-space handshake,
then kTLS, xo.tls.TlsFrontend) and serves the first request; the connection moves to the
backend b0 (TCP_REPAIR + kTLS restore in b0's namespace, on b0's own address), which serves
the next two; then it comes back to f0 for the last. Clients: `openssl s_client`,
`curl --cacert`, Python ssl; every TLS version and cipher kTLS implements. Checked: byte-exact
bodies, who served each request (the socket's namespace/address), one TCP connection, the
client's TLS session never errors, zero RST counted in every namespace.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from lab_kit import assert_no_resets, rst_counts

from xo.flow import Endpoint
from xo.lab import Lab
from xo.pki import DevCA
from xo.tls import ServerTls, TlsFrontend, recv
from xo.tls.move import FlowPath, MoveTimes, Place, move

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("ktls")]

HOST = "xo.test"
PORT, BACK_PORT = 443, 9443
PLAN = ["f0", "b0", "b0", "f0"]  # who serves request i
SIZES = [1000, 200_000, 3000, 70_000]
IO_TIMEOUT_S = 60.0
SETTLE_S = 0.3
HEADER_END = b"\r\n\r\n"


def body(i: int) -> bytes:
    return random.Random(i).randbytes(SIZES[i])


@dataclass
class PlanServer:
    """Serves one TLS connection: request i on the host PLAN[i], moving it in between."""

    lab: Lab
    front: TlsFrontend
    family: int = 4
    served: list[tuple[str, str]] = field(default_factory=list)
    moves: list[MoveTimes] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        f, b, v4 = self.lab.frontends[0], self.lab.backends[0], self.family == 4
        self.home = Place(f, Endpoint(self.lab.vip4 if v4 else self.lab.vip6, PORT))
        self.away = Place(b, Endpoint(b.ip4 if v4 else b.ip6, BACK_PORT))
        with f.enter():
            self.lsock = socket.create_server(
                self.home.local.sockaddr(), family=socket.AF_INET if v4 else socket.AF_INET6)
        self.lsock.settimeout(IO_TIMEOUT_S)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # reported by join()
            self.error = e

    def _serve(self) -> None:
        raw, addr = self.lsock.accept()
        self.lsock.close()
        conn = self.front.accept(raw)
        path = FlowPath(self.home, Endpoint(ipaddress.ip_address(addr[0]), addr[1]))
        at, buf = self.home, b""
        try:
            for i, who in enumerate(PLAN):
                request, buf = read_request(conn, buf)
                assert request.startswith(b"GET /%d " % i), request[:80]
                dst = self.home if who == self.home.host.name else self.away
                if dst is not at:
                    conn, times = move(conn, path, dst)
                    self.moves.append(times)
                    at = dst
                self.served.append((at.host.name, str(ipaddress.ip_address(conn.getsockname()[0]))))
                data = body(i)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Served-By: %s\r\n\r\n"
                    % (len(data), at.host.name.encode()) + data
                )
            while recv(conn, 4096):  # until the client's close_notify or FIN
                pass
        finally:
            conn.close()
            path.close()

    def join(self) -> None:
        self.thread.join(IO_TIMEOUT_S)
        assert not self.thread.is_alive(), "server thread stuck"
        if self.error is not None:
            raise self.error


def read_request(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    while HEADER_END not in buf:
        chunk = recv(conn, 65536)
        if not chunk:
            raise EOFError("client closed before a full request")
        buf += chunk
    head, _, rest = buf.partition(HEADER_END)
    return head, rest


def request(i: int) -> bytes:
    return b"GET /%d HTTP/1.1\r\nHost: %s\r\nConnection: keep-alive\r\n\r\n" % (i, HOST.encode())


def read_response(stream: Callable[[int], bytes]) -> bytes:
    """Body of one response read through `stream(n)` (exactly n bytes)."""
    head = b""
    while not head.endswith(HEADER_END):
        head += stream(1)
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    return stream(length)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerTls, Path]:
    files = DevCA().write(tmp_path_factory.mktemp("pki"), HOST)
    return ServerTls(files.cert, files.key, timeout=IO_TIMEOUT_S), files.ca


def _check(lab: Lab, server: PlanServer, before: dict[str, int]) -> None:
    server.join()
    f, b = lab.frontends[0], lab.backends[0]
    addr = {f.name: str(server.home.local.ip), b.name: str(server.away.local.ip)}
    assert server.served == [(who, addr[who]) for who in PLAN]
    assert len(server.moves) == 2
    assert_no_resets(before, lab.clients[0], f, b, settle=SETTLE_S)


TLS12 = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
         "ECDHE-ECDSA-CHACHA20-POLY1305"]
TLS13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
CASES = [("1.2", c) for c in TLS12] + [("1.3", c) for c in TLS13]


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=[c for _, c in CASES])
def test_openssl_s_client(lab: Lab, pki: tuple[ServerTls, Path], version: str,
                          cipher: str) -> None:
    config, ca = pki
    c = lab.clients[0]
    before = rst_counts(c, lab.frontends[0], lab.backends[0])
    server = PlanServer(lab, TlsFrontend(config))
    flags = ["-tls1_2", "-cipher", cipher] if version == "1.2" else [
        "-tls1_3", "-ciphersuites", cipher]
    client = c.popen(
        ["openssl", "s_client", "-connect", f"{lab.vip4}:{PORT}", "-servername", HOST,
         "-CAfile", str(ca), "-verify_return_error", "-quiet", *flags],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert client.stdin is not None and client.stdout is not None
    out = client.stdout

    def exact(n: int) -> bytes:
        data = out.read(n)
        assert len(data) == n, "s_client output ended early"
        return data

    try:
        for i in range(len(PLAN)):
            client.stdin.write(request(i))
            client.stdin.flush()
            assert read_response(exact) == body(i), f"response {i} differs"
        assert client.poll() is None, "s_client exited: its TLS session failed"
    finally:
        client.kill()
        _, err = client.communicate()
    assert not re.search(rb"error|alert", err, re.IGNORECASE), err
    _check(lab, server, before)


@pytest.mark.parametrize(("version", "cipher"), CASES, ids=[c for _, c in CASES])
def test_curl(lab: Lab, pki: tuple[ServerTls, Path], tmp_path: Path, version: str,
              cipher: str) -> None:
    config, ca = pki
    c = lab.clients[0]
    before = rst_counts(c, lab.frontends[0], lab.backends[0])
    server = PlanServer(lab, TlsFrontend(config))
    flags = ["--tlsv1.2", "--tls-max", "1.2", "--ciphers", cipher] if version == "1.2" else [
        "--tlsv1.3", "--tls13-ciphers", cipher]
    transfers: list[str] = []
    for i in range(len(PLAN)):
        transfers += ["-o", str(tmp_path / f"body{i}"), f"https://{HOST}:{PORT}/{i}"]
    p = c.run(
        ["curl", "-sS", "--http1.1", "--cacert", str(ca), "--resolve",
         f"{HOST}:{PORT}:{lab.vip4}", "-w", "%{num_connects} %{http_code}\\n", *flags,
         *transfers],
        check=False, timeout=IO_TIMEOUT_S,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:-1] == ["1 200"] + ["0 200"] * (len(PLAN) - 1)  # one connection
    for i in range(len(PLAN)):
        assert (tmp_path / f"body{i}").read_bytes() == body(i), f"body {i} differs"
    _check(lab, server, before)


def client_context(ca: Path, version: str, cipher: str) -> ssl.SSLContext:
    """Python ssl verifying with `ca`: TLS 1.2 with `cipher`, or TLS 1.3 ("1.3", its default
    suites)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher)
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


PY_CASES = [("1.2", c, 4) for c in TLS12] + [("1.3", "default", 4), ("1.3", "default", 6)]


@pytest.mark.parametrize(("version", "cipher", "family"), PY_CASES,
                         ids=[f"{c}-ipv{f}" for _, c, f in PY_CASES])
def test_python_ssl(lab: Lab, pki: tuple[ServerTls, Path], version: str, cipher: str,
                    family: int) -> None:
    config, ca = pki
    c = lab.clients[0]
    before = rst_counts(c, lab.frontends[0], lab.backends[0])
    server = PlanServer(lab, TlsFrontend(config), family)
    ctx = client_context(ca, version, cipher)
    with c.enter():
        raw = socket.create_connection(server.home.local.sockaddr(), timeout=IO_TIMEOUT_S)
    with ctx.wrap_socket(raw, server_hostname=HOST) as tls:
        reader = tls.makefile("rb")
        for i in range(len(PLAN)):
            tls.sendall(request(i))
            assert read_response(reader.read) == body(i), f"response {i} differs"
        reader.close()
    _check(lab, server, before)
