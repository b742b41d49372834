"""The module's directives as nginx parses them (`nginx -t` on real configurations): valid ones
load, invalid ones are refused with a message that names the problem."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from xo.nginxlab import build_module, shared_dir

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="nginx -t opens its logs as root here"),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="Debian's nginx is not installed"),
]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = shared_dir("xo-nginx-conf-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nginx_t(workdir: Path, http: str) -> subprocess.CompletedProcess[str]:
    so = build_module()
    conf = workdir / "nginx.conf"
    conf.write_text(
        f"load_module {so};\npid {workdir}/nginx.pid;\nevents {{}}\n"
        f"http {{\n    access_log off;\n{http}\n}}\n"
    )
    return subprocess.run(
        ["nginx", "-t", "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_full_configuration_loads(workdir: Path) -> None:
    res = nginx_t(
        workdir,
        """
    handoff_agent unix:/run/xo/agent.sock;
    handoff_app web;
    handoff_agent_retry 500ms;
    handoff_giveback_timeout 3s;
    handoff_freq 3;
    server {
        listen 127.0.0.1:18080;
        handoff_in on;
        location /a/ { handoff_out; handoff_target b0; handoff_target 198.18.0.51:8080;
                       handoff_timeout 2s; }
        location /b/ { handoff_out; handoff_target [fd00::2]:80; handoff_freq 0; }
        location /c/ { return 200 "$handoff_status $handoff_target $handoff_id"; }
    }""",
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    ("http", "message"),
    [
        ("handoff_agent /run/xo.sock;", 'wants "unix:PATH"'),
        ("handoff_agent unix:/" + "x" * 120 + ";", "path too long"),
        ("handoff_agent unix:/a; handoff_agent unix:/b;", "is duplicate"),
        ("server { location / { handoff_out; } }", 'needs a "handoff_target"'),
        (
            "server { location / { handoff_out; handoff_target b0:http; } }",
            "peer name or ADDR:PORT",
        ),
        ("server { location / { handoff_out; handoff_target 'b 0'; } }", "peer name or ADDR:PORT"),
        ("server { location / { handoff_out; handoff_out; handoff_target b0; } }", "is duplicate"),
        ("handoff_freq -1;", "invalid number"),
        ("server { handoff_in maybe; }", "invalid value"),
        ("server { location / { handoff_in on; } }", "is not allowed here"),
    ],
)
def test_bad_configuration_is_refused_with_a_reason(workdir: Path, http: str, message: str) -> None:
    res = nginx_t(workdir, http)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr
