"""End to end: a real nginx frontend (handoff_out) and two real nginx backends (handoff_in) in a
lab, with the real xo agents between them (TCP_REPAIR, TC programs, gRPC over mTLS). The
client's connection moves to a backend for each request and comes back after the response;
curl and wrk see one ordinary keep-alive connection."""

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
from nginx_util import Traffic, keepalive_traffic

from xo.lab import Host, Lab
from xo.nginxlab import Nginx, build_module, make_files, running, shared_dir

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and TCP_REPAIR need root"),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed"),
]

BACKEND_PORT = 8080
FILES = {"small.bin": 1000, "64k.bin": 64 * 1024, "1m.bin": 1024 * 1024}
# On the client every reset counts; on the servers a socket closed in repair mode counts as an
# ESTABLISHED -> CLOSED transition though it sends nothing, so only segments sent count there.
CLIENT_RST = ("TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose")
SERVER_RST = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose")
WAIT_S = 20.0  # agents compile their TC programs at start; slow on a shared machine
WRK_CONNECTIONS = 4
SOCKET_MODE = 0o666  # nginx workers run as nobody


@dataclass
class Site:
    lab: Lab
    agents: object
    front: Nginx
    backs: list[Nginx]
    files: dict[str, tuple[int, str]]
    directory: Path

    @property
    def client(self) -> Host:
        return self.lab.clients[0]


def front_server(lab: Lab, www: Path) -> str:
    targets = "\n".join(f"            handoff_target {b.name};" for b in lab.backends)
    return f"""
    server {{
        listen {lab.vip4}:80;
        listen [{lab.vip6}]:80;
        root {www};
        add_header X-Served-By f0 always;
        location /files/ {{
            handoff_out;
{targets}
            handoff_timeout 3s;
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
    }}"""


@pytest.fixture(scope="module")
def module_so() -> Path:
    return build_module()


def open_socket(path: str) -> None:
    """The lab's agents create their app socket 0600; nginx workers are not root."""
    os.chmod(path, SOCKET_MODE)


@contextlib.contextmanager
def make_site(module_so: Path) -> Iterator[Site]:
    from xo.agent.labkit import LabAgents  # BCC import: only when this tier runs

    directory = shared_dir("xo-nginx-agents-")
    www = directory / "www"
    files = make_files(www / "files", FILES)
    try:
        with Lab(clients=1, frontends=1, backends=2) as lab, LabAgents(lab, directory) as agents:
            hosts = [*lab.frontends, *lab.backends]
            for h in hosts:
                open_socket(agents.socket_path(h))
            f = lab.frontends[0]
            front = Nginx(
                f,
                directory / "nginx-f0",
                front_server(lab, www),
                module_so,
                agent=Path(agents.socket_path(f)),
                workers=1,
            )
            backs = [
                Nginx(
                    b,
                    directory / f"nginx-{b.name}",
                    back_server(b, www),
                    module_so,
                    agent=Path(agents.socket_path(b)),
                )
                for b in lab.backends
            ]
            with running(front, *backs):
                site = Site(lab, agents, front, backs, files, directory)
                try:
                    wait_connected(site)
                    yield site
                except BaseException:
                    for n in (front, *backs):
                        print(f"--- nginx {n.host.name}\n{n.log_text()[-4000:]}")
                    for h in hosts:
                        print(f"--- agent {h.name}\n{agents.log_path(h).read_text()[-4000:]}")
                    raise
                for n in (front, *backs):
                    assert n.bad_log_lines() == [], n.host.name
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def wait_connected(site: Site) -> None:
    deadline = time.monotonic() + WAIT_S
    for n in (site.front, *site.backs):
        while n.log_text().count("handoff: connected to agent") < n.workers:
            assert time.monotonic() < deadline, f"{n.host.name} never reached its agent"
            time.sleep(0.05)


def rst_counts(site: Site) -> dict[str, int]:
    out = {f"c0.{k}": site.client.nstat().get(k, 0) for k in CLIENT_RST}
    for h in (*site.lab.frontends, *site.lab.backends):
        st = h.nstat()
        out.update({f"{h.name}.{k}": st.get(k, 0) for k in SERVER_RST})
    return out


