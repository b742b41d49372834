"""xo.tls.move on this host's kernel (no kTLS): plain TCP connections move F -> B -> F through
the nftables datapath stand-in, and a TLS connection, which can only be terminated in user
space here, is served locally and refused by move() with the reason.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from xo.flow import Endpoint
from xo.lab import Host, Lab
from xo.pki import DevCA
from xo.tls import ServerTls, TlsFrontend, TlsRefusedError, unavailable_reason
from xo.tls.move import FlowPath, Place, move

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and TCP_REPAIR need root"),
]

PORT, BACK_PORT = 8443, 9443
IO_TIMEOUT_S = 10.0
SETTLE_S = 0.2
# RSTs sent, and aborts, in every namespace. TcpEstabResets counts any ESTABLISHED -> CLOSE,
# which a silent close in repair mode (the moved-away socket) is too: only the client's counts.
RST_COUNTERS = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose",
                "TcpExtTCPAbortOnTimeout")
CLIENT_RESETS = "TcpEstabResets"
HOST = "xo.test"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(clients=1, frontends=1, backends=1) as lab:
        yield lab


def _rsts(hosts: list[Host]) -> dict[str, int]:
    """hosts[0] is the client."""
    out = {f"{h.name}:{k}": h.nstat().get(k, 0) for h in hosts for k in RST_COUNTERS}
    out[f"{hosts[0].name}:{CLIENT_RESETS}"] = hosts[0].nstat().get(CLIENT_RESETS, 0)
    return out


def _connect(lab: Lab, family: int = 4) -> tuple[socket.socket, socket.socket, Place]:
    f, c = lab.frontends[0], lab.clients[0]
    home = Place(f, Endpoint(lab.vip4 if family == 4 else lab.vip6, PORT))
    with f.enter():
        lsock = socket.create_server(
            home.local.sockaddr(), family=socket.AF_INET if family == 4 else socket.AF_INET6)
    with c.enter():
        client = socket.create_connection(home.local.sockaddr(), timeout=IO_TIMEOUT_S)
    server, _ = lsock.accept()
    lsock.close()
    return server, client, home


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "peer closed"
        out += chunk
    return out


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_plain_tcp_moves_there_and_back(lab: Lab, family: int) -> None:
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    before = _rsts([c, f, b])
    server, client, home = _connect(lab, family)
    away = Place(b, Endpoint(b.ip4 if family == 4 else b.ip6, BACK_PORT))
    addr = client.getsockname()
    path = FlowPath(home, Endpoint(ipaddress.ip_address(addr[0]), addr[1]))
    try:
        for hop, dst in enumerate((away, home)):
            server.sendall(b"before %d" % hop)
            assert _recv_exact(client, 8) == b"before %d" % hop
            path.freeze()
            client.sendall(b"during %d" % hop)  # dropped, retransmitted to the moved socket
            time.sleep(SETTLE_S)
            server, times = move(server, path, dst)
            assert server.getsockname()[:2] == dst.local.sockaddr()
            assert times.tls_install_us < times.blackout_us
            server.settimeout(IO_TIMEOUT_S)
            assert _recv_exact(server, 8) == b"during %d" % hop
            server.sendall(b"after %d" % hop)
            assert _recv_exact(client, 7) == b"after %d" % hop
    finally:
        server.close()
        client.close()
        path.close()
    time.sleep(SETTLE_S)
    after = _rsts([c, f, b])
    assert {k: after[k] - before[k] for k in after} == dict.fromkeys(after, 0)
    assert "xo_tls" not in f.run(["nft", "list", "ruleset"]).stdout + b.run(
        ["nft", "list", "ruleset"]).stdout  # every rule removed


def test_user_space_tls_is_served_locally_and_never_moved(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if unavailable_reason() is None:
        pytest.skip("this kernel has kTLS: the local-only path needs a kernel without it")
    files = DevCA().write(tmp_path_factory.mktemp("pki"), HOST)
    front = TlsFrontend(ServerTls(files.cert, files.key))
    raw, client, home = _connect(lab)
    cctx = ssl.create_default_context(cafile=str(files.ca))
    result: dict[str, bytes] = {}

    def run_client() -> None:
        with cctx.wrap_socket(client, server_hostname=HOST) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
            result["reply"] = tls.recv(100)

    t = threading.Thread(target=run_client)
    t.start()
    conn = front.accept(raw)
    addr = conn.getpeername()
    path = FlowPath(home, Endpoint.parse(f"{addr[0]}:{addr[1]}"))
    try:
        assert conn.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
        with pytest.raises(TlsRefusedError) as e:
            move(conn, path, Place(lab.backends[0], Endpoint(lab.backends[0].ip4, BACK_PORT)))
        assert e.value.reason == TlsRefusedError.NO_KTLS
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")  # still served here
        t.join(IO_TIMEOUT_S)
    finally:
        conn.close()
        path.close()
    assert result["reply"] == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert front.stats["local-no-ktls"] == 1
