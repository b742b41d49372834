"""TLS through the nginx handoff module on a kernel without kTLS (this host): OpenSSL keeps the
record layer in user space despite `ssl_conf_command Options KTLS`, so the connection cannot
move. Every request is served by the frontend, correctly, on one connection, and the module
logs why once. (Where the kernel has kTLS, the kernel tier tests the handoff itself.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nginx_util as nx
import pytest

from xo.nginxlab import backend_server, build_module, handoff_targets, lab_nginx, tls_lines
from xo.pki import DevCA
from xo.tls import kernel

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed"),
    pytest.mark.skipif(
        kernel.unavailable_reason() is None,
        reason="this kernel has kTLS: TLS connections are handed off (tests/kernel)",
    ),
]

HOST = "xo.test"
TLS_PORT = 443
NAMES = ["64k.bin", "small.bin", "1m.bin"]
CIPHER = "ECDHE-ECDSA-AES128-GCM-SHA256"  # a kTLS cipher: the kernel is what is missing
RST = ("TcpOutRsts", "TcpEstabResets", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose")
REASON = (
    "handoff: TLSv1.2 connection served here: kTLS is off for sending "
    "(needs ssl_conf_command Options KTLS, a kTLS cipher and the kernel's tls module)"
)
WAIT_S = 5.0


def test_tls_without_ktls_is_served_by_the_frontend_with_its_reason() -> None:
    module = build_module()
    with nx.files_lab("xo-nginx-tls-") as (lab, directory, files):
        pki = DevCA().write(directory / "site-pki", HOST)
        hosts = [h.name for h in (*lab.frontends, *lab.backends)]
        targets = {f"{b.ip4}:{nx.BACKEND_PORT}": b.name for b in lab.backends}
        tls = tls_lines(str(lab.vip4), TLS_PORT, HOST, pki.cert, pki.key, "TLSv1.2", CIPHER)
        front_conf = f"""
    server {{
{tls}
        root {directory / "www"};
        add_header X-Served-By f0 always;
        location /files/ {{
            handoff_out;
{handoff_targets(targets)}
        }}
    }}"""
        with nx.StandInAgent(directory, hosts, targets) as agent:
            front, backs = lab_nginx(
                lab,
                directory,
                module,
                front_conf,
                lambda b: backend_server(b, directory / "www", nx.BACKEND_PORT),
                lambda h: Path(agent.path(h.name)),
            )
            site = nx.Site(lab, front, backs, files, directory)
            with nx.serving(site):
                nx.wait_connected(site.nginx, WAIT_S)
                before, fds = nx.rst_counts(lab, RST, RST), nx.fd_counts(site)
                extra = ["--cacert", str(pki.ca), "--resolve", f"{HOST}:{TLS_PORT}:{lab.vip4}"]
                extra += ["--tlsv1.2", "--tls-max", "1.2", "--ciphers", CIPHER]
                urls = [f"https://{HOST}/files/{n}" for n in NAMES]
                served, connects = nx.curl_files(site, urls, NAMES, extra)
                assert (served, connects) == (["f0"] * len(NAMES), 1)
                assert front.log_text().count(REASON) == 1  # once per connection
                assert [r["hs"] for r in front.access()] == ["-"] * len(NAMES)
                assert agent.handed_in == dict.fromkeys(hosts, 0)
                assert nx.rst_counts(lab, RST, RST) == before
                nx.wait_for("worker fds", lambda: nx.fd_counts(site), fds, WAIT_S)
