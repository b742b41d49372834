"""Kernel TLS on a socket: is it there, read its state, install a state, records by type.

The rule for capturing a kTLS socket (measured on Debian's 6.1, see docs/tls.md): TCP_REPAIR
cannot read its queues. With TLS_RX set, recv() goes through tls_sw_recvmsg, which ignores
repair mode: a "peek" of either TCP queue returns decrypted receive data (or nothing), and it
decrypts a record into the kernel's rx_list, advancing rec_seq. Seed 003 patched the kernel
for this; on a stock kernel a kTLS socket is captured only when quiescent:
  - send side: every byte acknowledged (SIOCOUTQ == 0), waited for (bounded) before the flow
    is frozen, checked again after;
  - receive side: nothing in the TCP receive queue (SIOCINQ == 0: neither an unread record
    nor a partial one) and no decrypted data pending (poll() not readable).
Anything else is refused with TlsRefusedError and the owner keeps serving the connection.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import select
import socket
import struct
import time

from xo import uapi
from xo.tls.errors import (
    TlsKernelError,
    TlsRefusedError,
    TlsStateError,
    TlsUnsupportedError,
)
from xo.tls.state import TlsState

ULP_TLS = b"tls"
_INT = struct.Struct("=i")
QUIESCE_POLL_S = 0.0005

# TLS record content types (RFC 8446 B.1) and the alert that ends a session cleanly.
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23
ALERT_LEVEL_WARNING = 1
ALERT_CLOSE_NOTIFY = 0
CLOSE_NOTIFY = bytes([ALERT_LEVEL_WARNING, ALERT_CLOSE_NOTIFY])


@functools.cache
def unavailable_reason() -> str | None:
    """None when this kernel has the TLS ULP, else why not (asked once per process).

    Setting TCP_ULP "tls" on an unconnected socket answers without a connection: ENOENT =
    no such ULP (no CONFIG_TLS, module not loadable), ENOTCONN = present (tls_init refuses
    anything but ESTABLISHED). Loading the module on demand needs CAP_NET_ADMIN.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(uapi.SOL_TCP, uapi.TCP_ULP, ULP_TLS)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return None
            if e.errno == errno.ENOENT:
                return "kernel has no kTLS (TCP ULP 'tls' not found: no CONFIG_TLS or module)"
            return f"kTLS probe failed: {e.strerror}"
    return "kTLS probe: TCP_ULP accepted on an unconnected socket (unexpected)"


def ulp_of(sock: socket.socket) -> str:
    """The socket's upper layer protocol name ("" when none)."""
    try:
        raw = sock.getsockopt(uapi.SOL_TCP, uapi.TCP_ULP, uapi.TCP_ULP_NAME_MAX)
    except OSError as e:
        raise TlsKernelError("getsockopt TCP_ULP", e.errno or errno.EIO) from None
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def _ioctl_int(sock: socket.socket, request: int, step: str) -> int:
    try:
        return int(_INT.unpack(fcntl.ioctl(sock.fileno(), request, bytes(_INT.size)))[0])
    except OSError as e:
        raise TlsKernelError(step, e.errno or errno.EIO) from None


def _readable(sock: socket.socket) -> bool:
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(0))


def check_quiescent(sock: socket.socket) -> None:
    """Refuse (TlsRefusedError) unless both directions sit at a record boundary with nothing
    queued: the only state of a kTLS socket a stock kernel lets us move."""
    outq = _ioctl_int(sock, uapi.SIOCOUTQ, "SIOCOUTQ")
    if outq:
        raise TlsRefusedError(
            TlsRefusedError.UNACKED,
            f"{outq} bytes sent but not acknowledged (a stock kernel cannot read the send "
            "queue of a kTLS socket)",
        )
    inq = _ioctl_int(sock, uapi.SIOCINQ, "SIOCINQ")
    if inq:
        raise TlsRefusedError(
            TlsRefusedError.PARTIAL_RECORD,
            f"{inq} bytes in the receive queue (a record not yet read, or only part of one)",
        )
    if _readable(sock):
        raise TlsRefusedError(
            TlsRefusedError.UNREAD, "decrypted data the application has not read yet"
        )


def wait_quiescent(sock: socket.socket, timeout: float) -> float:
    """Wait up to `timeout` s for the peer to acknowledge everything sent, then check both
    directions. Call it before freezing the flow (frozen, no ACK can arrive). Returns the
    seconds waited; raises TlsRefusedError with the reason when the socket stays busy."""
    start = time.monotonic()
    deadline = start + timeout
    while _ioctl_int(sock, uapi.SIOCOUTQ, "SIOCOUTQ") and time.monotonic() < deadline:
        time.sleep(QUIESCE_POLL_S)
    check_quiescent(sock)
    return time.monotonic() - start


def _read_direction(sock: socket.socket, which: int) -> bytearray | None:
    """The crypto info of one direction; the kernel wants the exact struct size, so the
    header (version, cipher) is read first. None when the direction is not configured."""
    name = "TLS_TX" if which == uapi.TLS_TX else "TLS_RX"
    try:
        header = sock.getsockopt(uapi.SOL_TLS, which, uapi.TLS_CRYPTO_INFO.size)
        cipher_type = uapi.TLS_CRYPTO_INFO.unpack(header)[1]
        layout = uapi.TLS_CIPHERS.get(cipher_type)
        if layout is None:
            raise TlsStateError(f"kernel {name} uses cipher {cipher_type}, unknown to XO")
        return bytearray(sock.getsockopt(uapi.SOL_TLS, which, layout.size))
    except OSError as e:
        if e.errno == errno.EBUSY:  # this direction was never configured
            return None
        raise TlsKernelError(f"getsockopt {name}", e.errno or errno.EIO) from None


