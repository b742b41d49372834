"""xo.tcp on bad input, with real sockets: each failure has its own exception type and leaves
no half-built socket behind; the connection that was being captured keeps working."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from xo import tcp
from xo.flow import Endpoint
from xo.lab import Host, Lab

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and TCP_REPAIR need root"),
]


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with Lab(clients=0, frontends=0, backends=1) as lab:
        yield lab.backends[0]


def _pair(family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket, socket.socket]:
    addr = "127.0.0.1" if family == socket.AF_INET else "::1"
    lsock = socket.create_server((addr, 0), family=family)
    client = socket.create_connection(lsock.getsockname()[:2], timeout=5)
    server, _ = lsock.accept()
    server.settimeout(5)
    return lsock, client, server


@contextlib.contextmanager
def _connection(
    host: Host, family: int = socket.AF_INET
) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """In the host's namespace: _pair()'s listener, client and server, all closed afterwards
    (closing one the test released already is harmless)."""
    with host.enter():
        lsock, client, server = _pair(family)
        try:
            yield lsock, client, server
        finally:
            for s in (lsock, client, server):
                s.close()


def _works(a: socket.socket, b: socket.socket) -> None:
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    b.sendall(b"pong")
    assert a.recv(4) == b"pong"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_capture_refuses_listener_udp_and_closed(host: Host) -> None:
    with _connection(host) as (lsock, client, server):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(tcp.NotEstablishedError, match="TCP state 10, not ESTABLISHED"):
            tcp.capture(lsock)
        with pytest.raises(tcp.NotEstablishedError, match="not a TCP socket"):
            tcp.capture(udp)
        udp.close()
        with pytest.raises(tcp.NotEstablishedError, match="closed"):
            tcp.capture(udp)
        _works(client, server)


def test_capture_of_a_socket_with_a_timeout(host: Host) -> None:
    """A timeout on the socket must not make the send-queue peek wait (and fail) on poll."""
    with _connection(host) as (lsock, client, server):
        # The client reads nothing, so the server's send queue fills and stays non-empty.
        pending = bytearray()
        server.setblocking(False)
        chunk = os.urandom(64 * 1024)
        while True:
            try:
                pending += chunk[: server.send(chunk)]
            except BlockingIOError:
                break
        server.settimeout(5)
        state = tcp.capture(server)
        assert server.gettimeout() == 5
        assert len(state.send_unacked) + len(state.send_unsent) > 0
        tcp.resume(server)
        got = bytearray()
        while len(got) < len(pending):
            got += client.recv(1 << 20)
        assert got == pending
        _works(client, server)


def test_capture_refuses_half_closed(host: Host) -> None:
    with _connection(host) as (lsock, client, server):
        client.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""  # the FIN arrived: server is in CLOSE_WAIT
        with pytest.raises(tcp.NotEstablishedError, match="TCP state 8"):
            tcp.capture(server)
        server.sendall(b"still open")  # not left in repair mode: data still flows
        assert client.recv(10) == b"still open"


def test_restore_refuses_4tuple_in_use_and_leaves_nothing(host: Host) -> None:
    with _connection(host, socket.AF_INET6) as (lsock, client, server):
        state = tcp.capture(server)  # the original still holds the 4-tuple
        fds = _open_fds()
        with pytest.raises(tcp.AddressInUseError, match="already in use") as err:
            tcp.restore(state)
        assert err.value.step == "connect"
        assert _open_fds() == fds  # the half-built socket was closed
        tcp.release(server)
        restored = tcp.restore(state)  # nothing left over holds the 4-tuple
        _works(client, restored)
        restored.close()


def test_resume_after_capture_keeps_the_connection(host: Host) -> None:
    with _connection(host) as (lsock, client, server):
        client.sendall(b"queued")
        state = tcp.capture(server)
        assert state.recv_queue == b"queued"
        tcp.resume(server)  # the handoff failed: keep serving here
        assert server.recv(6) == b"queued"
        _works(client, server)


def test_restore_on_a_foreign_address(host: Host) -> None:
    with _connection(host) as (lsock, client, server):
        state = tcp.capture(server)
        tcp.release(server)
        fds = _open_fds()
        with pytest.raises(tcp.RestoreError, match="not an address of this host"):
            tcp.restore(state, local=Endpoint.parse("192.0.2.1:4000"))
        assert _open_fds() == fds
        _works(client, tcp.restore(state))


def test_restore_refuses_other_family(host: Host) -> None:
    with _connection(host) as (lsock, client, server):
        state = tcp.capture(server)
        with pytest.raises(tcp.StateFormatError, match="differ in family"):
            tcp.restore(state, local=Endpoint.parse("[::1]:4000"))
        tcp.resume(server)
        _works(client, server)


NO_CAP_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys
    from xo import tcp
    lsock = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lsock.getsockname(), timeout=5)
    server, _ = lsock.accept()
    out = {}
    try:
        tcp.capture(server)
    except tcp.RepairPermissionError as e:
        out["capture"] = [type(e).__name__, e.errno, str(e)]
    server.sendall(b"alive")
    out["alive"] = client.recv(5).decode()
    state = tcp.TcpState.from_bytes(bytes.fromhex(sys.argv[1]))
    try:
        tcp.restore(state)
    except tcp.RepairPermissionError as e:
        out["restore"] = [type(e).__name__, e.errno, str(e)]
    print(json.dumps(out))
    """
)


def test_without_cap_net_admin(host: Host, tmp_path: Path) -> None:
    """A process without CAP_NET_ADMIN (dropped from its bounding set by capsh) as root."""
    with host.enter():
        lsock, client, server = _pair()
        state = tcp.capture(server)
        tcp.resume(server)
    script = tmp_path / "nocap.py"
    script.write_text(NO_CAP_SCRIPT)
    cmd = f"{sys.executable} {script} {state.to_bytes().hex()}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = host.run(["capsh", "--drop=cap_net_admin", "--", "-c", cmd], env=env)
    out = json.loads(p.stdout)
    assert out["capture"][:2] == ["RepairPermissionError", 1]
    assert "CAP_NET_ADMIN" in out["capture"][2]
    assert out["alive"] == "alive"
    assert out["restore"][:2] == ["RepairPermissionError", 1]
    for s in (lsock, client, server):
        s.close()


def test_capsh_really_dropped_it(host: Host) -> None:
    """Guard for the test above: capsh must remove cap_net_admin (bit 12) from the process."""
    p = host.run(["capsh", "--drop=cap_net_admin", "--", "-c", "grep CapEff /proc/self/status"])
    eff = int(p.stdout.split()[1], 16)
    cap_net_admin = 12
    assert eff and not eff & (1 << cap_net_admin)
