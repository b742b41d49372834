"""The agent's counters and latency histograms, rendered in the Prometheus text format.

Why a tiny registry of our own: the agent needs four counter families and two histograms,
and the exposition format is a few lines of text; a client library would add a dependency and
a global registry that tests (several agents in one process) trip over. Gauges (active flows,
rule states, queue depth, peers) are not stored here: they are read from the agent's state at
scrape time (xo.agent.status), so they can never drift from what the agent really holds.

Only names, reasons and durations are recorded: never key, TCP state or payload bytes.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from xo.v1 import local_pb2, offload_pb2

US_PER_S = 1e6
# Handoff phases are µs (map updates) to ms (a gRPC round trip, a restore with big queues);
# a whole offload of a busy connection may take hundreds of ms on a loaded host.
PHASE_BUCKETS_S: tuple[float, ...] = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 1.0,
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OK = "ok"

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    items = (*labels, *extra)
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


@dataclass
class Family:
    """One metric family: name, help, type and its samples by label set."""

    name: str
    help: str
    kind: str  # counter | gauge | histogram
    samples: dict[Labels, float] = field(default_factory=dict)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self.samples.items())]
        return lines


@dataclass
class _Series:
    buckets: list[int]
    sum: float = 0.0
    count: int = 0


class Histogram:
    """Cumulative-bucket histogram per label set (seconds)."""

    def __init__(self, name: str, help_text: str, bounds: Sequence[float]) -> None:
        self.name, self.help, self.bounds = name, help_text, tuple(bounds)
        self._series: dict[Labels, _Series] = {}

    def observe(self, labels: Labels, seconds: float) -> None:
        s = self._series.setdefault(labels, _Series([0] * len(self.bounds)))
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                s.buckets[i] += 1
        s.sum += seconds
        s.count += 1

    def count(self, labels: Labels) -> int:
        s = self._series.get(labels)
        return s.count if s else 0

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for labels, s in sorted(self._series.items()):
            for bound, n in zip((*self.bounds, math.inf), (*s.buckets, s.count), strict=True):
                lines.append(f"{self.name}_bucket{_labels(labels, (('le', _number(bound)),))} {n}")
            lines.append(f"{self.name}_sum{_labels(labels)} {_number(s.sum)}")
            lines.append(f"{self.name}_count{_labels(labels)} {s.count}")
        return lines


class Metrics:
    """What the agent counts as it works; `render` adds the scrape-time gauges."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # log records may come from gRPC's threads
        self.phase = Histogram(
            "xo_handoff_phase_seconds",
            "Duration of one phase of a handoff step (kind: offload, end on the owner; "
            "handoff, give_back on the target)", PHASE_BUCKETS_S)
        self.total = Histogram(
            "xo_handoff_duration_seconds", "Duration of a whole handoff step, by kind",
            PHASE_BUCKETS_S)
        self.ops = Family(
            "xo_operations_total",
            "Offload protocol operations by result (ok or the refusal reason)", "counter")
        self.logs = Family(
            "xo_log_messages_total", "Warnings and errors the agent logged, by level",
            "counter")

    # --- recording ---------------------------------------------------------------------------
    def observe(self, kind: str, phases_us: dict[str, float]) -> None:
        """One finished handoff step with its phase durations in µs (Context.record)."""
        with self._lock:
            for phase, us in phases_us.items():
                self.phase.observe((("kind", kind), ("phase", phase)), us / US_PER_S)
            self.total.observe((("kind", kind),), sum(phases_us.values()) / US_PER_S)

    def count(self, op: str, result: str) -> None:
        with self._lock:
            key = (("op", op), ("result", result))
            self.ops.samples[key] = self.ops.samples.get(key, 0) + 1

    def offload(self, res: local_pb2.OffloadResult) -> None:
        self.count("offload", OK if res.accepted else offload_pb2.Reason.Name(res.reason))

    def handoff(self, reply: offload_pb2.HandoffReply) -> None:
        self.count("handoff", OK if reply.accepted else offload_pb2.Reason.Name(reply.reason))

    def give_back(self, res: local_pb2.GiveBackResult) -> None:
        self.count("give_back", OK if res.ok else "failed")

    def end(self, reply: offload_pb2.EndReply) -> None:
        self.count("end", OK if reply.ok else "failed")

    def logged(self, level: str) -> None:
        with self._lock:
            key = (("level", level),)
            self.logs.samples[key] = self.logs.samples.get(key, 0) + 1

    # --- reading -----------------------------------------------------------------------------
    def refusals(self) -> dict[str, int]:
        """Operations that did not succeed, as "op/RESULT" -> count (for `xo status`)."""
        with self._lock:
            out: dict[str, int] = {}
            for labels, n in self.ops.samples.items():
                d = dict(labels)
                if d["result"] != OK:
                    out[f"{d['op']}/{d['result']}"] = int(n)
            return out

    def render(self, gauges: Iterable[Family] = ()) -> str:
        with self._lock:
            lines: list[str] = []
            for fam in (*gauges, self.ops, self.logs):
                lines += fam.render()
            lines += self.phase.render() + self.total.render()
        return "\n".join(lines) + "\n"


class CountingHandler(logging.Handler):
    """Counts the agent's warnings and errors (the `errors` of the metrics endpoint)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.WARNING)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        self.metrics.logged(record.levelname.lower())
