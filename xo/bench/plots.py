"""The report's two figures, as PNG files (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402 (after the backend choice)

DPI = 120
SIZE_IN = (7.0, 4.2)
CDF_SIZE_IN = (8.0, 5.0)
LABELS = {
    "offload": "offload (owner: block→capture→Handoff→redirect→Ready)",
    "end": "end (owner: restore the returned connection)",
    "handoff": "handoff (target: rewrite + restore)",
    "give_back": "give back (target: capture → End RPC)",
}
# mode -> (colour, marker, line style, label offset in points: proxy below its points so the
# labels of close values do not overlap)
MODE_STYLE = {
    "offload": ("tab:green", "o", "-", 7),
    "proxy": ("tab:red", "s", "-", -13),
    "node": ("tab:gray", "^", "--", 7),
}
MODE_LABEL = {"node": "node direct (reference, no gateway)"}
HEADROOM = 1.15


def latency_cdf(latencies_ms: dict[str, list[float]], path: Path, title: str) -> None:
    """One CDF line per step kind, log-scale milliseconds."""
    fig, ax = plt.subplots(figsize=CDF_SIZE_IN)
    for kind, values in sorted(latencies_ms.items()):
        if not values:
            continue
        xs = sorted(values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{LABELS.get(kind, kind)}, n={len(xs)}")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("fraction of steps ≤ x")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def throughput(sizes_mib: list[int], mibps: dict[str, list[float]], path: Path,
               title: str) -> None:
    """MiB/s against object size, one line per mode (same lab and run)."""
    fig, ax = plt.subplots(figsize=SIZE_IN)
    for mode, values in mibps.items():
        color, marker, style, dy = MODE_STYLE.get(mode, ("tab:blue", "x", "-", 7))
        ax.plot(sizes_mib, values, marker=marker, color=color, linestyle=style,
                label=MODE_LABEL.get(mode, mode))
        for x, y in zip(sizes_mib, values, strict=True):
            ax.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, dy),
                        ha="center", fontsize="x-small", color=color)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes_mib, [f"{s} MiB" for s in sizes_mib])
    ax.set_xlabel("object size")
    ax.set_ylabel("throughput (MiB/s, median)")
    ax.set_ylim(0, HEADROOM * max((max(v) for v in mibps.values() if v), default=1.0))
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
