"""Handoff latencies from the agents' phase timings (`xo agent --timings`, JSON lines).

Each line is one finished step on one agent: {"agent", "kind", "id", "us": {phase: µs}}.
Kinds: offload and end on the owner, handoff and give_back on the target. Only names and
durations are in these files, never state bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

US_PER_MS = 1000.0
PERCENT = 100


class TimingsError(ValueError):
    """A timings file line that is not a phase record."""


@dataclass(frozen=True)
class Step:
    agent: str
    kind: str
    phases_us: dict[str, float]

    @property
    def total_ms(self) -> float:
        return sum(self.phases_us.values()) / US_PER_MS


def read(paths: Iterable[Path]) -> list[Step]:
    steps = []
    for path in paths:
        if not path.exists():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                d = json.loads(line)
                steps.append(Step(str(d["agent"]), str(d["kind"]),
                                  {str(k): float(v) for k, v in d["us"].items()}))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise TimingsError(f"{path}:{n}: not a phase record: {e}") from None
    return steps


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / PERCENT * len(ordered)))
    return ordered[rank - 1]


def by_kind(steps: list[Step]) -> dict[str, list[float]]:
    """Total ms of every step, per kind."""
    out: dict[str, list[float]] = {}
    for s in steps:
        out.setdefault(s.kind, []).append(s.total_ms)
    return out


def phases(steps: list[Step], kind: str) -> dict[str, list[float]]:
    """ms of each phase of the steps of one kind, phases in protocol order."""
    out: dict[str, list[float]] = {}
    for s in steps:
        if s.kind == kind:
            for name, us in s.phases_us.items():
                out.setdefault(name, []).append(us / US_PER_MS)
    return out
