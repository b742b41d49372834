"""Benchmark the offload protocol: latency by phase, client-visible blackout, handoffs/s.

A lab (c0, f0, b0) with real agents (mTLS) and the HTTP app pair; an unmodified http.client
keep-alive connection alternates a request the frontend serves itself with one it offloads
(the backend answers and gives the connection straight back). The same run measures a
connection that is never offloaded: the baseline the blackouts are computed against.

  offload blackout  = latency of an offloaded request  - baseline median
  return blackout   = latency of the first request after the connection came back - baseline
  phases            = what the agents recorded per handoff (--timings), median and p99

examples:
  xo bench-protocol                      1000 offload + return round trips, one connection
  xo bench-protocol -n 2000              more samples
  xo bench-protocol --parallel 8 -d 10   also 8 connections offloading for 10 s: handoffs/s
  xo bench-protocol --floor 1000         also the transport floor (xo.agent.floor): one
                                         unary call vs one session message, f0 -> b0, mTLS
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from xo.agent.labkit import GRPC_PORT, LabAgents
from xo.httpapp import HTTP_PORT, lab_apps
from xo.lab import Host, Lab

DEFAULT_N = 1000
WARMUP = 20
SMALL_LIMIT = 64  # responses above this are offloaded
LOCAL_SIZE = 10
OFFLOAD_SIZE = 100
TIMEOUT_S = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--handoffs", type=int, default=DEFAULT_N,
                        help=f"offload+return round trips measured (default {DEFAULT_N})")
    parser.add_argument("--parallel", type=int, default=4,
                        help="connections offloading at once for the throughput run")
    parser.add_argument("-d", "--duration", type=float, default=5.0,
                        help="seconds of the throughput run (0: skip it)")
    parser.add_argument("--floor", type=int, default=0, metavar="N",
                        help="also N round trips of bare gRPC between f0 and b0 (0: skip)")


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def connect(c: Host, vip: str) -> http.client.HTTPConnection:
    with c.enter():
        conn = http.client.HTTPConnection(vip, HTTP_PORT, timeout=TIMEOUT_S)
        conn.connect()
    return conn


def get(conn: http.client.HTTPConnection, size: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    conn.request("GET", f"/size/{size}")
    r = conn.getresponse()
    data = r.read()
    ms = (time.perf_counter() - t0) * 1000
    if r.status != 200 or len(data) != size:
        raise RuntimeError(f"bad response: {r.status}, {len(data)} bytes")
    return ms, r.getheader("X-Served-By") or ""


def phases(path: Path, kind: str, skip: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    for rec in [r for r in recs if r["kind"] == kind][skip:]:
        for name, us in rec["us"].items():
            rows.setdefault(name, []).append(us)
    return rows


def throughput(lab: Lab, parallel: int, duration: float) -> tuple[int, float]:
    """Offloads completed by `parallel` connections in `duration` seconds."""
    counts = [0] * parallel
    stop = time.monotonic() + duration
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        conn = connect(lab.clients[0], str(lab.vip4))
        try:
            while time.monotonic() < stop:
                get(conn, OFFLOAD_SIZE)
                counts[i] += 1
        except (OSError, RuntimeError, http.client.HTTPException) as e:
            errors.append(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(parallel)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} connections failed, first: {errors[0]!r}")
    return sum(counts), time.monotonic() - t0


def floor(lab: Lab, pki: Path, n: int) -> dict[str, dict[str, float]]:
    """xo.agent.floor between f0 (client) and b0 (server), next to the agents."""
    f, b = lab.frontends[0], lab.backends[0]
    address = f"{b.ip4}:{GRPC_PORT + 1}"
    module = [sys.executable, "-m", "xo.agent.floor"]
    server = b.popen([*module, "serve", str(pki), b.name, address], stdout=subprocess.PIPE,
                     text=True)
    try:
        if server.stdout is None or "ready" not in server.stdout.readline():
            raise RuntimeError("the floor server did not start")
        out = f.run([*module, "measure", str(pki), f.name, b.name, address, str(n)])
        result: dict[str, dict[str, float]] = json.loads(out.stdout)
        return result
    finally:
        server.terminate()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def run(args: argparse.Namespace) -> int:
    n = args.handoffs
    with Lab(clients=1, frontends=1, backends=1) as lab, \
            tempfile.TemporaryDirectory(prefix="xo-bench-") as tmp:
        agents = LabAgents(lab, Path(tmp))
        with agents, lab_apps(lab, agents, small=SMALL_LIMIT) as apps:
            c = lab.clients[0]
            moving, baseline = connect(c, str(lab.vip4)), connect(c, str(lab.vip4))
            for _ in range(WARMUP):
                get(moving, LOCAL_SIZE), get(moving, OFFLOAD_SIZE), get(baseline, LOCAL_SIZE)
            base, off, back = [], [], []
            t0 = time.perf_counter()
            for _ in range(n):
                ms, who = get(moving, OFFLOAD_SIZE)
                if who != "b0":
                    raise RuntimeError(f"offload refused (served by {who})")
                off.append(ms)
                back.append(get(moving, LOCAL_SIZE)[0])
                base.append(get(baseline, LOCAL_SIZE)[0])
            serial_s = time.perf_counter() - t0
            moving.close()
            baseline.close()
            done, secs = (throughput(lab, args.parallel, args.duration)
                          if args.duration > 0 else (0, 0.0))
            f, b = lab.frontends[0], lab.backends[0]
            owner = phases(agents.timings_path(f), "offload", WARMUP)
            target = phases(agents.timings_path(b), "handoff", WARMUP)
            ret_b = phases(agents.timings_path(b), "give_back", WARMUP)
            ret_f = phases(agents.timings_path(f), "end", WARMUP)
            refused = apps.frontend.stats.refused
        bare = floor(lab, Path(tmp) / "pki", args.floor) if args.floor else {}
    med = statistics.median(base)
    print(f"# xo bench-protocol: {n} offload + return round trips on one keep-alive "
          f"connection (after {WARMUP} warm-up), refused {refused}")
    print("\n| phase (owner f0 unless noted) | median µs | p99 µs |\n|---|---:|---:|")
    for name, rows in [("", owner), ("target b0: ", target)]:
        for k, v in rows.items():
            print(f"| {name}{k} | {statistics.median(v):.0f} | {pct(v, 99):.0f} |")
    frozen = [sum(x) for x in zip(*(owner[k] for k in ("block", "capture", "handoff_rpc",
                                                          "redirect")), strict=True)]
    print(f"| flow frozen on f0 (block..redirect) | {statistics.median(frozen):.0f} | "
          f"{pct(frozen, 99):.0f} |")
    print("\n| return path | median µs | p99 µs |\n|---|---:|---:|")
    for name, rows in [("target b0: ", ret_b), ("owner f0: ", ret_f)]:
        for k, v in rows.items():
            print(f"| {name}{k} | {statistics.median(v):.0f} | {pct(v, 99):.0f} |")
    print("\n| client-visible (ms) | median | p99 |\n|---|---:|---:|")
    print(f"| baseline request (never offloaded) | {med:.3f} | {pct(base, 99):.3f} |")
    print(f"| offloaded request | {statistics.median(off):.3f} | {pct(off, 99):.3f} |")
    print(f"| first request after return | {statistics.median(back):.3f} | "
          f"{pct(back, 99):.3f} |")
    print(f"| offload blackout (offloaded - baseline median) | "
          f"{statistics.median(off) - med:.3f} | {pct(off, 99) - med:.3f} |")
    print(f"| return blackout (after return - baseline median) | "
          f"{statistics.median(back) - med:.3f} | {pct(back, 99) - med:.3f} |")
    print(f"\nserial: {2 * n / serial_s:.0f} handoffs/s (offload + return each count), "
          f"{n} round trips in {serial_s:.1f} s")
    if secs:
        print(f"parallel: {args.parallel} connections, {done} offload+return round trips in "
              f"{secs:.1f} s = {2 * done / secs:.0f} handoffs/s")
    if bare:
        print(f"\n| transport floor, f0 -> b0, nothing else running ({args.floor} round trips) "
              "| median µs | p99 µs |\n|---|---:|---:|")
        for name, row in bare.items():
            print(f"| {name} Handoff round trip | {row['median_us']:.0f} | {row['p99_us']:.0f} |")
    return 0
