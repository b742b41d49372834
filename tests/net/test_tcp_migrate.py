"""Live TCP migration between two processes in two namespaces, with an unmodified client.

The client (xo/tcp/stream_client.py, plain sockets) streams both ways with the origin server
in b0. The origin freezes the flow, captures mid-stream with non-empty receive, unacked and
unsent queues, and releases its socket. The target process in b1 restores it on b1's own
address and another port. Between them, stateless nftables rewrites: b1's egress makes its
packets look like b0's, b0's ingress forwards the client's packets to b1 (rewriting
IP/port/MACs, like XO's TC redirect). The client keeps talking to b0's address throughout.
Checked: byte-exact both ways (sha256 of all bytes each side sent and received), zero RST in
every namespace, IPv4 and IPv6, small and ~1 MiB queues, idle and busy client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xo.lab import Host, Lab
from xo.tcp import TcpState

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and TCP_REPAIR need root"),
]

CLIENT = str(Path(__file__).resolve().parents[2] / "xo" / "tcp" / "stream_client.py")
ORIGIN_PORT = 8080
TARGET_PORT = 9080  # the target binds its own address and another port: `local=` is exercised
C2S_SEED, S2C_SEED = 1, 2
KIB, MIB = 1024, 1024 * 1024
WAIT_S = 60
RST_COUNTERS = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpEstabResets")


@dataclass(frozen=True)
class Scenario:
    client_sends: int  # bytes the client streams to the server
    read_before: int  # origin reads this much of it, then stops (the rest queues up)
    min_recv_queue: int
    write_before: int
    write_frozen: int  # origin writes this much after freezing: unacked + unsent
    buf: int  # origin SO_SNDBUF/SO_RCVBUF (0: default)
    min_queue: int  # each captured queue group must reach this


SCENARIOS = {
    # idle: the client sent everything up front and only reads during the migration.
    ("small", "idle"): Scenario(32 * KIB, 0, 32 * KIB, 8 * KIB, 64 * KIB, 0, 1),
    ("small", "busy"): Scenario(4 * MIB, 256 * KIB, 16 * KIB, 8 * KIB, 64 * KIB, 0, 1),
    ("large", "idle"): Scenario(1 * MIB, 0, 768 * KIB, 256 * KIB, 1 * MIB, 1 * MIB, 512 * KIB),
    ("large", "busy"): Scenario(8 * MIB, 512 * KIB, 768 * KIB, 256 * KIB, MIB, MIB, 512 * KIB),
}
S2C_EXTRA = 512 * KIB  # what the target still has to send after the handover


def _line(p: subprocess.Popen[str], what: str) -> dict[str, Any]:
    line = p.stdout.readline() if p.stdout else ""
    if not line:
        err = p.stderr.read() if p.stderr else ""
        raise AssertionError(f"{what}: process ended ({p.poll()}): {err[-2000:]}")
    return dict(json.loads(line))


def _nft(host: Host, rules: str) -> None:
    host.run(["nft", "-f", "-"], input=rules)


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _addr(host: Host, family: int) -> str:
    return str(host.ip4 if family == 4 else host.ip6)


def _target_snat(b: Host, a: Host, client: str, cport: int, family: int) -> None:
    """b1 egress: replies leave as b0:8080 (stateless: no conntrack involved)."""
    ip = _ip(family)
    _nft(
        b,
        "table inet xo_test_snat {\n chain out {\n"
        "  type filter hook output priority 0; policy accept;\n"
        f"  {ip} saddr {_addr(b, family)} tcp sport {TARGET_PORT} {ip} daddr {client} "
        f"tcp dport {cport} {ip} saddr set {_addr(a, family)} tcp sport set {ORIGIN_PORT}\n"
        " }\n}\n",
    )


def _origin_redirect(a: Host, b: Host, client: str, cport: int, family: int) -> None:
    """b0 ingress: the client's packets go on to b1:9080, rewritten like XO's TC redirect."""
    ip = _ip(family)
    _nft(
        a,
        f"table netdev xo_test_redirect {{\n chain in {{\n"
        f"  type filter hook ingress device {a.ifname} priority 0; policy accept;\n"
        f"  {ip} saddr {client} tcp sport {cport} {ip} daddr {_addr(a, family)} "
        f"tcp dport {ORIGIN_PORT} {ip} daddr set {_addr(b, family)} tcp dport set {TARGET_PORT} "
        f"ether saddr set {a.mac} ether daddr set {b.mac} fwd to {a.ifname}\n"
        " }\n}\n",
    )


def _rsts(hosts: list[Host]) -> dict[str, int]:
    return {f"{h.name}:{k}": h.nstat().get(k, 0) for h in hosts for k in RST_COUNTERS}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def migrate(lab: Lab, family: int, sc: Scenario, client_args: list[str]) -> dict[str, Any]:
    """Run one migration; returns every process's report."""
    c, a, b = lab.clients[0], lab.backends[0], lab.backends[1]
    py = sys.executable
    s2c_total = sc.write_before + sc.write_frozen + S2C_EXTRA
    common = ["--seed", str(S2C_SEED), "--send-total", str(s2c_total)]
    text: dict[str, Any] = {"text": True, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    origin_at = f"[{a.ip6}]:{ORIGIN_PORT}" if family == 6 else f"{a.ip4}:{ORIGIN_PORT}"
    target_at = f"[{b.ip6}]:{TARGET_PORT}" if family == 6 else f"{b.ip4}:{TARGET_PORT}"
    origin = a.popen(
        [py, "-m", "xo.tcp.handover", "origin", "--listen", origin_at, *common,
         "--read-before", str(sc.read_before), "--write-before", str(sc.write_before),
         "--min-recv-queue", str(sc.min_recv_queue), "--write-frozen", str(sc.write_frozen),
         "--sndbuf", str(sc.buf), "--rcvbuf", str(sc.buf)],
        stdin=subprocess.PIPE, **text,
    )  # fmt: skip
    assert _line(origin, "origin")["event"] == "listening"
    before = _rsts([c, a, b])
    client = c.popen(
        [py, CLIENT, _addr(a, family), str(ORIGIN_PORT), str(C2S_SEED), str(sc.client_sends),
         str(s2c_total), *client_args],
        **text,
    )  # fmt: skip
    assert _line(client, "client")["event"] == "connected"
    captured = _line(origin, "origin capture")
    assert captured["event"] == "captured"
    state = TcpState.from_bytes(base64.b64decode(captured["state"]))
    peer, cport = str(state.remote.ip), state.remote.port
    _target_snat(b, a, peer, cport, family)
    target = b.popen(
        [py, "-m", "xo.tcp.handover", "target", "--local", target_at, *common],
        stdin=subprocess.PIPE, **text,
    )  # fmt: skip
    assert target.stdin is not None and origin.stdin is not None
    target.stdin.write(json.dumps({"state": captured["state"], "app": captured["app"]}) + "\n")
    target.stdin.flush()
    restored = _line(target, "target restore")
    assert restored["event"] == "restored"
    _origin_redirect(a, b, peer, cport, family)
    origin.stdin.write("thaw\n")
    origin.stdin.flush()
    assert _line(origin, "origin thaw")["event"] == "thawed"
    target.stdin.write("ready\n")
    target.stdin.flush()
    done = _line(target, "target done")
    report = _line(client, "client done")
    for p in (origin, target, client):
        assert p.wait(WAIT_S) == 0
    after = _rsts([c, a, b])
    return {
        "captured": captured,
        "restored": restored,
        "target": done,
        "client": report,
        "s2c_total": s2c_total,
        "rst": {k: after[k] - before[k] for k in after},
    }


@pytest.fixture(scope="module")
def lab() -> Any:
    with Lab(clients=1, frontends=0, backends=2) as lab:
        yield lab


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("peer", ["idle", "busy"])
def test_live_migration(lab: Lab, family: int, size: str, peer: str) -> None:
    sc = SCENARIOS[(size, peer)]
    r = migrate(lab, family, sc, [])
    q = r["captured"]["queues"]
    assert q["recv"] >= sc.min_queue, q
    assert q["unacked"] > 0 and q["unsent"] > 0, q
    assert q["unacked"] + q["unsent"] >= sc.min_queue, q
    # Byte-exact, client -> server: origin's part then target's part is the client's stream.
    c2s = random.Random(C2S_SEED).randbytes(sc.client_sends)
    got_a, got_b = r["captured"]["received"], r["target"]["received"]
    assert got_a + got_b == sc.client_sends == r["client"]["sent"]
    assert r["captured"]["recv_sha256"] == _sha(c2s[:got_a])
    assert r["target"]["recv_sha256"] == _sha(c2s[got_a:])
    # Byte-exact, server -> client: everything the client read is the server's stream.
    s2c = random.Random(S2C_SEED).randbytes(r["s2c_total"])
    assert r["client"]["received"] == len(s2c)
    assert r["client"]["recv_sha256"] == _sha(s2c)
    assert r["client"]["sent_sha256"] == _sha(c2s)
    # Releasing the captured socket (close in repair mode) moves it ESTABLISHED -> CLOSE
    # without a packet; the kernel counts that one transition as TcpEstabResets on b0.
    assert {k: v for k, v in r["rst"].items() if v} == {"b0:TcpEstabResets": 1}
