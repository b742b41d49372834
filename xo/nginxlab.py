"""Real nginx in a lab host, with the XO handoff module: build it, configure, start, reload,
stop, read its logs. Shared by the nginx net tests and `xo bench-nginx`.

    with Lab(clients=1, frontends=1, backends=0) as lab:
        so = build_module()
        www = shared_dir("xo-nginx-")
        with Nginx(lab.frontends[0], www / "f0", "server { listen 80; }", so) as n:
            n.worker_pids(), n.access(), n.reload()

nginx is started with `-p DIR -e DIR/error.log -g "daemon off;"` so it writes nothing outside
DIR, and is always stopped (SIGQUIT, then SIGKILL) when the context ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xo.lab import Host, Lab

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "integrations" / "nginx" / "build.sh"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.02
# Log levels that mean a bug in the module (or nginx) when they appear in error.log.
BAD_LOG_LEVELS = ("[alert]", "[crit]", "[emerg]")


class NginxError(RuntimeError):
    """nginx refused its configuration, did not start, or did not reload."""


def build_module() -> Path:
    """Build (or reuse) the module; returns the .so path."""
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def shared_dir(prefix: str) -> Path:
    """A directory nginx workers (user nobody) can traverse, unlike pytest's tmp_path."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o755)
    return d


def fingerprint(data: bytes) -> tuple[int, str]:
    """(size, sha256): what a served body is compared with."""
    return len(data), hashlib.sha256(data).hexdigest()


