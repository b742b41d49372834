"""Live migration of a TCP connection between two processes while a client keeps talking.

examples:
  xo demo                     IPv4, ~3 MiB each way, migration mid-stream, then a summary
  xo demo --ipv6              the same over IPv6
  xo demo --mib 8             more data (the migration happens after the first MiB)

A lab of network namespaces: an ordinary client (c0, plain Python sockets) streams to a
server on b0 and reads the server's stream. Mid-stream b0 freezes the flow, captures the
socket with TCP_REPAIR (queues and all) and hands the state to a second process on b1,
which restores it on its own address; stateless packet rewrites keep the client talking to
b0's address. The client is never told. The summary checks every byte both ways.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import time
from typing import Any

from xo.lab import Lab
from xo.tcp.lab_handover import C2S_SEED, S2C_SEED, HandoverError, Plan, run_handover

MIB = 1024 * 1024
CHUNK = 16384
SEND_GAP_S = 0.004  # the client paces itself (~4 MB/s) so the stream can be watched
RECV_GAP_S = 0.016  # reads are up to 64 KiB: both directions ~4 MB/s


def _printer(start: float) -> Any:
    def on_event(name: str, data: dict[str, Any]) -> None:
        t = f"[{time.monotonic() - start:6.2f}s]"
        if name == "progress":
            print(
                f"{t} client: sent {data['sent'] / MIB:6.2f} MiB, "
                f"received {data['received'] / MIB:6.2f} MiB",
                flush=True,
            )
        elif name == "connected":
            print(f"{t} client connected from {data['local'][0]}:{data['local'][1]}", flush=True)
        elif name == "captured":
            q = data["queues"]
            print(
                f"{t} b0: flow frozen ({data['freeze_us']:.0f} us), socket captured in "
                f"{data['capture_us']:.0f} us: receive queue {q['recv']} B, unacked "
                f"{q['unacked']} B, unsent {q['unsent']} B; released without FIN/RST",
                flush=True,
            )
        elif name == "restored":
            print(f"{t} b1: socket restored in {data['restore_us']:.0f} us", flush=True)
        elif name == "redirected":
            print(f"{t} b0: client packets now rewritten and forwarded to b1", flush=True)
        elif name == "thawed":
            print(f"{t} b0: flow thawed; b1 serves the client from now on", flush=True)

    return on_event


def _summary(plan: Plan, r: dict[str, Any]) -> bool:
    c2s = random.Random(C2S_SEED).randbytes(plan.client_sends)
    s2c = random.Random(S2C_SEED).randbytes(plan.s2c_total)
    got_a = r["captured"]["received"]
    c2s_ok = (
        r["captured"]["recv_sha256"] == hashlib.sha256(c2s[:got_a]).hexdigest()
        and r["target"]["recv_sha256"] == hashlib.sha256(c2s[got_a:]).hexdigest()
    )
    s2c_ok = r["client"]["recv_sha256"] == hashlib.sha256(s2c).hexdigest()
    # The one expected count: closing the captured socket in repair mode (no packet sent).
    rsts = {k: v for k, v in r["rst"].items() if v and k != "b0:TcpEstabResets"}
    print("\nsummary")
    print(f"  client -> server : {plan.client_sends} B, b0 read {got_a} B, b1 read "
          f"{r['target']['received']} B, byte-exact: {'yes' if c2s_ok else 'NO'}")  # fmt: skip
    print(f"  server -> client : {r['client']['received']} of {plan.s2c_total} B, "
          f"byte-exact: {'yes' if s2c_ok else 'NO'}")  # fmt: skip
    print(f"  resets           : {rsts or 'none in any namespace'}")
    gap = r["client"]["max_recv_gap_ms"]
    print(f"  longest gap seen by the client between two reads: {gap:.1f} ms")
    return c2s_ok and s2c_ok and not rsts


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ipv6", action="store_true", help="run over IPv6")
    parser.add_argument("--mib", type=int, default=3, help="MiB the client sends (>= 2)")


def run(args: argparse.Namespace) -> int:
    total = max(args.mib, 2) * MIB
    plan = Plan(
        family=6 if args.ipv6 else 4,
        client_sends=total,
        read_before=MIB,
        min_recv_queue=CHUNK,
        write_before=MIB,
        write_frozen=256 * 1024,
        s2c_extra=total - MIB - 256 * 1024,
        client_args=(
            "--chunk", str(CHUNK), "--send-gap", str(SEND_GAP_S),
            "--recv-gap", str(RECV_GAP_S), "--progress",
        ),
    )  # fmt: skip
    start = time.monotonic()
    with Lab(clients=1, frontends=0, backends=2) as lab:
        c, a, b = lab.clients[0], lab.backends[0], lab.backends[1]
        ip = (lambda h: h.ip6) if args.ipv6 else (lambda h: h.ip4)
        print(f"lab {lab.name}: client c0 {ip(c)}, origin b0 {ip(a)}, target b1 {ip(b)}")
        try:
            result = run_handover(lab, plan, _printer(start))
        except HandoverError as e:
            print(f"demo failed: {e}", file=sys.stderr)
            return 1
    return 0 if _summary(plan, result) else 1
