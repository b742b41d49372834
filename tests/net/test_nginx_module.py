"""The nginx handoff module with real nginx (a frontend and two backends in a lab) and real
clients (curl, wrk), the agent played by the fd-passing stand-in of nginx_util: handoff_out,
handoff_in, give back, the returned connection resumed with keep-alive, handoff_freq and round
robin, fallback to local serving when the agent is away or refuses, worker fds and stub_status
back at baseline, a HUP reload in the middle of traffic, zero RST."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nginx_util import StandInAgent, Traffic, keepalive_traffic

from xo.lab import Host, Lab
from xo.nginxlab import Nginx, build_module, make_files, running, shared_dir

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed"),
]

BACKEND_PORT = 8080
FILES = {"small.bin": 1000, "64k.bin": 64 * 1024, "1m.bin": 1024 * 1024}
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
class Site:
    lab: Lab
    front: Nginx
    backs: list[Nginx]
    agent: StandInAgent
    files: dict[str, tuple[int, str]]
    directory: Path

    @property
    def client(self) -> Host:
        return self.lab.clients[0]

    def url(self, name: str, v6: bool = False) -> str:
        host = f"[{self.lab.vip6}]" if v6 else str(self.lab.vip4)
        return f"http://{host}/files/{name}"


def front_server(lab: Lab, www: Path, freq: int) -> str:
    targets = "\n".join(f"            handoff_target {b.ip4}:{BACKEND_PORT};" for b in lab.backends)
    return f"""
    server {{
        listen {lab.vip4}:80;
        listen [{lab.vip6}]:80;
        root {www};
        add_header X-Served-By f0 always;
        location /files/ {{
            handoff_out;
{targets}
            handoff_freq {freq};
            handoff_timeout 2s;
        }}
        location = /stub {{ stub_status; }}
    }}"""


def back_server(host: Host, www: Path) -> str:
    return f"""
    server {{
        listen {host.ip4}:{BACKEND_PORT};
        listen [{host.ip6}]:{BACKEND_PORT};
        handoff_in on;
        root {www};
        add_header X-Served-By {host.name} always;
        location = /stub {{ stub_status; }}
    }}"""


@pytest.fixture(scope="module")
def module_so() -> Path:
    return build_module()


@contextlib.contextmanager
def make_site(
    module_so: Path, freq: int = 0, front_workers: int = 1, agent_up: bool = True
) -> Iterator[Site]:
    """A lab with a frontend nginx (handoff_out), two backends (handoff_in) and the stand-in."""
    directory = shared_dir("xo-nginx-")
    www = directory / "www"
    files = make_files(www / "files", FILES)
    try:
        with Lab(clients=1, frontends=1, backends=2) as lab:
            hosts = [h.name for h in (*lab.frontends, *lab.backends)]
            targets = {f"{b.ip4}:{BACKEND_PORT}": b.name for b in lab.backends}
            agent = StandInAgent(directory, hosts, targets)
            f = lab.frontends[0]
            front = Nginx(
                f,
                directory / f.name,
                front_server(lab, www, freq),
                module_so,
                agent=agent.path(f.name),
                workers=front_workers,
            )
            backs = [
                Nginx(
                    b, directory / b.name, back_server(b, www), module_so, agent=agent.path(b.name)
                )
                for b in lab.backends
            ]
            if agent_up:
                agent.start()
            try:
                with running(front, *backs):
                    site = Site(lab, front, backs, agent, files, directory)
                    try:
                        if agent_up:
                            wait_connected(site)
                        yield site
                    except BaseException:
                        for n in (front, *backs):  # shown by pytest on failure
                            print(f"--- {n.host.name} error.log\n{n.log_text()}")
                        raise
                    for n in (front, *backs):
                        assert n.bad_log_lines() == [], n.host.name
            finally:
                agent.stop()
            assert agent.errors == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def wait_connected(site: Site) -> None:
    """Until every worker of every nginx has said Hello to the (stand-in) agent."""
    deadline = time.monotonic() + WAIT_S
    for n in (site.front, *site.backs):
        while n.log_text().count("handoff: connected to agent") < n.workers:
            assert time.monotonic() < deadline, (
                f"{n.host.name} never reached the agent:\n{n.log_text()}"
            )
            time.sleep(0.05)


def rst_counts(site: Site) -> dict[str, int]:
    out = {}
    for h in (site.client, *site.lab.frontends, *site.lab.backends):
        counters = h.nstat()
        for name in RST_COUNTERS:
            out[f"{h.name}.{name}"] = counters.get(name, 0)
    return out


def curl_sequence(site: Site, names: list[str], v6: bool = False) -> tuple[list[str], int]:
    """GET the files in order on one keep-alive connection, check each body; returns the
    X-Served-By header of each response and the number of TCP connects curl made."""
    out = site.directory / "curl"
    out.mkdir(exist_ok=True)
    argv = [
        "curl",
        "-sS",
        "--http1.1",
        "--fail",
        "-D",
        str(out / "headers"),
        "-w",
        "%{num_connects}\n",
    ]
    for i, name in enumerate(names):
        argv += ["-o", str(out / f"body{i}"), site.url(name, v6)]
    res = site.client.run(argv, timeout=30)
    for i, name in enumerate(names):
        data = (out / f"body{i}").read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == site.files[name], name
    served = re.findall(r"^X-Served-By: (\S+)", (out / "headers").read_text(), re.M)
    connects = sum(int(x) for x in res.stdout.split())
    return served, connects


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_keepalive_requests_round_robin_to_backends(module_so: Path, v6: bool) -> None:
    names = ["small.bin", "64k.bin", "1m.bin", "small.bin", "1m.bin", "64k.bin"]
    with make_site(module_so) as site:
        before = rst_counts(site)
        served, connects = curl_sequence(site, names, v6)
        assert connects == 1  # one client connection throughout
        assert served == ["b0", "b1"] * 3  # each request went elsewhere, round robin
        assert site.agent.handed_in == {"f0": 0, "b0": 3, "b1": 3}
        assert site.agent.returned == 6
        assert rst_counts(site) == before
        front = site.front.access()
        assert [r["hs"] for r in front] == ["out"] * 6
        assert [r["ht"] for r in front] == [
            f"{b.ip4}:{BACKEND_PORT}" for b in site.lab.backends
        ] * 3
        for back, mine in zip(site.backs, (names[0::2], names[1::2]), strict=True):
            rows = back.access()
            assert [r["hs"] for r in rows] == ["in"] * 3
            assert [int(r["bytes"]) for r in rows] == [FILES[n] for n in mine]
            assert all(r["status"] == "200" for r in rows)


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
        wait_connected(site)
        served, connects = curl_sequence(site, ["64k.bin", "small.bin"])
        assert (served, connects) == (["b0", "b1"], 1)


def test_agent_refusal_serves_locally_on_the_same_connection(module_so: Path) -> None:
    with make_site(module_so) as site:
        site.agent.refuse = True
        before = rst_counts(site)
        served, connects = curl_sequence(site, ["1m.bin", "64k.bin", "small.bin"])
        assert (served, connects) == (["f0"] * 3, 1)
        assert [r["hs"] for r in site.front.access()] == ["fallback"] * 3
        assert rst_counts(site) == before


def stub_active(site: Site) -> int:
    res = site.client.run(["curl", "-sS", f"http://{site.lab.vip4}/stub"], timeout=10)
    return int(re.search(r"Active connections: (\d+)", res.stdout).group(1))  # type: ignore[union-attr]


def fd_counts(site: Site) -> dict[str, int]:
    return {n.host.name: n.open_fds() for n in (site.front, *site.backs)}


def wait_for(what: str, probe: Callable[[], object], want: object) -> None:
    deadline = time.monotonic() + WAIT_S
    while (got := probe()) != want:
        assert time.monotonic() < deadline, f"{what}: {got} != {want}"
        time.sleep(0.1)


def parse_wrk(out: str) -> dict[str, float]:
    """Requests, errors and non-2xx responses from wrk's summary."""
    res = {"requests": float(re.search(r"(\d+) requests in", out).group(1))}  # type: ignore[union-attr]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = float(sum(int(x) for x in errors.groups())) if errors else 0.0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    return res


