"""Drive one live TCP handover in a lab: client c0 talks to the origin server on b0, which
hands the connection to the target server on b1 (xo.tcp.handover processes).

Between b0 and b1 sit two stateless nftables rewrites standing in for XO's datapath: b1's
egress makes the restored socket's packets look like b0:ORIGIN_PORT, b0's ingress forwards
the client's packets to b1:TARGET_PORT (IP, port and MACs rewritten, like the TC redirect).
The client keeps talking to b0's address throughout and is never told. Used by the net
tests (tests/net/test_tcp_migrate.py) and `xo demo`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xo.lab import Host, Lab
from xo.tcp.state import TcpState

CLIENT_SCRIPT = str(Path(__file__).with_name("stream_client.py"))
ORIGIN_PORT = 8080
TARGET_PORT = 9080  # the target binds its own address and another port (restore's `local`)
C2S_SEED, S2C_SEED = 1, 2
WAIT_S = 60
RST_COUNTERS = ("TcpOutRsts", "TcpExtTCPAbortOnData", "TcpExtTCPAbortOnClose", "TcpEstabResets")
KIB = 1024

Events = Callable[[str, dict[str, Any]], None]


class HandoverError(RuntimeError):
    """A process of the handover failed or answered out of turn (message has its stderr)."""


@dataclass(frozen=True)
class Plan:
    """What the client and the origin do; sizes in bytes."""

    family: int  # 4 or 6
    client_sends: int
    read_before: int = 0  # origin reads this much of the client's stream, then stops
    min_recv_queue: int = 1  # and waits until this much is queued unread
    write_before: int = 0  # origin sends this much before the freeze
    write_frozen: int = 0  # and this much after it (becomes unacked + unsent)
    buf: int = 0  # origin SO_SNDBUF/SO_RCVBUF, 0 = default
    s2c_extra: int = 512 * KIB  # what the target still sends after the handover
    client_args: tuple[str, ...] = ()

    @property
    def s2c_total(self) -> int:
        return self.write_before + self.write_frozen + self.s2c_extra


def _line(p: subprocess.Popen[str], what: str, event: str) -> dict[str, Any]:
    line = p.stdout.readline() if p.stdout else ""
    if not line:
        err = p.stderr.read() if p.stderr else ""
        raise HandoverError(f"{what}: process ended ({p.poll()}): {err[-2000:]}")
    msg = dict(json.loads(line))
    if msg.get("event") != event:
        raise HandoverError(f"{what}: expected {event!r}, got {msg}")
    return msg


def _send(p: subprocess.Popen[str], text: str) -> None:
    if p.stdin is None:
        raise HandoverError("process has no stdin pipe")
    p.stdin.write(text + "\n")
    p.stdin.flush()


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def addr(host: Host, family: int) -> str:
    return str(host.ip4 if family == 4 else host.ip6)


def _endpoint(host: Host, family: int, port: int) -> str:
    return f"[{host.ip6}]:{port}" if family == 6 else f"{host.ip4}:{port}"


def install_target_snat(b: Host, a: Host, client: str, cport: int, family: int) -> None:
    """b1 egress: the restored socket's packets leave as b0:ORIGIN_PORT (no conntrack)."""
    ip = _ip(family)
    rule = (
        f"{ip} saddr {addr(b, family)} tcp sport {TARGET_PORT} {ip} daddr {client} "
        f"tcp dport {cport} {ip} saddr set {addr(a, family)} tcp sport set {ORIGIN_PORT}"
    )
    b.run(
        ["nft", "-f", "-"],
        input="table inet xo_handover_snat {\n chain out {\n"
        f"  type filter hook output priority 0; policy accept;\n  {rule}\n }}\n}}\n",
    )


def install_origin_redirect(a: Host, b: Host, client: str, cport: int, family: int) -> None:
    """b0 ingress: the client's packets go on to b1:TARGET_PORT, rewritten like XO's redirect
    (the source MAC too, or the bridge would learn the client's MAC on b0's port)."""
    ip = _ip(family)
    rule = (
        f"{ip} saddr {client} tcp sport {cport} {ip} daddr {addr(a, family)} "
        f"tcp dport {ORIGIN_PORT} {ip} daddr set {addr(b, family)} tcp dport set {TARGET_PORT} "
        f"ether saddr set {a.mac} ether daddr set {b.mac} fwd to {a.ifname}"
    )
    a.run(
        ["nft", "-f", "-"],
        input="table netdev xo_handover_redirect {\n chain in {\n"
        f"  type filter hook ingress device {a.ifname} priority 0; policy accept;\n"
        f"  {rule}\n }}\n}}\n",
    )


