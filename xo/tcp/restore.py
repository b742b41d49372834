"""Recreate a TCP socket from a TcpState with TCP_REPAIR (CRIU soccr's order).

Order matters and each step's reason is a kernel rule: queue sequence numbers can only be set
before connect (EPERM after); connect in repair mode sends no SYN but needs the 4-tuple free;
the window can only be set once the queues are refilled (EINVAL before); the unsent bytes are
written after repair mode ends so the kernel sends them as new data instead of waiting for a
retransmit timeout. Repair-off sends a window probe, so the peer answers at once even if idle.

If the local address differs from the captured one, whatever rewrites the peer's view of it
(the egress source rewrite) must be in place before restore(): the probe leaves immediately.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

from xo import uapi
from xo.flow import Endpoint
from xo.tcp.capture import U32_MASK, repair_on
from xo.tcp.errors import (
    AddressInUseError,
    QueueTooLargeError,
    RestoreError,
    StateFormatError,
)
from xo.tcp.state import TcpState

# Kernel memory per queued byte is a little more than one byte (skb headers, page rounding):
# the buffer asked for is the queue plus this share plus one skb's worth of slack.
QUEUE_OVERHEAD_DIVISOR = 16
QUEUE_SLACK = 64 * 1024
# setsockopt(SO_*BUFFORCE, v) stores 2*v; TCP_MAXSEG tops out at MAX_TCP_WINDOW.
BUFFORCE_FACTOR = 2
_U32 = struct.Struct("=I")


def buffer_needed(queued: int, recorded: int) -> int:
    """The socket buffer to force so `queued` bytes fit (never below the recorded size)."""
    needed = max(recorded, queued + queued // QUEUE_OVERHEAD_DIVISOR + QUEUE_SLACK)
    if needed > uapi.SOCK_BUF_MAX:
        raise QueueTooLargeError(
            f"{queued} queued bytes need a {needed}-byte socket buffer; the kernel allows at "
            f"most {uapi.SOCK_BUF_MAX}"
        )
    return needed


def _fail(step: str, e: OSError) -> RestoreError:
    return RestoreError(step, e.errno or errno.EIO)


def _force_buffer(sock: socket.socket, force_opt: int, read_opt: int, size: int) -> None:
    name = "SO_SNDBUFFORCE" if force_opt == uapi.SO_SNDBUFFORCE else "SO_RCVBUFFORCE"
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, -(-size // BUFFORCE_FACTOR))
        granted = sock.getsockopt(socket.SOL_SOCKET, read_opt)
    except OSError as e:
        raise _fail(name, e) from None
    if granted < size:
        raise QueueTooLargeError(f"{name}: asked for {size} bytes, the kernel granted {granted}")


def _sockaddr(ep: Endpoint) -> tuple[str, int]:
    """Like Endpoint.sockaddr(), without ipaddress's slow int-to-text conversion."""
    family = socket.AF_INET if ep.family == 4 else socket.AF_INET6
    return socket.inet_ntop(family, ep.ip.packed), ep.port


def _bind(sock: socket.socket, local: Endpoint) -> None:
    try:
        sock.bind(_sockaddr(local))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise AddressInUseError("bind", e.errno, f"{local} is taken") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise RestoreError(
                "bind", e.errno, f"{local.ip} is not an address of this host"
            ) from None
        raise _fail("bind", e) from None


def _connect(sock: socket.socket, local: Endpoint, remote: Endpoint) -> None:
    try:
        sock.connect(_sockaddr(remote))
    except OSError as e:
        if e.errno in (errno.EADDRNOTAVAIL, errno.EADDRINUSE):
            raise AddressInUseError(
                "connect", e.errno, f"4-tuple {local} -> {remote} is already in use"
            ) from None
        raise _fail("connect", e) from None


def _set_queue_seq(sock: socket.socket, queue: int, seq: int) -> None:
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_QUEUE, queue)
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_QUEUE_SEQ, _U32.pack(seq & U32_MASK))
    except OSError as e:
        raise _fail("TCP_QUEUE_SEQ", e) from None


def _fill(sock: socket.socket, queue: int, data: bytes) -> None:
    """Write `data` into the selected queue; the kernel takes ~68 KiB per call in repair."""
    if not data:
        return  # nothing to write: skip selecting the queue (one syscall)
    step = "refill receive queue" if queue == uapi.TCP_RECV_QUEUE else "refill send queue"
    view = memoryview(data)
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_QUEUE, queue)
        while view:
            view = view[sock.send(view, socket.MSG_DONTWAIT) :]
    except BlockingIOError:
        raise QueueTooLargeError(f"{step}: {len(view)} of {len(data)} bytes did not fit") from None
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise QueueTooLargeError(f"{step}: kernel out of socket memory") from None
        raise _fail(step, e) from None


def _repair_options(state: TcpState) -> bytes:
    opt = uapi.TCP_REPAIR_OPT.pack
    out = opt(uapi.TCPOPT_MSS, state.mss_clamp)
    if state.snd_wscale or state.rcv_wscale:
        out += opt(uapi.TCPOPT_WINDOW, state.snd_wscale | state.rcv_wscale << 16)
    if state.sack_ok:
        out += opt(uapi.TCPOPT_SACK_PERM, 0)
    if state.timestamps_ok:
        out += opt(uapi.TCPOPT_TIMESTAMP, 0)
    return out