def capture(sock: socket.socket, *, check: bool = True) -> TlsState | None:
    """The kTLS state of `sock` (both directions, exact record sequence numbers), or None for
    a socket without kTLS. The flow must be frozen (like xo.tcp.capture). With check=True the
    socket must be quiescent (check_quiescent); capture only reads, so after any error the
    connection carries on unchanged."""
    if ulp_of(sock) != ULP_TLS.decode():
        return None
    if check:
        check_quiescent(sock)
    tx_raw, rx_raw = _read_direction(sock, uapi.TLS_TX), _read_direction(sock, uapi.TLS_RX)
    try:
        if tx_raw is None or rx_raw is None:
            missing = "TX" if tx_raw is None else "RX"
            raise TlsRefusedError(
                TlsRefusedError.HALF_KTLS,
                f"kTLS {missing} is not configured: that direction's record layer lives in "
                "user space and cannot be moved",
            )
        tx_version, tx_cipher, tx = TlsState.parse_crypto_info(tx_raw)
        rx_version, rx_cipher, rx = TlsState.parse_crypto_info(rx_raw)
        if (tx_version, tx_cipher) != (rx_version, rx_cipher):
            raise TlsStateError("kTLS TX and RX disagree on version or cipher")
        return TlsState(tx_version, tx_cipher, tx, rx)
    finally:
        for raw in (tx_raw, rx_raw):
            if raw is not None:
                raw[:] = bytes(len(raw))


def install(sock: socket.socket, state: TlsState) -> None:
    """Turn kTLS on for `sock` with `state`: TCP_ULP "tls", then TLS_TX, then TLS_RX.

    `sock` must be ESTABLISHED (a restored socket qualifies while still in repair mode). On
    failure the socket is half configured and must be discarded (closed in repair mode):
    TlsUnsupportedError when the kernel lacks kTLS or the cipher, TlsKernelError otherwise.
    """
    if not isinstance(state, TlsState):
        raise TypeError(f"install() needs a TlsState, got {type(state).__name__}")
    try:
        sock.setsockopt(uapi.SOL_TCP, uapi.TCP_ULP, ULP_TLS)
    except OSError as e:
        err = e.errno or errno.EIO
        if err == errno.ENOENT:
            raise TlsUnsupportedError("TCP_ULP tls", err, "kernel has no kTLS") from None
        if err == errno.EEXIST:
            raise TlsKernelError("TCP_ULP tls", err, "socket already has an upper layer") from None
        raise TlsKernelError("TCP_ULP tls", err) from None
    for which, direction in ((uapi.TLS_TX, state.tx), (uapi.TLS_RX, state.rx)):
        info = state.crypto_info(direction)
        name = "TLS_TX" if which == uapi.TLS_TX else "TLS_RX"
        try:
            sock.setsockopt(uapi.SOL_TLS, which, info)
        except OSError as e:
            err = e.errno or errno.EIO
            if err in (errno.ENOENT, errno.EINVAL, errno.ENOPROTOOPT):
                raise TlsUnsupportedError(
                    f"setsockopt {name}", err,
                    f"kernel refuses {state.version.name} with {state.cipher.name}",
                ) from None
            raise TlsKernelError(f"setsockopt {name}", err) from None
        finally:
            info[:] = bytes(len(info))


def recv_record(sock: socket.socket, size: int) -> tuple[int, bytes]:
    """recv() on a kTLS socket that also reports non-data records: (content type, bytes).

    Without a control-message buffer the kernel fails a non-data record (alert, handshake)
    with EIO; with one it returns the record alone and its type in a cmsg.
    """
    data, ancdata, _flags, _addr = sock.recvmsg(size, socket.CMSG_SPACE(1))
    for level, kind, payload in ancdata:
        if level == uapi.SOL_TLS and kind == uapi.TLS_GET_RECORD_TYPE and payload:
            return payload[0], data
    return CONTENT_APPLICATION_DATA, data


def recv(sock: socket.socket, size: int) -> bytes:
    """Plaintext from a kTLS socket; b"" at EOF or at the peer's close_notify alert.

    Raises TlsKernelError for a fatal alert or a handshake record (e.g. a TLS 1.3 KeyUpdate,
    which kTLS of this kernel cannot follow): the session cannot continue.
    """
    kind, data = recv_record(sock, size)
    if kind == CONTENT_APPLICATION_DATA:
        return data
    if kind == CONTENT_ALERT and data[:2] == CLOSE_NOTIFY:
        return b""
    detail = f"alert {data[:2].hex()}" if kind == CONTENT_ALERT else f"record type {kind}"
    raise TlsKernelError("recv", errno.EPROTO, f"peer sent {detail}")


def send_close_notify(sock: socket.socket) -> None:
    """Send the close_notify alert through kTLS (before shutdown/close), as TLS asks."""
    cmsg = [(uapi.SOL_TLS, uapi.TLS_SET_RECORD_TYPE, bytes([CONTENT_ALERT]))]
    try:
        sock.sendmsg([CLOSE_NOTIFY], cmsg)
    except OSError as e:
        raise TlsKernelError("send close_notify", e.errno or errno.EIO) from None
