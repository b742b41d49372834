"""End to end: a real nginx frontend (handoff_out) and two real nginx backends (handoff_in) in a
lab, with the real xo agents between them (TCP_REPAIR, TC programs, gRPC over mTLS). The
client's connection moves to a backend for each request and comes back after the response;
curl and wrk see one ordinary keep-alive connection."""

from __future__ import annotations

import contextlib
import os
import shutil
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
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and TCP_REPAIR need root"),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed"),
]

# On the client every reset counts; on the servers a socket closed in repair mode counts as an
# ESTABLISHED -> CLOSED transition though it sends nothing, so only segments sent count there.
CLIENT_RST = ("TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose")
SERVER_RST = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose")
WAIT_S = 20.0  # agents compile their TC programs at start; slow on a shared machine
WRK_CONNECTIONS = 4
SOCKET_MODE = 0o666  # nginx workers run as nobody


@dataclass
class AgentSite(nx.Site):
    agents: object


@pytest.fixture(scope="module")
def module_so() -> Path:
    return build_module()


def open_socket(path: str) -> None:
    """The lab's agents create their app socket 0600; nginx workers are not root."""
    os.chmod(path, SOCKET_MODE)


@contextlib.contextmanager
def make_site(module_so: Path) -> Iterator[AgentSite]:
    from xo.agent.labkit import LabAgents  # BCC import: only when this tier runs

    with nx.files_lab("xo-nginx-agents-") as (lab, directory, files), LabAgents(
        lab, directory
    ) as agents:
        hosts = [*lab.frontends, *lab.backends]
        for h in hosts:
            open_socket(agents.socket_path(h))
        front, backs = nx.http_nginx(
            lab,
            directory,
            module_so,
            [b.name for b in lab.backends],
            "            handoff_timeout 3s;",
            lambda h: Path(agents.socket_path(h)),
        )

        def agent_logs() -> str:
            return "\n".join(
                f"--- agent {h.name}\n{agents.log_path(h).read_text()[-4000:]}" for h in hosts
            )

        site = AgentSite(lab, front, backs, files, directory, agents)
        with nx.serving(site, agent_logs):
            nx.wait_connected(site.nginx, WAIT_S)
            yield site


def site_rsts(site: nx.Site) -> dict[str, int]:
    return nx.rst_counts(site.lab, CLIENT_RST, SERVER_RST)


def curl_sequence(site: nx.Site, names: list[str], v6: bool = False) -> tuple[list[str], int]:
    return nx.curl_files(site, [site.url(n, v6) for n in names], names)


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_keepalive_connection_moves_to_each_backend_and_back(module_so: Path, v6: bool) -> None:
    names = ["small.bin", "1m.bin", "64k.bin", "1m.bin", "small.bin", "64k.bin"]
    with make_site(module_so) as site:
        nx.assert_round_robin(site, names, v6, site_rsts)


def test_wrk_persistent_connections_through_agents(module_so: Path) -> None:
    with make_site(module_so) as site:
        before = site_rsts(site)
        nx.wrk_leaves_no_leak(site, "64k.bin", WRK_CONNECTIONS, seconds=3, wait=WAIT_S)
        after = site_rsts(site)
        # wrk closes its connections when it stops, possibly mid-response: only the servers'
        # counters must stay put
        assert {k: v for k, v in after.items() if not k.startswith("c0.")} == {
            k: v for k, v in before.items() if not k.startswith("c0.")
        }
        rows = [r for b in site.backs for r in b.access() if r["hs"] == "in"]
        assert rows and all(r["status"] == "200" for r in rows)
        # wrk stops mid-response on some of its connections when its time is up
        assert len([r for r in rows if int(r["bytes"]) != nx.FILES["64k.bin"]]) <= WRK_CONNECTIONS


def test_agent_down_serves_locally_then_hands_off_again(module_so: Path) -> None:
    with make_site(module_so) as site:
        f = site.lab.frontends[0]
        site.agents.kill(f)  # type: ignore[attr-defined]
        served, connects = curl_sequence(site, ["64k.bin", "small.bin"])
        assert (served, connects) == (["f0", "f0"], 1)
        assert [r["hs"] for r in site.front.access()] == ["fallback", "fallback"]
        site.agents.start(f)  # type: ignore[attr-defined]
        open_socket(site.agents.socket_path(f))  # type: ignore[attr-defined]
        nx.wait_connected([site.front], WAIT_S, at_least=2)  # the frontend reconnected
        served, connects = curl_sequence(site, ["1m.bin", "64k.bin"])
        assert (served, connects) == (["b0", "b1"], 1)


def test_hup_reload_mid_traffic_through_agents(module_so: Path) -> None:
    with make_site(module_so) as site:
        t = nx.reload_during_traffic(site, "64k.bin", seconds=4.0, connections=2, pause=1.0)
        assert t.losses == [] and t.ok > 0
        assert [r for r in site.front.access() if r["hs"] == "out"]
        print(f"HUP through agents: {t.ok} ok, {t.retried} retried after a keep-alive close")
