"""Run the project's benchmarks in a lab and write a report a person can read at a glance.

Stages (each prints its progress and elapsed time):
  s3        one lab (c0, f0, b0..b2) with the real agents and the S3 gateway/nodes: GET
            throughput per object size, proxy vs offload vs node-direct, modes interleaved
            in the same run (the `xo s3-bench` measurement); the agents' phase timings of
            the same run give the handoff latency distribution
  datapath  `xo bench-datapath`: eBPF map operations and a move's blackout (eBPF vs nft)

The report directory holds report.md (tables + the figures), handoff_latency_cdf.png,
throughput_vs_size.png, results.json and the raw timings (names and durations only).

examples:
  xo bench                              full run (sizes 1,4,8,64 MiB, 3 rounds)
  xo bench --quick                      CI-sized (sizes 1,8 MiB, 1 round, short datapath)
  xo bench --quick --out /tmp/report    choose the report directory
  xo bench --only s3                    one stage
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xo.bench import latency, plots

STAGES = ("s3", "datapath")
MODES = ["proxy", "offload", "node"]
TICK_S = 1.0
STAGE_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Plan:
    sizes_mib: list[int]
    rounds: int
    datapath_ops: int
    datapath_moves: int


FULL = Plan([1, 4, 8, 64], 3, 20000, 30)
QUICK = Plan([1, 8], 1, 2000, 5)


class BenchError(RuntimeError):
    """A benchmark stage failed; the message says which and why."""


@dataclass
class Results:
    plan: Plan
    started: float = field(default_factory=time.time)
    stage_s: dict[str, float] = field(default_factory=dict)
    mibps: dict[str, dict[int, float]] = field(default_factory=dict)  # mode -> size -> median
    steps: list[latency.Step] = field(default_factory=list)
    datapath_table: str = ""


class Progress:
    """`[i/n] stage ... done in Xs`; on a terminal the elapsed time ticks while it runs."""

    def __init__(self, total: int) -> None:
        self.total, self.i = total, 0
        self.tty = sys.stdout.isatty()

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        self.i += 1
        label = f"[{self.i}/{self.total}] {name}: {what}"
        print(label + " ...", flush=True)
        t0 = time.monotonic()
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(label, t0, stop), daemon=True)
        if self.tty:
            ticker.start()
        try:
            yield
        finally:
            stop.set()
            if self.tty:
                ticker.join()
        print(f"{label}: done in {time.monotonic() - t0:.1f}s", flush=True)

    @staticmethod
    def _tick(label: str, t0: float, stop: threading.Event) -> None:
        while not stop.wait(TICK_S):
            print(f"\r  {label}: {time.monotonic() - t0:.0f}s", end="", flush=True)
        print("\r", end="", flush=True)


def _stage_s3(res: Results, out: Path) -> None:
    # Imported here: the lab needs root and pulls boto3 and gRPC in.
    from xo.agent.labkit import LabAgents
    from xo.lab import Lab
    from xo.rgw.cmd_bench import BATCH_MIB, MIB, THRESHOLD, _measure
    from xo.rgw.labrun import S3Deployment

    raw: dict[tuple[str, int], list[float]] = {}
    sizes = res.plan.sizes_mib
    with tempfile.TemporaryDirectory(prefix="xo-bench-") as tmp, \
            Lab(clients=1, frontends=1, backends=3) as lab, \
            LabAgents(lab, Path(tmp) / "agents") as agents:
        sockets = {h.name: agents.socket_path(h) for h in [*lab.frontends, *lab.backends]}
        dep = S3Deployment(lab, Path(tmp) / "s3", offload=True, threshold=THRESHOLD,
                           agent_sockets=sockets, verbose=True)
        with dep:
            _measure(dep, sizes, MODES, res.plan.rounds, BATCH_MIB * MIB, raw)
        timings = [agents.timings_path(h) for h in agents.hosts]
        res.steps = latency.read(timings)
        (out / "timings").mkdir(exist_ok=True)
        for p in timings:
            if p.exists():
                shutil.copy(p, out / "timings" / p.name)
    res.mibps = {m: {s: statistics.median(raw[m, s]) for s in sizes} for m in MODES}


def _stage_datapath(res: Results, out: Path) -> None:
    argv = [sys.executable, "-m", "xo.cli", "bench-datapath", "--ops",
            str(res.plan.datapath_ops), "--moves", str(res.plan.datapath_moves)]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"bench-datapath took more than {STAGE_TIMEOUT_S}s") from None
    if p.returncode != 0:
        raise BenchError(f"bench-datapath failed ({p.returncode}): {p.stderr[-1000:]}")
    res.datapath_table = p.stdout.strip()
    (out / "datapath.txt").write_text(p.stdout)


RUNNERS: dict[str, tuple[str, Callable[[Results, Path], None]]] = {
    "s3": ("S3 GET proxy vs offload + handoff latency (lab, real agents)", _stage_s3),
    "datapath": ("eBPF flow table and move blackout (xo bench-datapath)", _stage_datapath),
}


def _ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _latency_md(res: Results) -> list[str]:
    kinds = latency.by_kind(res.steps)
    lines = ["| step (agent role) | n | p50 ms | p90 ms | p99 ms | max ms |",
             "|---|---|---|---|---|---|"]
    for kind in ("offload", "end", "handoff", "give_back"):
        v = kinds.get(kind)
        if v:
            lines.append(f"| {kind} | {len(v)} | " + " | ".join(
                _ms(latency.percentile(v, p)) for p in (50, 90, 99, 100)) + " |")
    ph = latency.phases(res.steps, "offload")
    if ph:
        lines += ["", "Phases of an offload on the owner (f0):", "",
                  "| phase | p50 ms | p99 ms |", "|---|---|---|"]
        lines += [f"| {name} | {_ms(latency.percentile(v, 50))} | "
                  f"{_ms(latency.percentile(v, 99))} |" for name, v in ph.items()]
    return lines


def _throughput_md(res: Results) -> list[str]:
    lines = ["| size | proxy MiB/s | offload MiB/s | node direct MiB/s | offload / proxy |",
             "|---|---:|---:|---:|---:|"]
    for s in res.plan.sizes_mib:
        m = {mode: res.mibps[mode][s] for mode in MODES}
        lines.append(f"| {s} MiB | {m['proxy']:.0f} | {m['offload']:.0f} | {m['node']:.0f} | "
                     f"**{m['offload'] / m['proxy']:.2f}x** |")
    return lines


def write_report(res: Results, out: Path, argv: list[str]) -> Path:
    """report.md, the PNGs and results.json from whatever stages ran."""
    uname = platform.uname()
    md = ["# XO benchmark report", "",
          f"- command: `xo {' '.join(argv)}`",
          f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(res.started))}",
          f"- host: Linux {uname.release}, {os.cpu_count()} CPUs (shared: compare columns "
          "of one run, not absolute numbers between runs)",
          "- stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in res.stage_s.items()), ""]
    if res.mibps:
        plots.throughput(res.plan.sizes_mib, {m: [res.mibps[m][s] for s in res.plan.sizes_mib]
                                              for m in MODES},
                         out / "throughput_vs_size.png",
                         "S3 GET throughput: offload vs proxy (same lab, same run)")
        md += ["## Throughput vs object size: offload vs proxy", "",
               "![throughput vs object size](throughput_vs_size.png)", ""]
        md += _throughput_md(res)
        md += ["", f"Median of {res.plan.rounds} round(s); curl in c0 on one keep-alive "
               "connection per batch. proxy: the gateway relays the object; offload: the "
               "gateway hands the connection to the node holding the object (XO); node "
               "direct: the node's own HTTP server, no gateway (reference).", ""]
    if res.steps:
        plots.latency_cdf(latency.by_kind(res.steps), out / "handoff_latency_cdf.png",
                          "Handoff latency per step (agents' phase timings, same run)")
        md += ["## Handoff latency", "", "![handoff latency CDF](handoff_latency_cdf.png)", ""]
        md += _latency_md(res)
        md += ["", "From the agents' `--timings` files of the S3 run: every offloaded GET is "
               "one offload + handoff + give back + end.", ""]
    if res.datapath_table:
        md += ["## Datapath", "", f"`xo bench-datapath --ops {res.plan.datapath_ops} --moves "
               f"{res.plan.datapath_moves}`:", "", res.datapath_table, ""]
    (out / "report.md").write_text("\n".join(md))
    doc: dict[str, Any] = {
        "plan": vars(res.plan), "stage_s": res.stage_s,
        "throughput_mibps": {m: {str(s): v for s, v in d.items()} for m, d in res.mibps.items()},
        "latency_ms": latency.by_kind(res.steps),
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    return out / "report.md"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI-sized run (about a minute)")
    parser.add_argument("--out", type=Path, help="report directory (default bench-report-TIME)")
    parser.add_argument("--only", choices=STAGES, action="append", help="run only this stage")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("xo bench: needs root (network namespaces, TC programs, TCP_REPAIR)",
              file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    out = args.out or Path(f"bench-report-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    stages = args.only or list(STAGES)
    res = Results(plan)
    progress = Progress(len(stages))
    failed = []
    for name in stages:
        what, runner = RUNNERS[name]
        t0 = time.monotonic()
        with progress.stage(name, what):
            try:
                runner(res, out)
            except Exception as e:  # a failed stage must not lose the others' results
                failed.append(name)
                print(f"xo bench: stage {name} failed: {e}", file=sys.stderr)
        res.stage_s[name] = time.monotonic() - t0
    argv = ["bench", *(["--quick"] if args.quick else []),
            *(f"--only {s}" for s in args.only or [])]
    report = write_report(res, out, argv)
    print(f"report: {report}")
    return 1 if failed else 0
