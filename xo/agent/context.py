"""What the owner and target halves of an agent share: config, datapath, app links, peers.

Also the two seams later issues plug into: `RuleQueue` (the hardware TC-flower tier, issue 5:
queued after the eBPF redirect is in place, cancelled when the flow ends) and `TlsHooks`
(kTLS capture/install, issue 6). The daemon plugs in xo.tls.hooks.KernelTls where the kernel has
kTLS and NoTls otherwise (which refuses connections that carry TLS state instead of silently
dropping the keys), and HwRules (xo.agent.hwqueue) or NoRuleQueue.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

import xo.tls
import xo.tls.kernel
from xo import uapi
from xo.agent.config import AgentConfig
from xo.agent.local import LocalServer
from xo.agent.rpc import Channels
from xo.datapath import Datapath, Redirect
from xo.flow import Endpoint, FlowKey
from xo.v1 import offload_pb2

log = logging.getLogger("xo.agent")


class RuleQueue(Protocol):
    """The hardware tier: mirror an eBPF redirect as a NIC rule, asynchronously; `size` is
    the transfer the app expects (None: unknown) for the size policy."""

    def submit(self, flow: FlowKey, redirect: Redirect, size: int | None = None) -> None: ...

    def cancel(self, flow: FlowKey) -> None: ...


class NoRuleQueue:
    """No hardware tier: the eBPF redirect serves every flow."""

    def submit(self, flow: FlowKey, redirect: Redirect, size: int | None = None) -> None:
        return None

    def cancel(self, flow: FlowKey) -> None:
        return None


class TlsHooks(Protocol):
    """kTLS: read a socket's session keys before capture, install them after restore."""

    supported: bool

    def capture(self, sock: socket.socket) -> offload_pb2.TlsState | None: ...

    def install(self, sock: socket.socket, state: offload_pb2.TlsState) -> None: ...


class NoTls:
    """No kTLS: plain TCP sockets only; a socket with TLS state cannot be restored here."""

    supported = False

    def capture(self, sock: socket.socket) -> offload_pb2.TlsState | None:
        return None

    def install(self, sock: socket.socket, state: offload_pb2.TlsState) -> None:
        raise NotImplementedError("this agent has no kTLS support")


# kTLS capture needs every sent record acknowledged: how long to wait for that before refusing.
QUIESCE_TIMEOUT_S = 0.5


async def quiesce(tls: TlsHooks, sock: socket.socket) -> None:
    """Before blocking a kTLS flow: wait (bounded, off the event loop) until the peer has
    acknowledged everything sent; a blocked flow receives no ACK. No-op for plain sockets.
    Raises xo.tls.TlsRefusedError when the socket stays busy (the caller keeps serving it)."""
    if not tls.supported or xo.tls.kernel.ulp_of(sock) != xo.tls.kernel.ULP_TLS.decode():
        return
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, xo.tls.wait_quiescent, sock, QUIESCE_TIMEOUT_S)


class PhaseTimer:
    """Monotonic marks of one handoff's phases, in microseconds since the first mark."""

    def __init__(self) -> None:
        self._t0 = self._last = time.perf_counter_ns()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter_ns()
        self.phases[phase] = (now - self._last) / 1000
        self._last = now

    @property
    def total_us(self) -> float:
        return (self._last - self._t0) / 1000


@dataclass
class Context:
    cfg: AgentConfig
    dp: Datapath
    local: LocalServer
    channels: Channels
    rules: RuleQueue = field(default_factory=NoRuleQueue)
    tls: TlsHooks = field(default_factory=NoTls)
    timings: IO[str] | None = None
    # Sees every record too (kind, handoff id, phases in µs): the agent's metrics.
    observer: Callable[[str, str, dict[str, float]], None] | None = None

    def record(self, kind: str, handoff_id: str, phases: dict[str, float]) -> None:
        """Append one JSON line of phase timings (benchmarks read it); never state bytes."""
        if self.observer is not None:
            self.observer(kind, handoff_id, phases)
        if self.timings is None:
            return
        line = {"agent": self.cfg.name, "kind": kind, "id": handoff_id, "us": phases}
        self.timings.write(json.dumps(line) + "\n")
        self.timings.flush()


def open_timings(path: Path | None) -> IO[str] | None:
    return path.open("a", encoding="utf-8") if path else None


def open_tcp_tuples() -> dict[tuple[Endpoint, Endpoint], int]:
    """(local, remote) -> TCP state of every connected socket in our network namespace
    (/proc/net/tcp{,6}; TIME_WAIT entries included)."""
    out: dict[tuple[Endpoint, Endpoint], int] = {}
    for name, size in (("tcp", 4), ("tcp6", 16)):
        try:
            lines = Path(f"/proc/thread-self/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 3 or fields[2].endswith(":0000"):
                continue  # header or a listener (no remote end)
            key = (_proc_endpoint(fields[1], size), _proc_endpoint(fields[2], size))
            out[key] = int(fields[3], 16)
    return out


def _proc_endpoint(text: str, size: int) -> Endpoint:
    """'0100007F:1F90' (address in host-order 32-bit words) -> Endpoint."""
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))
    return Endpoint(ipaddress.ip_address(packed), int(port, 16))


def tcp_state_of(sock: socket.socket) -> int:
    """tcpi_state of a socket (uapi TCP_* state numbers)."""
    info = sock.getsockopt(uapi.SOL_TCP, uapi.TCP_INFO, uapi.TCP_INFO_HEAD.size)
    return uapi.TCP_INFO_HEAD.unpack(info)[0]
