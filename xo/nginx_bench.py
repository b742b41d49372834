"""Benchmark nginx + the XO handoff module against nginx proxy_pass, same lab, same run.

One lab (c0, f0, b0, b1) with the real xo agents; one frontend nginx serves the VIP twice:
port 80 hands each request off to a backend (handoff_out, targets b0 and b1 round robin), port
81 proxies to the same two backend nginx (proxy_pass, upstream keep-alive). wrk in c0 drives
persistent connections at each file size, the two modes alternating, and the frontend's CPU
time (nginx workers, and the f0 agent that does the handoffs) is read from /proc around each run.

examples:
  xo bench-nginx                              64 KiB, 1 MiB, 4 MiB; 5 s per run
  xo bench-nginx --sizes 1m --duration 10 --connections 16
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xo.lab import Host, Lab
from xo.nginxlab import (
    Nginx,
    backend_server,
    build_module,
    fingerprint,
    handoff_targets,
    lab_nginx,
    make_files,
    running,
    shared_dir,
)

HANDOFF_PORT = 80
PROXY_PORT = 81
BACKEND_PORT = 8080
SIZE_UNITS = {"k": 1024, "m": 1024 * 1024}
SOCKET_MODE = 0o666  # nginx workers run as nobody
CLK_TCK = os.sysconf("SC_CLK_TCK")
# proc(5) numbers the fields of /proc/PID/stat from 1; utime and stime are 14 and 15, and the
# text after the ")" closing the command name starts at field 3.
STAT_UTIME, STAT_STIME, STAT_AFTER_COMM = 14, 15, 3
WRK_TIMEOUT_EXTRA_S = 30


class BenchError(RuntimeError):
    """A run failed: bad response, wrk errors, or nginx/agents did not come up."""


def parse_size(text: str) -> int:
    """'64k' -> 65536, '4m' -> 4194304, '1000' -> 1000."""
    text = text.strip().lower()
    unit = SIZE_UNITS.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in SIZE_UNITS else text
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 64k, 1m, 4m")
    return int(digits) * unit


def size_name(n: int) -> str:
    for suffix, unit in (("MiB", SIZE_UNITS["m"]), ("KiB", SIZE_UNITS["k"])):
        if n % unit == 0:
            return f"{n // unit} {suffix}"
    return f"{n} B"


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads)."""
    total = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
        total += int(fields[STAT_UTIME - STAT_AFTER_COMM])
        total += int(fields[STAT_STIME - STAT_AFTER_COMM])
    return total / CLK_TCK


@dataclass
class Run:
    mode: str
    size: int
    requests_per_s: float
    mib_per_s: float
    p50_ms: float
    p99_ms: float
    nginx_cpu_s: float
    agent_cpu_s: float
    requests: int

    @property
    def cpu_per_request_us(self) -> float:
        return (self.nginx_cpu_s + self.agent_cpu_s) / max(self.requests, 1) * 1e6


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk_requests(out: str) -> int:
    """The requests wrk completed; socket errors or non-2xx responses raise BenchError."""
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if (errors and any(int(x) for x in errors.groups())) or non2xx:
        raise BenchError(f"wrk saw errors:\n{out}")
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def parse_wrk(out: str) -> tuple[int, float, float, float, float]:
    """requests, requests/s, MiB/s, p50 ms, p99 ms; errors raise BenchError."""
    requests = wrk_requests(out)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    rate, unit = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out).groups()  # type: ignore[union-attr]
    mib = float(rate) * {"KB": 1 / 1024, "MB": 1.0, "GB": 1024.0}.get(unit, 0.0)
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return requests, rps, mib, p50, p99


