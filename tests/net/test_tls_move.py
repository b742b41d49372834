"""xo.tls.move on this host's kernel (no kTLS): plain TCP connections move F -> B -> F through
the nftables datapath stand-in, and a TLS connection, which can only be terminated in user
space here, is served locally and refused by move() with the reason.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import threading
import time
from collections.abc import Iterator

import pytest
from lab_kit import assert_no_resets, connect, recv_exact, rst_counts

from xo.flow import Endpoint
from xo.lab import Lab
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
HOST = "xo.test"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(clients=1, frontends=1, backends=1) as lab:
        yield lab


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_plain_tcp_moves_there_and_back(lab: Lab, family: int) -> None:
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    before = rst_counts(c, f, b)
    server, client, home = connect(lab, PORT, IO_TIMEOUT_S, family)
    away = Place(b, Endpoint(b.ip4 if family == 4 else b.ip6, BACK_PORT))
    addr = client.getsockname()
    path = FlowPath(home, Endpoint(ipaddress.ip_address(addr[0]), addr[1]))
    try:
        for hop, dst in enumerate((away, home)):
            server.sendall(b"before %d" % hop)
            assert recv_exact(client, 8) == b"before %d" % hop
            path.freeze()
            client.sendall(b"during %d" % hop)  # dropped, retransmitted to the moved socket
            time.sleep(SETTLE_S)
            server, times = move(server, path, dst)
            assert server.getsockname()[:2] == dst.local.sockaddr()
            assert times.tls_install_us < times.blackout_us
            server.settimeout(IO_TIMEOUT_S)
            assert recv_exact(server, 8) == b"during %d" % hop
            server.sendall(b"after %d" % hop)
            assert recv_exact(client, 7) == b"after %d" % hop
    finally:
        server.close()
        client.close()
        path.close()
    assert_no_resets(before, c, f, b, settle=SETTLE_S)
    assert "xo_tls" not in f.run(["nft", "list", "ruleset"]).stdout + b.run(
        ["nft", "list", "ruleset"]).stdout  # every rule removed


def test_user_space_tls_is_served_locally_and_never_moved(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if unavailable_reason() is None:
        pytest.skip("this kernel has kTLS: the local-only path needs a kernel without it")
    files = DevCA().write(tmp_path_factory.mktemp("pki"), HOST)
    front = TlsFrontend(ServerTls(files.cert, files.key))
    raw, client, home = connect(lab, PORT, IO_TIMEOUT_S)
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
