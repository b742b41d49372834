"""Live demo: one keep-alive HTTP connection moves between a frontend and two backends.

Builds a lab (client c0, frontend f0 holding the VIP, backends b0 and b1), starts one
`xo agent` per server host with mutual TLS, an HTTP/1.1 frontend app that serves small
responses itself and offloads large ones to a backend (round robin), and backends that serve
and give the connection back. An unmodified client (Python's http.client, or curl) makes
keep-alive requests; each line shows who served it. The summary compares the bytes the
frontend relayed with the bytes the backends sent straight to the client, and the handoff
latency percentiles (from the agents' own phase timings).

examples:
  xo demo                              24 requests, alternating 2 kB and 1 MB
  xo demo --client curl                the same with curl (one connection, --keepalive)
  xo demo -n 60 --large 4000000        more and larger offloaded responses
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from xo.agent.labkit import LabAgents
from xo.httpapp import HTTP_PORT, LabApps, body, lab_apps
from xo.lab import Host, Lab

DEFAULT_REQUESTS = 24
DEFAULT_SMALL = 2000
DEFAULT_LARGE = 1_000_000
# Responses above this go to a backend (between the demo's small and large sizes).
OFFLOAD_ABOVE = 16 * 1024
CLIENT_TIMEOUT_S = 30.0
PERCENTILES = (50, 90, 99)


class DemoError(RuntimeError):
    """A response was wrong (size, bytes) or the client failed."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--requests", type=int, default=DEFAULT_REQUESTS,
                        help=f"requests on the one connection (default {DEFAULT_REQUESTS})")
    parser.add_argument("--small", type=int, default=DEFAULT_SMALL,
                        help="size of the responses the frontend serves itself")
    parser.add_argument("--large", type=int, default=DEFAULT_LARGE,
                        help="size of the responses offloaded to a backend")
    parser.add_argument("--client", choices=("python", "curl"), default="python")


def sizes(n: int, small: int, large: int) -> list[int]:
    return [small if i % 2 == 0 else large for i in range(n)]


def python_client(c: Host, vip: str, plan: list[int]) -> list[tuple[int, str, float]]:
    """http.client, one keep-alive connection; checks every body byte for byte."""
    out = []
    with c.enter():
        conn = http.client.HTTPConnection(vip, HTTP_PORT, timeout=CLIENT_TIMEOUT_S)
        conn.connect()
    try:
        for i, size in enumerate(plan, 1):
            t0 = time.perf_counter()
            conn.request("GET", f"/size/{size}")
            r = conn.getresponse()
            data = r.read()
            ms = (time.perf_counter() - t0) * 1000
            if r.status != 200 or data != body(size):
                raise DemoError(f"request {i}: status {r.status}, {len(data)} bytes, "
                                f"{'exact' if data == body(size) else 'WRONG BYTES'}")
            who = r.getheader("X-Served-By") or "?"
            print(f"  #{i:<3} GET /size/{size:<8} <- {who:<3} {len(data):>9} bytes, exact, "
                  f"{ms:7.1f} ms", flush=True)
            out.append((size, who, ms))
    finally:
        conn.close()
    return out


def curl_client(c: Host, vip: str, plan: list[int]) -> list[tuple[int, str, float]]:
    """curl fetching every URL over one connection (num_connects 0 = reused)."""
    fmt = "%{http_code} %{size_download} %{num_connects} %{time_total} %header{x-served-by}\\n"
    argv = ["curl", "-s", "--keepalive", "-o", "/dev/null", "-w", fmt]
    for size in plan:
        argv += [f"http://{vip}:{HTTP_PORT}/size/{size}", "-o", "/dev/null"]
    p = c.popen(argv, stdout=subprocess.PIPE, text=True)
    out = []
    connects = 0
    out_lines = p.stdout
    if out_lines is None:
        raise DemoError("curl's output was not captured")
    for i, (size, line) in enumerate(zip(plan, out_lines, strict=False), 1):
        code, got, nconn, total, who = (line.split() + ["?"])[:5]
        connects += int(nconn)
        if code != "200" or int(got) != size:
            raise DemoError(f"request {i}: status {code}, {got} bytes, expected {size}")
        ms = float(total) * 1000
        print(f"  #{i:<3} GET /size/{size:<8} <- {who:<3} {int(got):>9} bytes, "
              f"{'new connection' if int(nconn) else 'same connection'}, {ms:7.1f} ms",
              flush=True)
        out.append((size, who, ms))
    if p.wait() != 0 or len(out) != len(plan):
        raise DemoError(f"curl exited with {p.returncode} after {len(out)} responses")
    if connects != 1:
        raise DemoError(f"curl opened {connects} connections, expected one")
    return out


def _pct(values: list[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def phase_table(agents: LabAgents, owner: Host) -> list[str]:
    """Median and p99 of each offload phase the owner agent recorded (µs)."""
    path = agents.timings_path(owner)
    if not path.exists():
        return []
    rows: dict[str, list[float]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] != "offload":
            continue
        for phase, us in rec["us"].items():
            rows.setdefault(phase, []).append(us)
    return [f"    {phase:<12} median {statistics.median(v):9.1f} µs   p99 {_pct(v, 99):9.1f} µs"
            for phase, v in rows.items()]


def summary(results: list[tuple[int, str, float]], apps: LabApps, agents: LabAgents,
            owner: Host) -> None:
    by = Counter(who for _, who, _ in results)
    fe = apps.frontend.stats
    direct = sum(b.stats.bytes for b in apps.backends)
    print("\nsummary")
    print(f"  requests            {len(results)} on one connection")
    print("  served by           " + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())))
    print(f"  frontend relayed    {fe.bytes:>12,} bytes (its own small responses)")
    print(f"  backends direct     {direct:>12,} bytes (to the client, never via the frontend)")
    print(f"  handoffs            {fe.offloaded} accepted, {fe.refused} refused")
    if fe.handoff_ms:
        pts = ", ".join(f"p{p} {_pct(fe.handoff_ms, p):.2f} ms" for p in PERCENTILES)
        print(f"  handoff latency     {pts} (app's offload call)")
    table = phase_table(agents, owner)
    if table:
        print("  owner agent phases")
        print("\n".join(table))


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.small < 0 or args.large <= OFFLOAD_ABOVE:
        print(f"xo demo: need --requests >= 1 and --large > {OFFLOAD_ABOVE}", file=sys.stderr)
        return 2
    plan = sizes(args.requests, args.small, args.large)
    with Lab(clients=1, frontends=1, backends=2) as lab, \
            tempfile.TemporaryDirectory(prefix="xo-demo-") as tmp:
        print(f"lab {lab.name}: client c0, frontend f0 (VIP {lab.vip4}), backends b0, b1")
        agents = LabAgents(lab, Path(tmp))
        print("starting agents (mutual TLS between f0 and b0, b1) ...", flush=True)
        with agents, lab_apps(lab, agents, small=OFFLOAD_ABOVE) as apps:
            print(f"client: {args.client}, one keep-alive connection to {lab.vip4}:{HTTP_PORT}")
            client = python_client if args.client == "python" else curl_client
            try:
                results = client(lab.clients[0], str(lab.vip4), plan)
            except (DemoError, OSError) as e:
                print(f"xo demo: {e}", file=sys.stderr)
                return 1
            summary(results, apps, agents, lab.frontends[0])
    return 0