def make_files(root: Path, sizes: dict[str, int]) -> dict[str, tuple[int, str]]:
    """Random files name -> (size, sha256)."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    out = {}
    for name, size in sizes.items():
        data = os.urandom(size)
        (root / name).write_bytes(data)
        (root / name).chmod(0o644)
        out[name] = fingerprint(data)
    return out


def handoff_targets(targets: Iterable[str]) -> str:
    """`handoff_target` lines for a location block of a server{} template."""
    return "\n".join(f"            handoff_target {t};" for t in targets)


def tls_lines(
    addr: str,
    port: int,
    server_name: str,
    cert: Path,
    key: Path,
    protocol: str,
    cipher: str | None = None,
) -> str:
    """The listen and ssl lines of a TLS server{} that asks OpenSSL for kTLS
    (`ssl_conf_command Options KTLS`): with a kTLS cipher on a kernel with the tls module,
    both directions of a TLS 1.2 connection end up in the kernel and can be handed off."""
    lines = [
        f"listen {addr}:{port} ssl;",
        f"server_name {server_name};",
        f"ssl_certificate {cert};",
        f"ssl_certificate_key {key};",
        f"ssl_protocols {protocol};",
        *([f"ssl_ciphers {cipher};"] if cipher else []),
        "ssl_conf_command Options KTLS;",
    ]
    return "\n".join(f"        {line}" for line in lines)


def backend_server(
    host: Host,
    www: Path,
    port: int,
    *,
    v6: bool = False,
    served_by: bool = False,
    stub: bool = False,
) -> str:
    """The server{} of a backend nginx: `handoff_in` on HOST:port serving the files under www;
    optionally also on its IPv6 address, naming itself in X-Served-By, with /stub status."""
    lines = [f"        listen {host.ip4}:{port};"]
    if v6:
        lines.append(f"        listen [{host.ip6}]:{port};")
    lines += ["        handoff_in on;", f"        root {www};"]
    if served_by:
        lines.append(f"        add_header X-Served-By {host.name} always;")
    if stub:
        lines.append("        location = /stub { stub_status; }")
    body = "\n".join(lines)
    return f"\n    server {{\n{body}\n    }}"


@dataclass
class Nginx:
    """One real nginx (master + workers) in a lab host, from a server{} block."""

    host: Host
    directory: Path
    servers: str
    module: Path
    agent: Path | None = None
    workers: int = 2
    http_extra: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def error_log(self) -> Path:
        return self.directory / "error.log"

    @property
    def access_log(self) -> Path:
        return self.directory / "access.log"

    @property
    def pid_file(self) -> Path:
        return self.directory / "nginx.pid"

    def config(self) -> str:
        d = self.directory
        agent = (
            f"handoff_agent unix:{self.agent};\n    handoff_agent_retry 200ms;"
            if self.agent
            else ""
        )
        temp = "\n".join(
            f"    {kind}_temp_path {d}/tmp_{kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""load_module {self.module};
worker_processes {self.workers};
pid {self.pid_file};
error_log {self.error_log} info;
events {{ worker_connections 1024; }}
http {{
    log_format xo '$remote_addr "$request" $status $body_bytes_sent '
                  'hs=$handoff_status ht=$handoff_target hid=$handoff_id c=$connection';
    access_log {self.access_log} xo;
{temp}
    keepalive_requests 100000;
    sendfile on;
    {agent}
    {self.http_extra}
{self.servers}
}}
"""

    def start(self) -> Nginx:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        conf.write_text(self.config())
        argv = ["nginx", "-p", str(self.directory), "-c", str(conf), "-e", str(self.error_log)]
        check = self.host.run([*argv, "-t"], check=False)
        if check.returncode != 0:
            raise NginxError(f"nginx -t failed:\n{check.stderr}")
        self.proc = self.host.popen([*argv, "-g", "daemon off;"])
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self.worker_pids()) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise NginxError(f"nginx did not start:\n{self.log_text()}")
            time.sleep(POLL_S)
        return self

    def master_pid(self) -> int:
        """`ip netns exec` execs nginx, so the process we started is the master."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else 0

    def worker_pids(self) -> list[int]:
        master = self.master_pid()
        if not master:
            return []
        out = subprocess.run(
            ["ps", "-o", "pid=,args=", "--ppid", str(master)], capture_output=True, text=True
        )
        return [
            int(line.split()[0])
            for line in out.stdout.splitlines()
            if "worker process" in line and "shutting down" not in line
        ]

    def open_fds(self) -> int:
        """File descriptors held by the current workers."""
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.worker_pids())

    def reload(self) -> None:
        """HUP: new workers with the same config; old ones finish and exit gracefully."""
        old = set(self.worker_pids())
        os.kill(self.master_pid(), signal.SIGHUP)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (set(self.worker_pids()) - old) or len(self.worker_pids()) < self.workers:
            if time.monotonic() > deadline:
                raise NginxError("nginx reload did not start new workers")
            time.sleep(POLL_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def bad_log_lines(self) -> list[str]:
        return [ln for ln in self.log_text().splitlines() if any(b in ln for b in BAD_LOG_LEVELS)]

    def access(self) -> list[dict[str, str]]:
        """Access log entries: request, status, bytes and the handoff fields."""
        rows: list[dict[str, str]] = []
        if not self.access_log.exists():
            return rows
        for line in self.access_log.read_text().splitlines():
            _, request, rest = line.split('"', 2)
            status, size, *kv = rest.split()
            row = {"request": request, "status": status, "bytes": size}
            for item in kv:
                key, _, value = item.partition("=")
                row[key] = value
            rows.append(row)
        return rows

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def lab_nginx(
    lab: Lab,
    directory: Path,
    module: Path,
    front_servers: str,
    back_servers: Callable[[Host], str],
    agent_path: Callable[[Host], Path],
    front_workers: int = 1,
    back_workers: int = 1,
) -> tuple[Nginx, list[Nginx]]:
    """The frontend nginx of a lab (on its first frontend) and one nginx per backend, each
    talking to its host's agent socket; not started (see `running`)."""

    def one(h: Host, servers: str, workers: int) -> Nginx:
        return Nginx(
            h, directory / f"nginx-{h.name}", servers, module, agent=agent_path(h), workers=workers
        )

    front = one(lab.frontends[0], front_servers, front_workers)
    return front, [one(b, back_servers(b), back_workers) for b in lab.backends]


@contextlib.contextmanager
def running(*servers: Nginx) -> Iterator[tuple[Nginx, ...]]:
    """Start several nginx instances; stop all of them whatever happens."""
    started: list[Nginx] = []
    try:
        for s in servers:
            started.append(s.start())
        yield servers
    finally:
        for s in started:
            s.stop()
