"""Benchmark TCP state capture, restore and the blackout a client sees.

examples:
  xo bench-tcp                        200 runs per queue size (empty, 64 KiB, 1 MiB)
  xo bench-tcp --runs 50 --sizes 0    quick look at the empty-queue case
  xo bench-tcp --profile              also profile capture/restore (syscalls vs Python)

How: a lab with a client namespace and a server namespace. Per run the client (a separate
process, plain sockets) opens a connection and does three request/response rounds of SIZE
bytes (one byte for "empty"). On every other run the server migrates the connection in the
middle of round 2: freeze the flow (nftables), queue the response (so the send queue holds
SIZE bytes, part unacked, part unsent, and the receive queue holds the request), capture,
release, restore in place, thaw, nudge. Blackout = round-2 time of a migrated run minus the
median round-2 time of the unmigrated runs (same sizes, same run of the command).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import select
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from xo import tcp, uapi
from xo.freeze import NftFreezer, inbound_flow
from xo.tcp.handover import unread_bytes

PORT = 7070
ROUNDS = 3  # round 0 warms the connection up; the migration happens in round MIGRATE_ROUND
MIGRATE_ROUND = 1
BUF = 4 * 1024 * 1024  # forced on the listener so a 1 MiB response is queued at once
DEFAULT_SIZES = (0, 64 * 1024, 1024 * 1024)
NS_PER_US = 1000
PROFILE_FACTOR = 10  # the rusage split needs many samples: the kernel accounts in ticks
PERCENTILE_99 = 0.99
IO_TIMEOUT_S = 30.0


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p99": _pct(values, PERCENTILE_99)}


# --- the client (run as `python -m xo.bench_tcp HOST PORT RUNS SIZE`) ---------------------
def client_main(argv: list[str]) -> int:
    host, port, runs, size = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    request = random.Random(size).randbytes(max(size, 1))
    response = size + max(size, 1)
    times: list[list[int]] = []
    for _ in range(runs):
        with socket.create_connection((host, port), timeout=IO_TIMEOUT_S) as s:
            rtts = []
            for _ in range(ROUNDS):
                t0 = time.perf_counter_ns()
                s.sendall(request)
                got = 0
                while got < response:
                    n = len(s.recv(response - got))
                    if n == 0:
                        raise SystemExit("server closed early")
                    got += n
                rtts.append(time.perf_counter_ns() - t0)
            times.append(rtts)
    print(json.dumps(times))
    return 0


# --- the server (in-process, inside the server namespace) ----------------------------------
def _read_exactly(conn: socket.socket, n: int) -> None:
    while n:
        n -= len(conn.recv(n))


def _wait_queued(conn: socket.socket, n: int) -> None:
    """Wait until the whole request sits unread in the receive queue."""
    while unread_bytes(conn) < n:
        select.select([conn], [], [], IO_TIMEOUT_S)


def _migrate(conn: socket.socket, first: bytes, freezer: NftFreezer) -> tuple[Any, dict]:
    """Freeze, queue `first`, capture, release, restore in place, thaw, nudge."""
    flow = inbound_flow(conn)
    t0 = time.perf_counter_ns()
    freezer.freeze(flow)
    t1 = time.perf_counter_ns()
    conn.setblocking(False)
    view = memoryview(first)
    while view:
        view = view[conn.send(view) :]
    t2 = time.perf_counter_ns()
    state = tcp.capture(conn)
    t3 = time.perf_counter_ns()
    wire = state.to_bytes()
    parsed = tcp.TcpState.from_bytes(wire)
    t4 = time.perf_counter_ns()
    tcp.release(conn)
    t5 = time.perf_counter_ns()
    new = tcp.restore(parsed, probe=False)
    t6 = time.perf_counter_ns()
    freezer.thaw(flow)
    t7 = time.perf_counter_ns()
    tcp.nudge(new)
    t8 = time.perf_counter_ns()
    new.settimeout(IO_TIMEOUT_S)
    return new, {
        "freeze": t1 - t0,
        "capture": t3 - t2,
        "encode_decode": t4 - t3,
        "release": t5 - t4,
        "restore": t6 - t5,
        "thaw": t7 - t6,
        "nudge": t8 - t7,
        "frozen": t8 - t0,
        "queues": [len(state.recv_queue), len(state.send_unacked), len(state.send_unsent)],
    }


def _serve(lsock: socket.socket, runs: int, size: int, freezer: NftFreezer) -> list[dict]:
    """Each round: request of max(size, 1) bytes, response of size + max(size, 1) bytes.

    In a migrated round the request stays unread and the response's first `size` bytes
    are queued before the capture (the queues under test); the rest is written by the
    restored socket, so the client's round time contains the whole migration.
    """
    request = max(size, 1)
    first = random.Random(-size).randbytes(size)
    second = random.Random(size).randbytes(request)
    out = []
    for run in range(runs):
        conn, _ = lsock.accept()
        conn.settimeout(IO_TIMEOUT_S)
        for rnd in range(ROUNDS):
            if rnd == MIGRATE_ROUND and run % 2:
                if size:
                    _wait_queued(conn, request)
                else:
                    _read_exactly(conn, request)  # "empty": nothing left in either queue
                conn, timings = _migrate(conn, first, freezer)
                out.append(timings)
                if size:
                    _read_exactly(conn, request)
            else:
                _read_exactly(conn, request)
                conn.sendall(first)
            conn.sendall(second)
        conn.close()
    return out


def bench_size(lab: Any, runs: int, size: int) -> dict[str, Any]:
    """`runs` migrated and `runs` unmigrated connections with requests of `size` bytes."""
    c, b = lab.clients[0], lab.backends[0]
    with b.enter():
        lsock = socket.create_server((str(b.ip4), PORT), reuse_port=False)
        for opt in (uapi.SO_SNDBUFFORCE, uapi.SO_RCVBUFFORCE):
            lsock.setsockopt(socket.SOL_SOCKET, opt, BUF // 2)
        client = c.popen(
            [sys.executable, "-m", "xo.bench_tcp", str(b.ip4), str(PORT), str(2 * runs),
             str(size)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        with NftFreezer() as freezer:
            timings = _serve(lsock, 2 * runs, size, freezer)
        lsock.close()
    out, _ = client.communicate(timeout=IO_TIMEOUT_S)
    rtts = json.loads(out)
    baseline = [r[MIGRATE_ROUND] for i, r in enumerate(rtts) if i % 2 == 0]
    migrated = [r[MIGRATE_ROUND] for i, r in enumerate(rtts) if i % 2 == 1]
    base = statistics.median(baseline)
    us = {k: [t[k] / NS_PER_US for t in timings] for k in timings[0] if k != "queues"}
    return {
        "size": size,
        "runs": runs,
        "queues_median": [statistics.median(t["queues"][i] for t in timings) for i in range(3)],
        "round_us_unmigrated": _summary([x / NS_PER_US for x in baseline]),
        "round_us_migrated": _summary([x / NS_PER_US for x in migrated]),
        "blackout_us": _summary([(x - base) / NS_PER_US for x in migrated]),
        **{f"{k}_us": _summary(v) for k, v in us.items()},
    }


def profile(lab: Any, runs: int) -> dict[str, float]:
    """Where the time of capture+release+restore (empty queues) goes: kernel time (the
    syscalls' work) vs user time (Python), from getrusage(RUSAGE_THREAD) summed over
    PROFILE_FACTOR * runs migrations (a profiler would inflate the Python side)."""
    b = lab.backends[0]
    n = runs * PROFILE_FACTOR
    wall = user = kernel = 0.0
    with b.enter():
        lsock = socket.create_server(("127.0.0.1", 0))
        for _ in range(n):
            client = socket.create_connection(lsock.getsockname())
            conn, _ = lsock.accept()
            r0, t0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
            state = tcp.capture(conn)
            tcp.release(conn)
            conn = tcp.restore(state)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_THREAD)
            wall += t1 - t0
            user += r1.ru_utime - r0.ru_utime
            kernel += r1.ru_stime - r0.ru_stime
            conn.close()
            client.close()
        lsock.close()
    us = 1e6 / n
    return {"migrations": n, "wall_us": wall * us, "user_us": user * us, "kernel_us": kernel * us}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=200, help="migrations per size (>= 200)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="queue bytes"
    )
    parser.add_argument(
        "--profile", action="store_true", help="split capture+restore time: Python vs kernel"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per size")


def _line(r: dict[str, Any]) -> str:
    def f(key: str) -> str:
        return f"{r[key]['median']:8.1f} {r[key]['p99']:8.1f}"

    label = "empty" if r["size"] == 0 else f"{r['size'] // 1024} KiB"
    return (
        f"{label:>9} | {f('capture_us')} | {f('restore_us')} | {f('frozen_us')} | "
        f"{f('blackout_us')} | {f('freeze_us')} | {f('thaw_us')}"
    )


def run(args: argparse.Namespace) -> int:
    from xo.lab import Lab

    with Lab(clients=1, frontends=0, backends=1) as lab:
        results = [bench_size(lab, args.runs, size) for size in args.sizes]
        prof = profile(lab, args.runs) if args.profile else None
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(f"runs per size: {args.runs} migrated + {args.runs} unmigrated; times in us")
        print(
            "    queue |  capture med/p99  |  restore med/p99  |  frozen med/p99   |"
            "  blackout med/p99 |  freeze med/p99   |   thaw med/p99"
        )
        for r in results:
            print(_line(r))
        for r in results:
            print(
                f"size {r['size']}: queues recv/unacked/unsent (median) {r['queues_median']}, "
                f"round unmigrated {r['round_us_unmigrated']['median']:.1f} us, "
                f"encode+decode {r['encode_decode_us']['median']:.1f} us, "
                f"release {r['release_us']['median']:.1f} us, "
                f"nudge {r['nudge_us']['median']:.1f} us"
            )
    if prof:
        print(
            f"profile over {prof['migrations']} capture+release+restore (empty queues): "
            f"{prof['wall_us']:.1f} us wall each, {prof['user_us']:.1f} us user (Python), "
            f"{prof['kernel_us']:.1f} us kernel (syscalls)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))
