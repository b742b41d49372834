"""`xo bench --quick` in a real lab: the report directory, its tables and its plots."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.net

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_PIXELS = 400  # the figures are ~840x500 and ~960x600: a broken save is far smaller


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    width, height = struct.unpack("!II", data[16:24])  # IHDR, right after the magic
    return width, height


def test_bench_quick_writes_the_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "report"
    p = subprocess.run([sys.executable, "-m", "xo.cli", "bench", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "[1/2] s3" in p.stdout and "[2/2] datapath" in p.stdout and "done in" in p.stdout

    for name in ("handoff_latency_cdf.png", "throughput_vs_size.png"):
        w, h = png_size(out / name)
        assert w > MIN_PIXELS and h > MIN_PIXELS, (name, w, h)

    res = json.loads((out / "results.json").read_text())
    tp = res["throughput_mibps"]
    assert set(tp) == {"proxy", "offload", "node"}
    assert all(set(v) == {"1", "8"} and min(v.values()) > 0 for v in tp.values())
    lat = res["latency_ms"]
    # Every offloaded GET is one offload, handoff, give back and end in the agents' timings.
    n = len(lat["offload"])
    assert n > 0 and len(lat["handoff"]) >= n and len(lat["give_back"]) > 0
    assert all(v > 0 for v in lat["offload"])

    md = (out / "report.md").read_text()
    assert "![handoff latency CDF](handoff_latency_cdf.png)" in md
    assert "![throughput vs object size](throughput_vs_size.png)" in md
    assert f"| offload | {n} |" in md
    assert "| 8 MiB |" in md and "move, ebpf: blackout" in md
    assert (out / "timings" / "f0.timings.jsonl").exists()
