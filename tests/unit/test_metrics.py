"""The agent's metrics registry and its Prometheus text, the JSON log formatter's redaction,
and the benchmark report's latency helpers (pure: no root, no network)."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path

import pytest

from xo.agent.jsonlog import JsonFormatter, redact
from xo.agent.metrics import PHASE_BUCKETS_S, Family, Metrics
from xo.bench import latency
from xo.v1 import local_pb2, offload_pb2

SAMPLE = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? [-+0-9.eInf]+$')


def parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        assert SAMPLE.match(line), f"not an exposition sample: {line!r}"
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def test_histogram_buckets_are_cumulative_and_match_sum_and_count() -> None:
    m = Metrics()
    m.observe("offload", {"block": 30.0, "capture": 700.0})  # µs
    m.observe("offload", {"block": 2_000_000.0, "capture": 10.0})  # 2 s: only +Inf
    s = parse(m.render())
    key = 'xo_handoff_phase_seconds_bucket{kind="offload",phase="block",le="%s"}'
    assert s[key % "2.5e-05"] == 0 and s[key % "5e-05"] == 1
    assert s[key % "1"] == 1 and s[key % "+Inf"] == 2
    counts = [s[key % (repr(b) if not float(b).is_integer() else str(int(b)))]
              for b in PHASE_BUCKETS_S]
    assert counts == sorted(counts)
    assert s['xo_handoff_phase_seconds_count{kind="offload",phase="block"}'] == 2
    assert math.isclose(s['xo_handoff_phase_seconds_sum{kind="offload",phase="block"}'],
                        2.00003)
    assert math.isclose(s['xo_handoff_duration_seconds_sum{kind="offload"}'], 2.00074)


def test_operation_results_and_refusals() -> None:
    m = Metrics()
    m.offload(local_pb2.OffloadResult(accepted=True))
    m.offload(local_pb2.OffloadResult(accepted=False, reason=offload_pb2.TIMEOUT))
    m.offload(local_pb2.OffloadResult(accepted=False, reason=offload_pb2.TIMEOUT))
    m.handoff(offload_pb2.HandoffReply(accepted=False, reason=offload_pb2.UNSUPPORTED))
    m.give_back(local_pb2.GiveBackResult(ok=True))
    m.end(offload_pb2.EndReply(ok=False))
    s = parse(m.render())
    assert s['xo_operations_total{op="offload",result="ok"}'] == 1
    assert s['xo_operations_total{op="offload",result="TIMEOUT"}'] == 2
    assert m.refusals() == {"offload/TIMEOUT": 2, "handoff/UNSUPPORTED": 1, "end/failed": 1}


def test_gauges_and_label_escaping() -> None:
    fam = Family("xo_apps", "apps", "gauge")
    fam.samples[(("app", 'we"ird\\name\n'),)] = 2
    text = Metrics().render([fam])
    assert 'xo_apps{app="we\\"ird\\\\name\\n"} 2' in text
    assert "# TYPE xo_apps gauge" in text


def test_log_records_count_warnings_and_errors() -> None:
    from xo.agent.metrics import CountingHandler

    m = Metrics()
    logger = logging.getLogger("xo.test.metrics")
    handler = CountingHandler(m)
    logger.addHandler(handler)
    try:
        logger.warning("w")
        logger.error("e")
        logger.info("not counted")
    finally:
        logger.removeHandler(handler)
    s = parse(m.render())
    assert s['xo_log_messages_total{level="warning"}'] == 1
    assert s['xo_log_messages_total{level="error"}'] == 1


def _record(msg: str, args: tuple[object, ...] | dict[str, object], **extra: object
            ) -> logging.LogRecord:
    rec = logging.LogRecord("xo.agent.owner", logging.INFO, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_json_logs_never_carry_key_or_state_bytes() -> None:
    key = bytes(range(16)) * 2
    state = offload_pb2.TlsState(version=offload_pb2.TLS_1_3)
    line = JsonFormatter().format(_record("tls %s state %s for %s", (key, state, "f0"),
                                          blob=bytearray(key)))
    doc = json.loads(line)
    assert doc["msg"] == (f"tls <32 bytes> state <TlsState {state.ByteSize()} bytes> for f0")
    assert doc["blob"] == "<32 bytes>"
    assert doc["level"] == "info" and doc["logger"] == "xo.agent.owner"
    assert key.hex() not in line and repr(key) not in line
    assert redact(5) == 5


def test_json_logs_survive_bad_arguments_and_exceptions() -> None:
    fmt = JsonFormatter()
    assert "unformattable" in json.loads(fmt.format(_record("%d", ("x",))))["msg"]
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record("failed", ())
        rec.exc_info = sys.exc_info()
    doc = json.loads(fmt.format(rec))
    assert "ValueError: boom" in doc["exc"]


def test_latency_reader_and_percentiles(tmp_path: Path) -> None:
    p = tmp_path / "f0.timings.jsonl"
    lines = [{"agent": "f0", "kind": "offload", "id": f"f0-{i}",
              "us": {"block": 100.0, "handoff_rpc": 1000.0 * i}} for i in range(1, 5)]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    steps = latency.read([p, tmp_path / "missing.jsonl"])
    kinds = latency.by_kind(steps)
    assert kinds == {"offload": [1.1, 2.1, 3.1, 4.1]}
    assert latency.percentile(kinds["offload"], 50) == 2.1
    assert latency.percentile(kinds["offload"], 100) == 4.1
    assert latency.phases(steps, "offload")["block"] == [0.1] * 4
    with pytest.raises(ValueError):
        latency.percentile([], 50)
    p.write_text('{"agent": "f0"}\n')
    with pytest.raises(latency.TimingsError, match="f0.timings.jsonl:1"):
        latency.read([p])