def server_rsts(site: Site) -> dict[str, int]:
    """RSTs sent by the server side (a client that stops mid-response may reset itself)."""
    return {
        h.name: h.nstat().get("TcpOutRsts", 0) for h in (*site.lab.frontends, *site.lab.backends)
    }


def test_wrk_persistent_connections_leave_no_leak(module_so: Path) -> None:
    with make_site(module_so, front_workers=2) as site:
        base_fds, base_rst = fd_counts(site), server_rsts(site)
        assert stub_active(site) == 1  # the stub request itself
        url = site.url("64k.bin")
        out = site.client.run(
            ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", "-d2s", url], timeout=30
        ).stdout
        wrk = parse_wrk(out)
        assert wrk["requests"] > 0 and wrk["socket_errors"] == 0 and wrk["non2xx"] == 0, out
        wait_for("frontend stub_status active", lambda: stub_active(site), 1)
        wait_for("worker fds", lambda: fd_counts(site), base_fds)
        assert server_rsts(site) == base_rst
        back_rows = [r for b in site.backs for r in b.access()]
        assert back_rows and all(r["hs"] == "in" for r in back_rows)
        assert all(r["status"] == "200" for r in back_rows)
        # wrk stops mid-response on some of its connections when its time is up
        short = [r for r in back_rows if int(r["bytes"]) != FILES["64k.bin"]]
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
        result: list[Traffic] = []
        traffic = threading.Thread(
            target=lambda: result.append(
                keepalive_traffic(
                    site.client,
                    str(site.lab.vip4),
                    "/files/64k.bin",
                    site.files["64k.bin"],
                    seconds=3.0,
                    connections=4,
                )
            )
        )
        traffic.start()
        try:
            time.sleep(0.8)
            site.front.reload()
            time.sleep(0.8)
            for b in site.backs:
                b.reload()
        finally:
            traffic.join()
        (t,) = result
        assert t.losses == [] and t.ok > 0
        for n in (site.front, *site.backs):  # the old workers finished and exited
            wait_for(f"{n.host.name} workers", lambda n=n: len(n.worker_pids()), n.workers)
        back_rows = [r for b in site.backs for r in b.access()]
        assert back_rows
        assert all(r["status"] == "200" and int(r["bytes"]) == FILES["64k.bin"] for r in back_rows)
        print(f"HUP mid-traffic: {t.ok} ok, {t.retried} retried after a keep-alive close")
