"""Capture an ESTABLISHED TCP socket's state with TCP_REPAIR (CRIU soccr's order).

The caller must have frozen the flow's inbound packets first (xo.freeze): a socket in repair
mode still accepts and ACKs input, so an unfrozen flow can change its queues and sequence
numbers between the reads below and the snapshot would not match what the peer saw.

On success the socket is left in repair mode: `release()` closes it without a FIN or RST
once the state is safe elsewhere; `resume()` turns it back into a working socket (the
fallback when the handoff fails). On failure, capture() itself resumes the socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import socket
import struct

from xo import uapi
from xo.flow import Endpoint
from xo.tcp.errors import CaptureError, NotEstablishedError, RepairPermissionError, TcpError
from xo.tcp.state import TcpState, TcpWindow

_INT = struct.Struct("=i")
_U32 = struct.Struct("=I")
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
U32_MASK = 0xFFFFFFFF
WSCALE_MASK = 0x0F  # tcpi_snd_wscale:4, tcpi_rcv_wscale:4 share one byte


def sockaddr_endpoint(sockaddr: tuple[object, ...]) -> Endpoint:
    """Endpoint of a socket address as getsockname()/getpeername() return it."""
    # IPv6 sockaddrs carry a scope ("fe80::1%eth0"): strip it, the address bytes are enough.
    # inet_pton + the bytes constructor is ~5x faster than ipaddress's text parser.
    host = str(sockaddr[0]).partition("%")[0]
    port = sockaddr[1]
    if not isinstance(port, int):
        raise TypeError(f"unexpected sockaddr {sockaddr!r}")
    if ":" in host:
        return Endpoint(ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, host)), port)
    return Endpoint(ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, host)), port)


def _ioctl_int(fd: int, request: int, step: str) -> int:
    try:
        return int(_INT.unpack(fcntl.ioctl(fd, request, bytes(_INT.size)))[0])
    except OSError as e:
        raise CaptureError(step, e.errno or errno.EIO) from None


def _check_tcp(sock: socket.socket) -> bytes:
    """Refuse anything but an ESTABLISHED TCP socket; return the head of its tcp_info."""
    if sock.family not in _TCP_FAMILIES or sock.type != socket.SOCK_STREAM:
        raise NotEstablishedError(f"not a TCP socket: {sock!r}")
    if sock.fileno() < 0:
        raise NotEstablishedError("socket is closed")
    try:
        info = sock.getsockopt(uapi.SOL_TCP, uapi.TCP_INFO, uapi.TCP_INFO_HEAD.size)
    except OSError as e:
        raise NotEstablishedError(f"not a TCP socket ({e.strerror}): {sock!r}") from None
    if info[0] != uapi.TCP_ESTABLISHED:
        raise NotEstablishedError(
            f"socket is in TCP state {info[0]}, not ESTABLISHED ({uapi.TCP_ESTABLISHED})"
        )
    return info


def repair_on(sock: socket.socket, error: type[TcpError] = CaptureError) -> None:
    """Enter repair mode; EPERM (no CAP_NET_ADMIN) becomes RepairPermissionError."""
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, uapi.TCP_REPAIR_ON)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise RepairPermissionError(
                "TCP_REPAIR on", e.errno, "needs CAP_NET_ADMIN in the socket's network namespace"
            ) from None
        raise error("TCP_REPAIR on", e.errno or errno.EIO) from None


def resume(sock: socket.socket) -> None:
    """Leave repair mode and keep using the socket (sends a window probe to wake the peer)."""
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_QUEUE, uapi.TCP_NO_QUEUE)
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, uapi.TCP_REPAIR_OFF)
    except OSError as e:
        raise CaptureError("TCP_REPAIR off", e.errno or errno.EIO) from None


def release(sock: socket.socket) -> None:
    """Close a captured socket silently: in repair mode the kernel sends neither FIN nor RST."""
    try:
        in_repair = sock.getsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR) == uapi.TCP_REPAIR_ON
    except OSError as e:
        raise CaptureError("read TCP_REPAIR", e.errno or errno.EIO) from None
    if not in_repair:  # repair-on would deselect the send queue (and allow sending again)
        repair_on(sock)
        _stop_transmitting(sock)
    sock.close()


def _read_queue(sock: socket.socket, queue: int, length: int) -> tuple[int, bytes]:
    """Select a queue, read its TCP_QUEUE_SEQ and peek its bytes (exactly `length`)."""
    name = "receive" if queue == uapi.TCP_RECV_QUEUE else "send"
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_QUEUE, queue)
        seq = sock.getsockopt(uapi.SOL_TCP, uapi.TCP_QUEUE_SEQ) & U32_MASK
        data = sock.recv(length + 1, _PEEK) if length else b""
    except OSError as e:
        raise CaptureError(f"read {name} queue", e.errno or errno.EIO) from None
    if len(data) != length:
        raise CaptureError(
            f"read {name} queue",
            errno.EAGAIN,
            f"peeked {len(data)} bytes, expected {length}: is the flow frozen?",
        )
    return seq, data


def _stop_transmitting(sock: socket.socket) -> None:
    """Select the send queue: from now on the kernel sends no new data on this socket.

    Repair mode alone does not stop it: data the socket already holds keeps leaving from
    timers (pacing, TSQ, loss probes). A byte sent after the snapshot would reach the peer
    unrecorded, its ACK would be beyond the restored socket's snd_nxt and be ignored: a
    hung connection (seen: a tail loss probe sending 64 KiB mid-capture). With the send
    queue selected, tcp_write_xmit only marks new data as sent without sending it (the
    path restore uses): read after that, such bytes are simply unsent; read before, they
    land in send_unacked and the restored socket retransmits them.
    """
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR_QUEUE, uapi.TCP_SEND_QUEUE)
    except OSError as e:
        raise CaptureError("select send queue", e.errno or errno.EIO) from None


def _snapshot(sock: socket.socket, info: bytes) -> TcpState:
    fd = sock.fileno()
    options = info[5]
    wscales = info[6]
    # Receive side first: while its queue is selected the kernel may still send.
    inq = _ioctl_int(fd, uapi.SIOCINQ, "SIOCINQ")
    recv_seq, recv_queue = _read_queue(sock, uapi.TCP_RECV_QUEUE, inq)
    # Then the send side, with the send queue selected from here to release()/resume().
    _stop_transmitting(sock)
    outq = _ioctl_int(fd, uapi.SIOCOUTQ, "SIOCOUTQ")
    unsent = _ioctl_int(fd, uapi.SIOCOUTQNSD, "SIOCOUTQNSD")
    try:
        # In repair mode TCP_MAXSEG reports the negotiated clamp, not the current MSS.
        mss_clamp = sock.getsockopt(uapi.SOL_TCP, uapi.TCP_MAXSEG)
        timestamp = _U32.unpack(sock.getsockopt(uapi.SOL_TCP, uapi.TCP_TIMESTAMP, _U32.size))[0]
        raw_window = sock.getsockopt(
            uapi.SOL_TCP, uapi.TCP_REPAIR_WINDOW, uapi.TCP_REPAIR_WINDOW_STRUCT.size
        )
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError as e:
        raise CaptureError("read options", e.errno or errno.EIO) from None
    send_seq, send_queue = _read_queue(sock, uapi.TCP_SEND_QUEUE, outq)
    wscale_ok = bool(options & uapi.TCPI_OPT_WSCALE)
    acked_end = outq - unsent
    return TcpState(
        local=sockaddr_endpoint(sock.getsockname()),
        remote=sockaddr_endpoint(sock.getpeername()),
        send_seq=send_seq,
        recv_seq=recv_seq,
        recv_queue=recv_queue,
        send_unacked=send_queue[:acked_end],
        send_unsent=send_queue[acked_end:],
        mss_clamp=mss_clamp,
        snd_wscale=wscales & WSCALE_MASK if wscale_ok else 0,
        rcv_wscale=wscales >> 4 if wscale_ok else 0,
        sack_ok=bool(options & uapi.TCPI_OPT_SACK),
        timestamps_ok=bool(options & uapi.TCPI_OPT_TIMESTAMPS),
        timestamp=timestamp,
        window=TcpWindow.unpack(raw_window),
        # The send queue may overshoot SO_SNDBUF by one segment: record what it must hold.
        sndbuf=max(sndbuf, outq),
        rcvbuf=max(rcvbuf, inq),
    )


def capture(sock: socket.socket) -> TcpState:
    """Snapshot `sock` (ESTABLISHED, flow frozen by the caller); leaves it in repair mode.

    Raises NotEstablishedError, RepairPermissionError or CaptureError; after an error the
    socket is out of repair mode again and the connection carries on.
    """
    info = _check_tcp(sock)
    # A socket with a timeout makes Python wait for readability before every recv(), even
    # with MSG_DONTWAIT, and a repair-mode send queue never becomes readable: peek in
    # non-blocking mode and put the caller's timeout back afterwards.
    timeout = sock.gettimeout()
    if timeout:
        sock.settimeout(0.0)
    repair_on(sock)
    try:
        return _snapshot(sock, info)
    except BaseException:
        with contextlib.suppress(CaptureError):  # the original error is the one to report
            resume(sock)
        raise
    finally:
        if timeout:
            sock.settimeout(timeout)