def curl_sequence(site: Site, names: list[str], v6: bool = False) -> tuple[list[str], int]:
    out = site.directory / "curl"
    out.mkdir(exist_ok=True)
    host = f"[{site.lab.vip6}]" if v6 else str(site.lab.vip4)
    argv = [
        "curl",
        "-sS",
        "--http1.1",
        "--fail",
        "-D",
        str(out / "headers"),
        "-w",
        "%{num_connects}\\n",
    ]
    for i, name in enumerate(names):
        argv += ["-o", str(out / f"body{i}"), f"http://{host}/files/{name}"]
    res = site.client.run(argv, timeout=60)
    for i, name in enumerate(names):
        data = (out / f"body{i}").read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == site.files[name], name
    served = re.findall(r"^X-Served-By: (\S+)", (out / "headers").read_text(), re.M)
    return served, sum(int(x) for x in res.stdout.split())


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_keepalive_connection_moves_to_each_backend_and_back(module_so: Path, v6: bool) -> None:
    names = ["small.bin", "1m.bin", "64k.bin", "1m.bin", "small.bin", "64k.bin"]
    with make_site(module_so) as site:
        before = rst_counts(site)
        served, connects = curl_sequence(site, names, v6)
        assert connects == 1
        assert served == ["b0", "b1"] * 3
        assert rst_counts(site) == before
        assert [r["hs"] for r in site.front.access()] == ["out"] * 6
        for back, mine in zip(site.backs, (names[0::2], names[1::2]), strict=True):
            rows = back.access()
            assert [r["hs"] for r in rows] == ["in"] * 3
            assert [int(r["bytes"]) for r in rows] == [FILES[n] for n in mine]


def stub_active(site: Site) -> int:
    res = site.client.run(["curl", "-sS", f"http://{site.lab.vip4}/stub"], timeout=10)
    return int(re.search(r"Active connections: (\d+)", res.stdout).group(1))  # type: ignore[union-attr]


def wait_for(what: str, probe: Callable[[], object], want: object) -> None:
    deadline = time.monotonic() + WAIT_S
    while (got := probe()) != want:
        assert time.monotonic() < deadline, f"{what}: {got} != {want}"
        time.sleep(0.1)


def test_wrk_persistent_connections_through_agents(module_so: Path) -> None:
    with make_site(module_so) as site:
        nginx = (site.front, *site.backs)
        base_fds = {n.host.name: n.open_fds() for n in nginx}
        before = rst_counts(site)
        url = f"http://{site.lab.vip4}/files/64k.bin"
        out = site.client.run(
            ["wrk", "-t2", f"-c{WRK_CONNECTIONS}", "-d3s", url], timeout=60
        ).stdout
        assert re.search(r"(\d+) requests in", out) and "Socket errors" not in out, out
        assert "Non-2xx" not in out, out
        wait_for("stub_status active", lambda: stub_active(site), 1)
        wait_for("worker fds", lambda: {n.host.name: n.open_fds() for n in nginx}, base_fds)
        after = rst_counts(site)
        # wrk closes its connections when it stops, possibly mid-response: only the servers'
        # counters must stay put
        assert {k: v for k, v in after.items() if not k.startswith("c0.")} == {
            k: v for k, v in before.items() if not k.startswith("c0.")
        }
        rows = [r for b in site.backs for r in b.access() if r["hs"] == "in"]
        assert rows and all(r["status"] == "200" for r in rows)
        # wrk stops mid-response on some of its connections when its time is up
        assert len([r for r in rows if int(r["bytes"]) != FILES["64k.bin"]]) <= WRK_CONNECTIONS


def test_agent_down_serves_locally_then_hands_off_again(module_so: Path) -> None:
    with make_site(module_so) as site:
        f = site.lab.frontends[0]
        site.agents.kill(f)  # type: ignore[attr-defined]
        served, connects = curl_sequence(site, ["64k.bin", "small.bin"])
        assert (served, connects) == (["f0", "f0"], 1)
        assert [r["hs"] for r in site.front.access()] == ["fallback", "fallback"]
        site.agents.start(f)  # type: ignore[attr-defined]
        open_socket(site.agents.socket_path(f))  # type: ignore[attr-defined]
        deadline = time.monotonic() + WAIT_S
        while site.front.log_text().count("handoff: connected to agent") < 2:
            assert time.monotonic() < deadline, "frontend never reconnected"
            time.sleep(0.1)
        served, connects = curl_sequence(site, ["1m.bin", "64k.bin"])
        assert (served, connects) == (["b0", "b1"], 1)


def test_hup_reload_mid_traffic_through_agents(module_so: Path) -> None:
    with make_site(module_so) as site:
        result: list[Traffic] = []
        args = (site.client, str(site.lab.vip4), "/files/64k.bin", site.files["64k.bin"])
        traffic = threading.Thread(
            target=lambda: result.append(keepalive_traffic(*args, seconds=4.0, connections=2))
        )
        traffic.start()
        try:
            time.sleep(1.0)
            site.front.reload()
            time.sleep(1.0)
            for b in site.backs:
                b.reload()
        finally:
            traffic.join()
        (t,) = result
        assert t.losses == [] and t.ok > 0
        for n in (site.front, *site.backs):  # the old workers finished and exited
            wait_for(f"{n.host.name} workers", lambda n=n: len(n.worker_pids()), n.workers)
        assert [r for r in site.front.access() if r["hs"] == "out"]
        print(f"HUP through agents: {t.ok} ok, {t.retried} retried after a keep-alive close")