def remove_rewrites(lab: Lab) -> None:
    a, b = lab.backends[0], lab.backends[1]
    a.run(["nft", "delete table netdev xo_handover_redirect"], check=False)
    b.run(["nft", "delete table inet xo_handover_snat"], check=False)


def rst_counters(hosts: list[Host]) -> dict[str, int]:
    return {f"{h.name}:{k}": h.nstat().get(k, 0) for h in hosts for k in RST_COUNTERS}


def _forward_progress(client: subprocess.Popen[str], on_event: Events) -> threading.Thread:
    def pump() -> None:
        pipe = client.stderr
        if pipe is None:
            return
        for line in pipe:
            try:
                on_event("progress", json.loads(line))
            except ValueError:
                on_event("client-stderr", {"line": line.rstrip()})

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def run_handover(lab: Lab, plan: Plan, on_event: Events | None = None) -> dict[str, Any]:
    """One handover; returns every process's report plus the RST counter deltas."""
    emit = on_event or (lambda name, data: None)
    c, a, b = lab.clients[0], lab.backends[0], lab.backends[1]
    py = sys.executable
    common = ["--seed", str(S2C_SEED), "--send-total", str(plan.s2c_total)]
    pipes: dict[str, Any] = {"text": True, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    origin = a.popen(
        [py, "-m", "xo.tcp.handover", "origin", "--listen",
         _endpoint(a, plan.family, ORIGIN_PORT), *common,
         "--read-before", str(plan.read_before), "--write-before", str(plan.write_before),
         "--min-recv-queue", str(plan.min_recv_queue), "--write-frozen", str(plan.write_frozen),
         "--sndbuf", str(plan.buf), "--rcvbuf", str(plan.buf)],
        stdin=subprocess.PIPE, **pipes,
    )  # fmt: skip
    try:
        _line(origin, "origin", "listening")
        # Started now so that its interpreter start-up is not part of the frozen time.
        target = b.popen(
            [py, "-m", "xo.tcp.handover", "target", "--local",
             _endpoint(b, plan.family, TARGET_PORT), *common],
            stdin=subprocess.PIPE, **pipes,
        )  # fmt: skip
        before = rst_counters([c, a, b])
        client = c.popen(
            [py, CLIENT_SCRIPT, addr(a, plan.family), str(ORIGIN_PORT), str(C2S_SEED),
             str(plan.client_sends), str(plan.s2c_total), *plan.client_args],
            **pipes,
        )  # fmt: skip
        connected = _line(client, "client", "connected")
        emit("connected", connected)
        peer, cport = str(connected["local"][0]), int(connected["local"][1])
        # The target's egress rewrite must exist before the restored socket sends anything.
        install_target_snat(b, a, peer, cport, plan.family)
        progress = _forward_progress(client, emit) if "--progress" in plan.client_args else None
        captured = _line(origin, "origin capture", "captured")
        emit("captured", captured)
        state = TcpState.from_bytes(base64.b64decode(captured["state"]))
        if (str(state.remote.ip), state.remote.port) != (peer, cport):
            raise HandoverError(f"captured {state.remote}, the client is {peer}:{cport}")
        _send(target, json.dumps({"state": captured["state"], "app": captured["app"]}))
        restored = _line(target, "target restore", "restored")
        emit("restored", restored)
        install_origin_redirect(a, b, peer, cport, plan.family)
        emit("redirected", {})
        _send(origin, "thaw")
        emit("thawed", _line(origin, "origin thaw", "thawed"))
        _send(target, "ready")
        done = _line(target, "target done", "done")
        report = _line(client, "client done", "done")
        for name, p in (("origin", origin), ("target", target), ("client", client)):
            if p.wait(WAIT_S) != 0:
                raise HandoverError(f"{name} exited with {p.returncode}")
        if progress:
            progress.join(WAIT_S)
        after = rst_counters([c, a, b])
    finally:
        remove_rewrites(lab)
        for h in (a, b, c):
            h.stop_processes()
    result = {
        "captured": captured,
        "restored": restored,
        "target": done,
        "client": report,
        "s2c_total": plan.s2c_total,
        "rst": {k: after[k] - before[k] for k in after},
    }
    emit("done", result)
    return result
