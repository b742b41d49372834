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

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xo.lab import Lab
from xo.nginxlab import (
    backend_server,
    build_module,
    handoff_targets,
    lab_nginx,
    running,
)
from xo.pki import DevCA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "net"))
import nginx_util as nx  # noqa: E402  (helpers shared with the net tier)

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("ktls")]

HOST = "xo.test"
NAMES = ["small.bin", "1m.bin", "64k.bin", "small.bin"]
CLIENT_RST = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpEstabResets")
SERVER_RST = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose")
KTLS_CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"  # the dev CA issues EC keys


@dataclass
class TlsSite(nx.Site):
    agent: nx.StandInAgent
    ca: Path


def front_server(lab: Lab, www: Path, cert: Path, key: Path, protocol: str) -> str:
    targets = handoff_targets(f"{b.ip4}:{nx.BACKEND_PORT}" for b in lab.backends)
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


@pytest.fixture
def site_for() -> Iterator[Callable[[str], TlsSite]]:
    so = build_module()
    with nx.files_lab("xo-nginx-tls-") as (lab, directory, files):
        www = directory / "www"
        tls = DevCA().write(directory / "pki", HOST)
        targets = {f"{b.ip4}:{nx.BACKEND_PORT}": b.name for b in lab.backends}
        hosts = [h.name for h in (*lab.frontends, *lab.backends)]
        with nx.StandInAgent(directory, hosts, targets) as agent:

            def make(protocol: str) -> TlsSite:
                front, backs = lab_nginx(
                    lab,
                    directory,
                    so,
                    front_server(lab, www, tls.cert, tls.key, protocol),
                    lambda b: backend_server(b, www, nx.BACKEND_PORT, served_by=True),
                    lambda h: agent.path(h.name),
                )
                return TlsSite(lab, front, backs, files, directory, agent, tls.ca)

            yield make


def rsts(lab: Lab) -> dict[str, int]:
    return nx.rst_counts(lab, CLIENT_RST, SERVER_RST)


def curl_tls(site: TlsSite, names: list[str]) -> tuple[list[str], int]:
    resolve = ["--cacert", str(site.ca), "--resolve", f"{HOST}:443:{site.lab.vip4}"]
    urls = [f"https://{HOST}/files/{name}" for name in names]
    return nx.curl_files(site, urls, names, resolve, timeout=120)


def test_ktls_connection_is_handed_off_and_returned(site_for: Callable[[str], TlsSite]) -> None:
    site = site_for("TLSv1.2")
    with nx.serving(site):  # and no alert/crit/emerg in any error.log afterwards
        before = rsts(site.lab)
        served, connects = curl_tls(site, NAMES)
        assert connects == 1
        assert served == ["b0", "b1", "b0", "b1"], site.front.log_text()[-3000:]
        assert [r["hs"] for r in site.front.access()] == ["out"] * len(NAMES)
        assert rsts(site.lab) == before
        assert site.agent.errors == []


def test_tls13_without_ktls_receive_is_served_locally(site_for: Callable[[str], TlsSite]) -> None:
    site = site_for("TLSv1.3")
    with running(site.front, *site.backs):
        served, connects = curl_tls(site, NAMES[:2])
        assert (served, connects) == (["f0", "f0"], 1)
        assert site.agent.handed_in == {"f0": 0, "b0": 0, "b1": 0}
