"""TLS through the nginx handoff module, on Debian's stock kernel (VM tier: kTLS).

The frontend nginx terminates TLS with `ssl_conf_command Options KTLS`, so after the handshake
OpenSSL hands both directions to the kernel; `handoff_out` then passes the kTLS socket to a
backend nginx, which serves plain HTTP on it (the kernel encrypts), gives it back, and the
frontend resumes it as a plain connection over kTLS. The agent is the fd-passing stand-in of
tests/net/nginx_util.py: the socket stays in f0's namespace, so this checks the module's TLS
handling with real OpenSSL, real kTLS and an unmodified curl; moving kTLS state between hosts is
xo.tls's job and tested there. TLS 1.3 keeps its receive side in OpenSSL 3.0 (no kTLS RX), so
such connections must be served by the frontend itself.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xo.lab import Host, Lab
from xo.nginxlab import Nginx, build_module, make_files, running, shared_dir
from xo.pki import DevCA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "net"))
from nginx_util import StandInAgent  # noqa: E402  (test helper shared with the net tier)

pytestmark = pytest.mark.kernel

HOST = "xo.test"
BACKEND_PORT = 8080
FILES = {"small.bin": 1000, "64k.bin": 64 * 1024, "1m.bin": 1024 * 1024}
NAMES = ["small.bin", "1m.bin", "64k.bin", "small.bin"]
RST_COUNTERS = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpEstabResets")
KTLS_CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"  # the dev CA issues EC keys


@pytest.fixture(autouse=True)
def _needs_ktls(require_module: Callable[[str], None]) -> None:
    require_module("tls")


@dataclass
class Site:
    lab: Lab
    front: Nginx
    backs: list[Nginx]
    agent: StandInAgent
    files: dict[str, tuple[int, str]]
    ca: Path
    directory: Path


def front_server(lab: Lab, www: Path, cert: Path, key: Path, protocol: str) -> str:
    targets = "\n".join(f"            handoff_target {b.ip4}:{BACKEND_PORT};" for b in lab.backends)
    return f"""
    server {{
        listen {lab.vip4}:443 ssl;
        server_name {HOST};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols {protocol};
        ssl_ciphers {KTLS_CIPHER};
        ssl_conf_command Options KTLS;
        root {www};
        add_header X-Served-By f0 always;
        location /files/ {{
            handoff_out;
{targets}
        }}
    }}"""


def back_server(host: Host, www: Path) -> str:
    return f"""
    server {{
        listen {host.ip4}:{BACKEND_PORT};
        handoff_in on;
        root {www};
        add_header X-Served-By {host.name} always;
    }}"""


@pytest.fixture
def site_for() -> Iterator[Callable[[str], Site]]:
    so = build_module()
    directory = shared_dir("xo-nginx-tls-")
    www = directory / "www"
    files = make_files(www / "files", FILES)
    tls = DevCA().write(directory / "pki", HOST)
    with Lab(clients=1, frontends=1, backends=2) as lab:
        targets = {f"{b.ip4}:{BACKEND_PORT}": b.name for b in lab.backends}
        hosts = [h.name for h in (*lab.frontends, *lab.backends)]
        with StandInAgent(directory, hosts, targets) as agent:

            def make(protocol: str) -> Site:
                f = lab.frontends[0]
                front = Nginx(
                    f,
                    directory / "f0",
                    front_server(lab, www, tls.cert, tls.key, protocol),
                    so,
                    agent=agent.path(f.name),
                    workers=1,
                )
                backs = [
                    Nginx(
                        b,
                        directory / b.name,
                        back_server(b, www),
                        so,
                        agent=agent.path(b.name),
                        workers=1,
                    )
                    for b in lab.backends
                ]
                return Site(lab, front, backs, agent, files, tls.ca, directory)

            try:
                yield make
            finally:
                shutil.rmtree(directory, ignore_errors=True)


def rsts(lab: Lab) -> dict[str, int]:
    return {
        f"{h.name}.{k}": h.nstat().get(k, 0)
        for h in lab.hosts
        for k in RST_COUNTERS
        if not (k == "TcpEstabResets" and h.name != "c0")
    }


def curl_tls(site: Site, names: list[str]) -> tuple[list[str], int]:
    out = site.directory / "curl"
    out.mkdir(exist_ok=True)
    argv = [
        "curl",
        "-sS",
        "--fail",
        "--http1.1",
        "--cacert",
        str(site.ca),
        "--resolve",
        f"{HOST}:443:{site.lab.vip4}",
        "-D",
        str(out / "headers"),
        "-w",
        "%{num_connects}\\n",
    ]
    for i, name in enumerate(names):
        argv += ["-o", str(out / f"body{i}"), f"https://{HOST}/files/{name}"]
    res = site.lab.clients[0].run(argv, timeout=120)
    for i, name in enumerate(names):
        data = (out / f"body{i}").read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == site.files[name], name
    served = re.findall(r"^X-Served-By: (\S+)", (out / "headers").read_text(), re.M)
    return served, sum(int(x) for x in res.stdout.split())


def test_ktls_connection_is_handed_off_and_returned(site_for: Callable[[str], Site]) -> None:
    site = site_for("TLSv1.2")
    with running(site.front, *site.backs):
        before = rsts(site.lab)
        served, connects = curl_tls(site, NAMES)
        assert connects == 1
        assert served == ["b0", "b1", "b0", "b1"], site.front.log_text()[-3000:]
        assert [r["hs"] for r in site.front.access()] == ["out"] * len(NAMES)
        assert rsts(site.lab) == before
        assert site.agent.errors == []
        for n in (site.front, *site.backs):
            assert n.bad_log_lines() == [], n.host.name


def test_tls13_without_ktls_receive_is_served_locally(site_for: Callable[[str], Site]) -> None:
    site = site_for("TLSv1.3")
    with running(site.front, *site.backs):
        served, connects = curl_tls(site, NAMES[:2])
        assert (served, connects) == (["f0", "f0"], 1)
        assert site.agent.handed_in == {"f0": 0, "b0": 0, "b1": 0}
