"""Move a live (kTLS or plain) TCP connection between two hosts of an xo.lab, XO's way.

The frontend F holds the VIP the client dialled; the backend B restores the socket on its
own address and a handoff port. nftables rules in the lab's namespaces stand in for XO's TC
datapath (same packet rewrites, in-process through libnftables): F's ingress freezes the
flow (drop) or redirects it to B (rewrite VIP:port -> B:hport and the MACs), B's egress
rewrites the replies back to VIP:port. Used by the kernel-tier TLS tests and `xo bench-tls`;
the agent does the same with its eBPF datapath and gRPC in between.

Order of one move (see docs/tls.md): quiesce (bounded wait for ACKs) -> freeze ->
xo.tls.capture (refuses a busy socket: the connection stays) -> xo.tcp.capture -> release ->
xo.tcp.restore(probe=False) at the destination -> xo.tls.install -> path (redirect/SNAT, or
their removal) -> xo.tcp.nudge (the window probe: the client talks again).
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

from xo import tcp
from xo.flow import Endpoint
from xo.freeze import _Nft
from xo.lab import Host
from xo.tls import kernel
from xo.tls.errors import TlsError, TlsRefusedError

QUIESCE_TIMEOUT_S = 1.0
NS_PER_US = 1000


@dataclass(frozen=True)
class Place:
    """Where a connection's socket lives: a lab host and the local address it is bound to."""

    host: Host
    local: Endpoint


@dataclass
class MoveTimes:
    """Microseconds of one move's phases; blackout = freeze to window probe."""

    quiesce_us: float = 0.0
    tls_capture_us: float = 0.0
    tcp_capture_us: float = 0.0
    restore_us: float = 0.0
    tls_install_us: float = 0.0
    blackout_us: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)


class FlowPath:
    """The datapath stand-in for one client flow: freeze/redirect on F, SNAT on B."""

    def __init__(self, front: Place, client: Endpoint) -> None:
        self.front = front
        self.client = client
        self._ip = "ip" if client.family == 4 else "ip6"
        self._table = f"xo_tls_{client.port}"
        self._nft: dict[str, _Nft] = {}
        self._snat_on: Host | None = None
        self._front_rule = False
        self.at: Place = front  # where the flow's packets go when not frozen

    def _run(self, host: Host, commands: str) -> None:
        # Inside the namespace: the context's netlink socket lives there, and libnftables
        # resolves device names (fwd to eth0) with if_nametoindex() in the caller's netns.
        with host.enter():
            if host.netns not in self._nft:
                self._nft[host.netns] = _Nft()
            self._nft[host.netns].run(commands)

    def _match(self) -> str:
        ip, c, v = self._ip, self.client, self.front.local
        return f"{ip} saddr {c.ip} tcp sport {c.port} {ip} daddr {v.ip} tcp dport {v.port}"

    def _set_front(self, action: str) -> None:
        f = self.front.host
        t = f"netdev {self._table}"
        head = "" if self._front_rule else (
            f"add table {t}\nadd chain {t} in {{ type filter hook ingress device {f.ifname} "
            "priority -300; policy accept; }\n"
        )
        self._run(f, f"{head}flush chain {t} in\nadd rule {t} in {self._match()} {action}\n")
        self._front_rule = True

    def freeze(self) -> None:
        self._set_front("drop")

    def thaw(self) -> None:
        """Undo freeze(): packets go where they went before (F itself, or the backend)."""
        if self.at is self.front:
            self.local()
        else:
            self.redirect(self.at)

    def redirect(self, back: Place) -> None:
        self.at = back
        f, b, ip = self.front.host, back.host, self._ip
        self._set_front(
            f"{ip} daddr set {back.local.ip} tcp dport set {back.local.port} "
            f"ether saddr set {f.mac} ether daddr set {b.mac} fwd to {f.ifname}"
        )

    def snat(self, back: Place) -> None:
        ip, c, v, b = self._ip, self.client, self.front.local, back.local
        t = f"inet {self._table}"
        self._run(
            back.host,
            f"add table {t}\nadd chain {t} out {{ type filter hook output priority 0; "
            "policy accept; }\n"
            f"add rule {t} out {ip} saddr {b.ip} tcp sport {b.port} {ip} daddr {c.ip} "
            f"tcp dport {c.port} {ip} saddr set {v.ip} tcp sport set {v.port}\n"
        )
        self._snat_on = back.host

    def local(self) -> None:
        """Back at F: no rule on F's ingress, none on the backend's egress."""
        self.at = self.front
        if self._front_rule:
            self._run(self.front.host, f"delete table netdev {self._table}\n")
            self._front_rule = False
        if self._snat_on is not None:
            self._run(self._snat_on, f"delete table inet {self._table}\n")
            self._snat_on = None

    def close(self) -> None:
        try:
            self.local()
        finally:
            for nft in self._nft.values():
                nft.close()
            self._nft.clear()


def move(sock: socket.socket, path: FlowPath, dst: Place, *,
         quiesce_timeout: float = QUIESCE_TIMEOUT_S) -> tuple[socket.socket, MoveTimes]:
    """Move `sock` to `dst` (path.front = back home). Returns the new socket and its times.

    TlsRefusedError (the socket was busy) or another capture error: nothing changed, the flow
    is thawed again and the caller keeps serving `sock`.
    """
    if isinstance(sock, ssl.SSLSocket):
        raise TlsRefusedError(
            TlsRefusedError.NO_KTLS,
            "TLS is terminated in user space on this socket: its record state cannot move",
        )
    times = MoveTimes()
    t0 = time.perf_counter_ns()
    is_tls = kernel.ulp_of(sock) == kernel.ULP_TLS.decode()
    if is_tls:
        kernel.wait_quiescent(sock, quiesce_timeout)
    t1 = time.perf_counter_ns()
    path.freeze()
    t2 = time.perf_counter_ns()
    try:
        tls = kernel.capture(sock) if is_tls else None
        t3 = time.perf_counter_ns()
        state = tcp.capture(sock)  # resumes the socket itself when it fails
        t4 = time.perf_counter_ns()
    except (TlsError, tcp.TcpError):
        path.thaw()  # nothing changed: the socket keeps serving where it is
        raise
    tcp.release(sock)
    with dst.host.enter():
        new = tcp.restore(state, local=dst.local, probe=False)
    t5 = time.perf_counter_ns()
    if tls is not None:
        try:
            kernel.install(new, tls)
        finally:
            tls.zero()
    t6 = time.perf_counter_ns()
    if dst.host is path.front.host:
        path.local()
    else:
        path.snat(dst)
        path.redirect(dst)
    tcp.nudge(new)
    t7 = time.perf_counter_ns()
    times.quiesce_us = (t1 - t0) / NS_PER_US
    times.tls_capture_us = (t3 - t2) / NS_PER_US
    times.tcp_capture_us = (t4 - t3) / NS_PER_US
    times.restore_us = (t5 - t4) / NS_PER_US
    times.tls_install_us = (t6 - t5) / NS_PER_US
    times.blackout_us = (t7 - t1) / NS_PER_US
    return new, times
