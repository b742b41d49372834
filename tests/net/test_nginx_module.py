"""The nginx handoff module with real nginx (a frontend and two backends in a lab) and real
clients (curl, wrk), the agent played by the fd-passing stand-in of nginx_util: handoff_out,
handoff_in, give back, the returned connection resumed with keep-alive, handoff_freq and round
robin, fallback to local serving when the agent is away or refuses, worker fds and stub_status
back at baseline, a HUP reload in the middle of traffic, zero RST."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nginx_util as nx
import pytest

from xo.nginxlab import (
    build_module,
)

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed"),
]

# Counters that would show a connection reset or aborted anywhere.
RST_COUNTERS = (
    "TcpOutRsts",
    "TcpExtTCPAbortOnData",
    "TcpExtTCPAbortOnClose",
    "TcpExtTCPAbortOnLinger",
    "TcpExtTCPAbortOnTimeout",
    "TcpEstabResets",
)
WAIT_S = 5.0
WRK_CONNECTIONS = 8


@dataclass
class StandInSite(nx.Site):
    agent: nx.StandInAgent


@pytest.fixture(scope="module")
def module_so() -> Path:
    return build_module()


@contextlib.contextmanager
def make_site(
    module_so: Path, freq: int = 0, front_workers: int = 1, agent_up: bool = True
) -> Iterator[StandInSite]:
    """A lab with a frontend nginx (handoff_out), two backends (handoff_in) and the stand-in."""
    with nx.files_lab("xo-nginx-") as (lab, directory, files):
        hosts = [h.name for h in (*lab.frontends, *lab.backends)]
        targets = [f"{b.ip4}:{nx.BACKEND_PORT}" for b in lab.backends]
        by_target = {t: b.name for t, b in zip(targets, lab.backends, strict=True)}
        agent = nx.StandInAgent(directory, hosts, by_target)
        front, backs = nx.http_nginx(
            lab,
            directory,
            module_so,
            targets,
            f"            handoff_freq {freq};\n            handoff_timeout 2s;",
            lambda h: agent.path(h.name),
            front_workers,
            back_stub=True,
        )
        if agent_up:
            agent.start()
        try:
            with nx.serving(StandInSite(lab, front, backs, files, directory, agent)) as site:
                if agent_up:
                    nx.wait_connected(site.nginx, WAIT_S)
                yield site
        finally:
            agent.stop()
        assert agent.errors == []


def curl_sequence(site: nx.Site, names: list[str], v6: bool = False) -> tuple[list[str], int]:
    """GET the files in order on one keep-alive connection, check each body; returns the
    X-Served-By header of each response and the number of TCP connects curl made."""
    return nx.curl_files(site, [site.url(n, v6) for n in names], names, timeout=30)


def site_rsts(site: nx.Site) -> dict[str, int]:
    return nx.rst_counts(site.lab, RST_COUNTERS, RST_COUNTERS)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_keepalive_requests_round_robin_to_backends(module_so: Path, v6: bool) -> None:
    names = ["small.bin", "64k.bin", "1m.bin", "small.bin", "1m.bin", "64k.bin"]
    with make_site(module_so) as site:
        nx.assert_round_robin(site, names, v6, site_rsts)
        assert site.agent.handed_in == {"f0": 0, "b0": 3, "b1": 3}
        assert site.agent.returned == 6
        assert [r["ht"] for r in site.front.access()] == [
            f"{b.ip4}:{nx.BACKEND_PORT}" for b in site.lab.backends
        ] * 3
        for back in site.backs:
            assert all(r["status"] == "200" for r in back.access())


def test_handoff_freq_offloads_every_nth_request(module_so: Path) -> None:
    names = ["64k.bin"] * 6
    with make_site(module_so, freq=2) as site:
        served, connects = curl_sequence(site, names)
        assert connects == 1
        assert served == ["f0", "b0", "f0", "b1", "f0", "b0"]
        assert [r["hs"] for r in site.front.access()] == ["local", "out"] * 3


def test_agent_away_serves_locally_then_recovers(module_so: Path) -> None:
    with make_site(module_so, agent_up=False) as site:
        served, connects = curl_sequence(site, ["64k.bin", "small.bin"])
        assert (served, connects) == (["f0", "f0"], 1)
        assert [r["hs"] for r in site.front.access()] == ["fallback", "fallback"]
        site.agent.start()  # the link reconnects on its retry timer
        nx.wait_connected(site.nginx, WAIT_S)
        served, connects = curl_sequence(site, ["64k.bin", "small.bin"])
        assert (served, connects) == (["b0", "b1"], 1)


def test_agent_refusal_serves_locally_on_the_same_connection(module_so: Path) -> None:
    with make_site(module_so) as site:
        site.agent.refuse = True
        before = site_rsts(site)
        served, connects = curl_sequence(site, ["1m.bin", "64k.bin", "small.bin"])
        assert (served, connects) == (["f0"] * 3, 1)
        assert [r["hs"] for r in site.front.access()] == ["fallback"] * 3
        assert site_rsts(site) == before


def server_rsts(site: nx.Site) -> dict[str, int]:
    """RSTs sent by the server side (a client that stops mid-response may reset itself)."""
    return nx.rst_counts(site.lab, (), ("TcpOutRsts",))


def test_wrk_persistent_connections_leave_no_leak(module_so: Path) -> None:
    with make_site(module_so, front_workers=2) as site:
        base_rst = server_rsts(site)
        assert nx.stub_active(site) == 1  # the stub request itself
        nx.wrk_leaves_no_leak(site, "64k.bin", WRK_CONNECTIONS, seconds=2, wait=WAIT_S)
        assert server_rsts(site) == base_rst
        back_rows = [r for b in site.backs for r in b.access()]
        assert back_rows and all(r["hs"] == "in" for r in back_rows)
        assert all(r["status"] == "200" for r in back_rows)
        # wrk stops mid-response on some of its connections when its time is up
        short = [r for r in back_rows if int(r["bytes"]) != nx.FILES["64k.bin"]]
        assert len(short) <= WRK_CONNECTIONS
        out_rows = [r for r in site.front.access() if r["hs"] == "out"]
        assert len(out_rows) == len(back_rows) == sum(site.agent.handed_in.values())
        # Every handed-in connection is given back, except those wrk reset when its time was
        # up (at most one per wrk connection: the backend cannot give back a reset socket).
        # The stand-in counts a give-back after delivering it, a moment after the fds close.
        returned = -1
        while returned != site.agent.returned:  # settled: no change for a second
            returned = site.agent.returned
            time.sleep(1)
        assert len(back_rows) - WRK_CONNECTIONS <= returned <= len(back_rows)


def test_hup_reload_mid_traffic_loses_nothing(module_so: Path) -> None:
    with make_site(module_so, front_workers=2) as site:
        t = nx.reload_during_traffic(site, "64k.bin", seconds=3.0, connections=4, pause=0.8)
        assert t.losses == [] and t.ok > 0
        back_rows = [r for b in site.backs for r in b.access()]
        assert back_rows
        size = nx.FILES["64k.bin"]
        assert all(r["status"] == "200" and int(r["bytes"]) == size for r in back_rows)
        print(f"HUP mid-traffic: {t.ok} ok, {t.retried} retried after a keep-alive close")
