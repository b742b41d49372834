"""The lab on real namespaces: addressing, reachability (v4/v6, VIP), isolation, clean teardown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from xo.cli import main as xo_main
from xo.lab import NETNS_DIR, STATE_DIR, Host, Lab, LabError, list_labs, remove_stale_labs

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]


def _namespaces(prefix: str) -> list[str]:
    return [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix + "-")]


def _echo_once(host: Host, family: int, port: int) -> tuple[socket.socket, threading.Thread]:
    """A listener created inside `host`; a thread echoes one connection's bytes back."""
    with host.enter():
        srv = socket.create_server(("", port), family=family, dualstack_ipv6=False)
    seen: list[tuple] = []

    def serve() -> None:
        conn, peer = srv.accept()
        seen.append(peer)
        with conn:
            conn.sendall(conn.recv(1024))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_client_reaches_vip_and_backend(family: int) -> None:
    with Lab(clients=1, frontends=1, backends=1) as lab:
        c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
        vip = lab.vip4 if family == socket.AF_INET else lab.vip6
        for server, dst in ((f, vip), (b, b.ip4 if family == socket.AF_INET else b.ip6)):
            srv, t = _echo_once(server, family, 8080)
            with c.enter():
                conn = socket.create_connection((str(dst), 8080), timeout=5)
            with conn:
                conn.sendall(b"ping " + str(dst).encode())
                assert conn.recv(1024) == b"ping " + str(dst).encode()
                assert conn.getsockname()[0] == str(c.ip4 if family == socket.AF_INET else c.ip6)
            t.join(5)
            srv.close()


def test_hosts_are_addressed_and_offloads_off() -> None:
    with Lab(clients=2, frontends=1, backends=2) as lab:
        assert [h.name for h in lab.clients] == ["c0", "c1"]
        assert [h.name for h in lab.backends] == ["b0", "b1"]
        hosts = lab.hosts
        assert len({h.netns for h in hosts}) == len({h.ip4 for h in hosts}) == len(hosts) == 5
        assert len({h.mac for h in hosts}) == len({h.ip6 for h in hosts}) == 5
        for h in hosts:
            assert h.netns.startswith(lab.name + "-")
            link = h.run(["ip", "-o", "link", "show", "dev", h.ifname]).stdout
            assert link.startswith(f"{h.ifindex}: {h.ifname}@") and h.mac in link
            feats = h.run(["ethtool", "-k", h.ifname]).stdout
            assert "tx-checksumming: off" in feats and "rx-checksumming: off" in feats
        f0_addrs = lab.frontends[0].run(["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert f"{lab.vip4}/32" in f0_addrs and f"{lab.vip6}/128" in f0_addrs


def test_nstat_counts_the_namespace_only() -> None:
    with Lab(clients=1, frontends=1, backends=0) as lab:
        c, f = lab.clients[0], lab.frontends[0]
        before_c, before_f = c.nstat(), f.nstat()
        assert "TcpOutRsts" in before_c and "TcpExtTCPAbortOnData" in before_c
        srv, t = _echo_once(f, socket.AF_INET, 9000)
        with c.enter():
            conn = socket.create_connection((str(lab.vip4), 9000), timeout=5)
        with conn:
            conn.sendall(b"x")
            assert conn.recv(1) == b"x"
        t.join(5)
        srv.close()
        after_c, after_f = c.nstat(), f.nstat()
        assert after_c["TcpActiveOpens"] == before_c["TcpActiveOpens"] + 1
        assert after_f["TcpPassiveOpens"] == before_f["TcpPassiveOpens"] + 1
        assert after_f["TcpActiveOpens"] == before_f["TcpActiveOpens"]


def test_parallel_labs_do_not_collide_and_down_is_complete() -> None:
    a, b = Lab(clients=1, frontends=1, backends=1), Lab(clients=1, frontends=1, backends=1)
    try:
        a.up()
        b.up()
        assert a.name != b.name
        # Same addresses in both labs, yet each reaches only its own frontend.
        for lab in (a, b):
            out = lab.clients[0].run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
            assert str(lab.clients[0].ip4) in out
        sleeper = a.backends[0].popen(["sleep", "60"])
    finally:
        a.down()
    assert sleeper.poll() is not None, "down() must stop processes started in the lab"
    assert _namespaces(a.name) == [] and not (STATE_DIR / f"{a.name}.json").exists()
    assert len(_namespaces(b.name)) == 4, "removing one lab must not touch another"
    b.down()
    b.down()  # idempotent
    assert _namespaces(b.name) == []


def test_down_after_failure_inside_with() -> None:
    lab = Lab(clients=1, frontends=0, backends=0)
    with pytest.raises(RuntimeError, match="boom"), lab:
        assert _namespaces(lab.name)
        raise RuntimeError("boom")
    assert _namespaces(lab.name) == []


def test_bad_input_is_rejected_clearly() -> None:
    with pytest.raises(LabError, match="clients must be"):
        Lab(clients=-1)
    with pytest.raises(LabError, match="lab name must match"):
        Lab(name="Bad Name!")
    with pytest.raises(LabError, match="no host 'z9'"):
        Lab().host("z9")
    with Lab(clients=1, frontends=0, backends=0) as lab:
        with pytest.raises(LabError, match="already exists"):
            Lab(clients=1, frontends=0, backends=0, name=lab.name).up()
        assert len(_namespaces(lab.name)) == 2, "a failed duplicate must not remove the original"
        failed = lab.clients[0].run(["false"], check=False)
        assert failed.returncode == 1
        with pytest.raises(subprocess.CalledProcessError, match="nosuch0. does not exist"):
            lab.clients[0].run(["ip", "link", "show", "dev", "nosuch0"])


def test_cli_up_down_and_all_spares_live_labs(capsys: pytest.CaptureFixture[str]) -> None:
    name = "t" + os.urandom(4).hex()
    # `xo lab up` in a child process: its creator exits, so the lab counts as leftover.
    subprocess.run(
        [sys.executable, "-m", "xo.cli", "lab", "up", "--name", name],
        check=True,
        capture_output=True,
    )
    try:
        assert len(_namespaces(name)) == 5 and name in list_labs()
        with Lab(clients=1, frontends=0, backends=0) as live:
            removed = remove_stale_labs()
            assert removed.get(name) and _namespaces(name) == []
            assert live.name not in removed and len(_namespaces(live.name)) == 2
    finally:
        xo_main(["lab", "down", name])
    assert xo_main(["lab", "up", "--name", name, "-c", "1", "-f", "0", "-b", "0"]) == 0
    assert "c0" in capsys.readouterr().out
    assert xo_main(["lab", "down", name]) == 0
    assert f"removed {name}: {name}-br {name}-c0" in capsys.readouterr().out
    assert _namespaces(name) == []
    assert xo_main(["lab", "down"]) == 2