def _build(sock: socket.socket, state: TcpState, local: Endpoint) -> None:
    """Every step up to (not including) leaving repair mode."""
    repair_on(sock, RestoreError)
    # SO_REUSEADDR must not be set here: after repair-on it clobbers the forced reuse.
    _force_buffer(
        sock,
        uapi.SO_SNDBUFFORCE,
        socket.SO_SNDBUF,
        buffer_needed(state.send_queue_len, state.sndbuf),
    )
    _force_buffer(
        sock,
        uapi.SO_RCVBUFFORCE,
        socket.SO_RCVBUF,
        buffer_needed(len(state.recv_queue), state.rcvbuf),
    )
    _bind(sock, local)
    _set_queue_seq(sock, uapi.TCP_RECV_QUEUE, state.recv_seq - len(state.recv_queue))
    _set_queue_seq(sock, uapi.TCP_SEND_QUEUE, state.send_seq - state.send_queue_len)
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_MAXSEG, min(state.mss_clamp, uapi.MAX_TCP_WINDOW))
    except OSError as e:
        raise _fail("TCP_MAXSEG", e) from None
    _connect(sock, local, state.remote)
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_OPTIONS, _repair_options(state))
        if state.timestamps_ok:
            sock.setsockopt(uapi.SOL_TCP, uapi.TCP_TIMESTAMP, _U32.pack(state.timestamp))
    except OSError as e:
        raise _fail("TCP_REPAIR_OPTIONS", e) from None
    _fill(sock, uapi.TCP_RECV_QUEUE, state.recv_queue)
    _fill(sock, uapi.TCP_SEND_QUEUE, state.send_unacked)
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_WINDOW, state.window.pack())
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_QUEUE, uapi.TCP_NO_QUEUE)
    except OSError as e:
        raise _fail("TCP_REPAIR_WINDOW", e) from None


def _go_live(sock: socket.socket, unsent: bytes, probe: bool) -> None:
    """Leave repair mode (with a window probe or not), then queue the never-sent bytes."""
    off = uapi.TCP_REPAIR_OFF if probe else uapi.TCP_REPAIR_OFF_NO_WP
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, off)
        # Like a socket accepted from an SO_REUSEADDR listener: without it, this connection
        # (and its TIME_WAIT) would block a later listener bind on the port. Only now:
        # before repair-off it would clobber the forced reuse that let bind() succeed.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    except OSError as e:
        raise _fail("TCP_REPAIR off", e) from None
    view = memoryview(unsent)
    try:
        while view:
            view = view[sock.send(view, socket.MSG_DONTWAIT) :]
    except BlockingIOError:
        raise QueueTooLargeError(
            f"send unsent bytes: {len(view)} of {len(unsent)} did not fit"
        ) from None
    except OSError as e:
        raise _fail("send unsent bytes", e) from None


def restore(state: TcpState, local: Endpoint | None = None, *, probe: bool = True) -> socket.socket:
    """Recreate the connection as a live socket bound to `local` (default: the captured one).

    probe=False leaves repair mode without the window probe: for a handoff whose return path
    (the owner's redirect) is not in place yet. Call nudge() once it is: the peer answers
    such probes at most once per 500 ms (net.ipv4.tcp_invalid_ratelimit), so a probe answered
    into a frozen path would silence the next one and an idle peer would stall for an RTO.

    Raises RepairPermissionError, AddressInUseError, QueueTooLargeError or RestoreError; on
    any failure the half-built socket is closed in repair mode, so the peer sees nothing.
    """
    if not isinstance(state, TcpState):
        raise TypeError(f"restore() needs a TcpState, got {type(state).__name__}")
    local = state.local if local is None else local
    if local.family != state.remote.family:
        raise StateFormatError(f"local {local} and remote {state.remote} differ in family")
    family = socket.AF_INET if local.family == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        _build(sock, state, local)
        _go_live(sock, state.send_unsent, probe)
    except BaseException:
        # Back into repair mode (if it ever left) so that close() sends neither FIN nor RST.
        with contextlib.suppress(OSError):
            sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, uapi.TCP_REPAIR_ON)
        sock.close()
        raise
    return sock


def nudge(sock: socket.socket) -> None:
    """Make the kernel send a window probe now, so the peer answers with an ACK at once.

    Use it after restore(..., probe=False) once the path from the peer is in place (redirect
    installed): the socket still holds unacked bytes the peer may long have, and until the
    peer's ACK arrives an idle peer would only be heard from after a retransmit timeout
    (1 s for a restored socket, which has no RTT estimate). Repair on+off does it.
    """
    try:
        # Repair on/off resets SO_REUSEADDR (to "force", then "no"): keep the caller's.
        reuse = sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, uapi.TCP_REPAIR_ON)
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, uapi.TCP_REPAIR_OFF)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
    except OSError as e:
        raise _fail("window probe (repair on/off)", e) from None
