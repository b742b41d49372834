"""Show what a running agent holds: flows, rules, peers, queue depth, refusals.

Asks the agent over its local API (the unix socket of its config's [local] path), so it works
wherever the agent runs, also inside a network namespace. Each peer is probed once (PeerInfo
over mutual TLS) for its health and round trip. Nothing here carries key or state bytes.

examples:
  xo status -c /etc/xo/agent.toml        the table, socket path taken from the config
  xo status -s /run/xo/f0.sock           the same, naming the socket
  xo status -s /run/xo/f0.sock --json    one JSON document (for scripts and tests)
  watch -n1 xo status -c agent.toml      a live view
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
from pathlib import Path
from typing import Any

from xo.agent import framing
from xo.agent.config import ConfigError, load
from xo.v1 import local_pb2, offload_pb2

TIMEOUT_S = 5.0
MIB = 1024 * 1024
KIB = 1024


class StatusError(ConnectionError):
    """The agent could not be reached or did not answer with a status."""


def query(path: str | Path, timeout: float = TIMEOUT_S) -> local_pb2.StatusReply:
    """One StatusRequest on the agent's unix socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(path))
        except OSError as e:
            raise StatusError(f"cannot reach the agent at {path}: {e.strerror or e}") from None
        dec = framing.Decoder()
        try:
            framing.send(s, local_pb2.LocalMessage(status=local_pb2.StatusRequest()))
            while True:
                frames = framing.recv_into(s, dec)
                if frames is None:
                    raise StatusError(f"the agent at {path} closed the connection")
                for f in frames:
                    f.close()
                    if f.msg.WhichOneof("body") == "status_reply":
                        return f.msg.status_reply
        except TimeoutError:
            raise StatusError(f"the agent at {path} did not answer in {timeout}s") from None
        except (OSError, framing.FrameError) as e:
            raise StatusError(f"bad answer from the agent at {path}: {e}") from None
        finally:
            dec.close()
    finally:
        s.close()


def _ep(msg: offload_pb2.Endpoint) -> str:
    if not msg.addr:
        return "-"
    ip = ipaddress.ip_address(msg.addr)
    return f"[{ip}]:{msg.port}" if ip.version == 6 else f"{ip}:{msg.port}"


def to_dict(st: local_pb2.StatusReply) -> dict[str, Any]:
    """The JSON shape of `--json`: addresses as text, counters as plain maps."""
    return {
        "agent": st.agent,
        "interface": st.interface,
        "uptime_s": round(st.uptime_s, 3),
        "reattached": st.reattached,
        "flows": [
            {"role": f.role, "handoff_id": f.handoff_id, "client": _ep(f.flow.client),
             "vip": _ep(f.flow.vip), "target": _ep(f.target), "peer": f.peer, "app": f.app,
             "state": f.state, "ebpf_rule": f.ebpf_rule, "hw_rule": f.hw_rule,
             "age_s": round(f.age_s, 3), "packets": f.packets, "bytes": f.bytes}
            for f in st.flows
        ],
        "peers": [
            {"name": p.name, "address": p.address, "healthy": p.healthy,
             "failed_checks": p.failed_checks, "flows": p.flows,
             "rtt_ms": round(p.rtt_ms, 3), "detail": p.detail}
            for p in st.peers
        ],
        "hw_queue_depth": st.hw_queue_depth,
        "refusals": dict(st.refusals),
        "datapath": dict(st.datapath),
        "apps": dict(st.apps),
    }


def _size(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f}M"
    return f"{n / KIB:.1f}K" if n >= KIB else str(n)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(st: local_pb2.StatusReply) -> str:
    d = to_dict(st)
    lines = [f"agent {d['agent']} on {d['interface']}, up {d['uptime_s']:.0f}s"
             + (" (restarted: datapath reattached)" if d["reattached"] else "")]
    lines.append(f"flows: {len(d['flows'])}")
    if d["flows"]:
        rows = [["ROLE", "CLIENT", "VIP", "TARGET", "PEER", "STATE", "EBPF", "HW", "AGE",
                 "PKTS", "BYTES", "HANDOFF"]]
        rows += [[f["role"], f["client"], f["vip"], f["target"], f["peer"] or "-", f["state"],
                  f["ebpf_rule"], f["hw_rule"], f"{f['age_s']:.1f}s", str(f["packets"]),
                  _size(f["bytes"]), f["handoff_id"] or "-"] for f in d["flows"]]
        lines += ["  " + r for r in _table(rows)]
    lines.append("peers:")
    rows = [["NAME", "ADDRESS", "HEALTH", "FAILED", "FLOWS", "RTT"]]
    rows += [[p["name"], p["address"], "ok" if p["healthy"] else f"DOWN {p['detail']}".strip(),
              str(p["failed_checks"]), str(p["flows"]), f"{p['rtt_ms']:.2f}ms"]
             for p in d["peers"]]
    lines += ["  " + r for r in _table(rows)]
    lines.append(f"hardware queue depth: {d['hw_queue_depth']}")
    refusals = ", ".join(f"{k}={v}" for k, v in sorted(d["refusals"].items())) or "none"
    lines.append(f"refusals: {refusals}")
    lines.append("datapath packets: "
                 + ", ".join(f"{k}={v}" for k, v in sorted(d["datapath"].items())))
    apps = ", ".join(f"{k}={v}" for k, v in sorted(d["apps"].items())) or "none"
    lines.append(f"apps: {apps}")
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", type=Path, help="the agent's TOML file")
    where.add_argument("-s", "--socket", help="the agent's local API socket")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait")


def run(args: argparse.Namespace) -> int:
    try:
        path = args.socket or load(args.config).local.path
        st = query(path, args.timeout)
    except (ConfigError, StatusError) as e:
        print(f"xo status: {e}", file=sys.stderr)
        return 1
    print(json.dumps(to_dict(st), indent=2) if args.json else render(st))
    return 0