def frontend_servers(lab: Lab, www: Path) -> str:
    targets = handoff_targets(b.name for b in lab.backends)
    upstream = "\n".join(f"        server {b.ip4}:{BACKEND_PORT};" for b in lab.backends)
    return f"""
    upstream xo_backends {{
{upstream}
        keepalive 32;
    }}
    server {{
        listen {lab.vip4}:{HANDOFF_PORT};
        root {www};
        location /files/ {{
            handoff_out;
{targets}
        }}
    }}
    server {{
        listen {lab.vip4}:{PROXY_PORT};
        location /files/ {{
            proxy_pass http://xo_backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def check_body(client: Host, url: str, expect: tuple[int, str], scratch: Path) -> None:
    out = scratch / "check.bin"
    client.run(["curl", "-sS", "--fail", "-o", str(out), url], timeout=60)
    data = out.read_bytes()
    if fingerprint(data) != expect:
        raise BenchError(f"{url}: wrong body ({len(data)} bytes)")


def measure(
    args: argparse.Namespace, lab: Lab, front: Nginx, agent_pid: int, mode: str, url: str, size: int
) -> Run:
    argv = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--latency",
        url,
    ]
    nginx_pids = front.worker_pids()
    n0, a0 = cpu_seconds(nginx_pids), cpu_seconds([agent_pid])
    out = lab.clients[0].run(argv, timeout=args.duration + WRK_TIMEOUT_EXTRA_S).stdout
    n1, a1 = cpu_seconds(nginx_pids), cpu_seconds([agent_pid])
    requests, rps, mib, p50, p99 = parse_wrk(out)
    return Run(mode, size, rps, mib, p50, p99, n1 - n0, a1 - a0, requests)


def table(runs: list[Run]) -> str:
    lines = [
        "| size | mode | req/s | MiB/s | p50 ms | p99 ms | f0 nginx CPU s | f0 agent CPU s "
        "| f0 CPU µs/req |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {size_name(r.size)} | {r.mode} | {r.requests_per_s:.0f} | {r.mib_per_s:.1f} "
            f"| {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.nginx_cpu_s:.2f} | {r.agent_cpu_s:.2f} "
            f"| {r.cpu_per_request_us:.0f} |"
        )
    lines.append("")
    lines.append("| size | handoff/proxy req/s | handoff/proxy f0 nginx CPU per request |")
    lines.append("|---|---|---|")
    for size in sorted({r.size for r in runs}):
        by = {r.mode: r for r in runs if r.size == size}
        if {"handoff", "proxy"} <= by.keys():
            h, p = by["handoff"], by["proxy"]
            rps = h.requests_per_s / p.requests_per_s
            cpu = (h.nginx_cpu_s / max(h.requests, 1)) / max(
                p.nginx_cpu_s / max(p.requests, 1), 1e-12
            )
            lines.append(f"| {size_name(size)} | {rps:.2f}x | {cpu:.2f}x |")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",")],
        default=[64 * 1024, 1024 * 1024, 4 * 1024 * 1024],
        help="comma-separated file sizes (default 64k,1m,4m)",
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=8, help="wrk connections")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")


def run(args: argparse.Namespace) -> int:
    from xo.agent.labkit import LabAgents  # BCC: imported only when the command runs

    if shutil.which("wrk") is None or shutil.which("nginx") is None:
        raise BenchError("needs wrk and nginx (scripts/setup.sh installs both)")
    so = build_module()
    directory = shared_dir("xo-bench-nginx-")
    www = directory / "www"
    names = {f"f{size}.bin": size for size in args.sizes}
    files = make_files(www / "files", names)
    runs: list[Run] = []
    try:
        with Lab(clients=1, frontends=1, backends=2) as lab, LabAgents(lab, directory) as agents:
            f = lab.frontends[0]
            for h in (f, *lab.backends):
                os.chmod(agents.socket_path(h), SOCKET_MODE)
            front, backs = lab_nginx(
                lab,
                directory,
                so,
                frontend_servers(lab, www),
                lambda b: backend_server(b, www, BACKEND_PORT),
                lambda h: Path(agents.socket_path(h)),
            )
            with running(front, *backs), tempfile.TemporaryDirectory() as scratch:
                agent_pid = agents.procs[f.name].pid
                for name, size in names.items():
                    for mode, port in (("proxy", PROXY_PORT), ("handoff", HANDOFF_PORT)):
                        url = f"http://{lab.vip4}:{port}/files/{name}"
                        check_body(lab.clients[0], url, files[name], Path(scratch))
                        runs.append(measure(args, lab, front, agent_pid, mode, url, size))
                        print(
                            f"{size_name(size)} {mode}: {runs[-1].requests_per_s:.0f} req/s",
                            flush=True,
                        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"\nwrk -t{args.threads} -c{args.connections} -d{args.duration}s, "
        "f0 nginx 1 worker, backends 1 worker each\n"
    )
    print(table(runs))
    return 0
