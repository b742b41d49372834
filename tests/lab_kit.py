"""Helpers of the lab tests of every tier that need neither BCC nor agents: reset counters
read with nstat, a client connection to a frontend, exact reads, HTTP responses."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import BinaryIO

from xo.flow import Endpoint
from xo.lab import Host, Lab
from xo.tls.move import Place

# RSTs sent, and aborts, in every namespace. TcpEstabResets counts any ESTABLISHED -> CLOSED,
# which a silent close in repair mode (a moved-away socket) is too: only the client's counts.
RST_COUNTERS = (
    "TcpOutRsts",
    "TcpExtTCPAbortOnData",
    "TcpExtTCPAbortOnClose",
    "TcpExtTCPAbortOnTimeout",
)
CLIENT_ONLY = ("TcpEstabResets",)
CLIENT_PREFIX = "c"  # the lab names its clients c0, c1, ...


def rst_counts(*hosts: Host) -> dict[str, int]:
    """RST and abort counters of the hosts (clients also count reset connections)."""
    out = {}
    for h in hosts:
        st = h.nstat()
        extra = CLIENT_ONLY if h.name.startswith(CLIENT_PREFIX) else ()
        out.update({f"{h.name}.{c}": st.get(c, 0) for c in RST_COUNTERS + extra})
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that moved, by how much."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def assert_no_resets(before: dict[str, int], *hosts: Host, settle: float) -> None:
    """After `settle` seconds (late segments land), no counter of rst_counts(*hosts) moved."""
    time.sleep(settle)
    assert delta(before, rst_counts(*hosts)) == {}


def connect(
    lab: Lab, port: int, timeout: float, family: int = 4
) -> tuple[socket.socket, socket.socket, Place]:
    """A TCP connection from c0 to the VIP:port on f0: (f0's socket, c0's socket, f0's place);
    c0's socket times out after `timeout`."""
    f, c = lab.frontends[0], lab.clients[0]
    home = Place(f, Endpoint(lab.vip4 if family == 4 else lab.vip6, port))
    with f.enter():
        lsock = socket.create_server(
            home.local.sockaddr(), family=socket.AF_INET if family == 4 else socket.AF_INET6
        )
    with c.enter():
        client = socket.create_connection(home.local.sockaddr(), timeout=timeout)
    server, _ = lsock.accept()
    lsock.close()
    return server, client, home


def recv_exact(
    sock: socket.socket, n: int, read: Callable[[socket.socket, int], bytes] = socket.socket.recv
) -> bytes:
    """Exactly n bytes through read(sock, size) (e.g. xo.tls.recv for kTLS); fails at EOF."""
    out = b""
    while len(out) < n:
        chunk = read(sock, n - len(out))
        assert chunk, "peer closed"
        out += chunk
    return out


def read_response(f: BinaryIO) -> tuple[int, bytes]:
    """One HTTP/1.1 response with Content-Length from a socket file: (status, body)."""
    status = int(f.readline().split()[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, f.read(length)
