"""Kernel TLS state of live connections: capture it, carry it, install it elsewhere.

    xo.tls.wait_quiescent(sock, timeout=0.5)  # before freezing: everything sent is acked
    freezer.freeze(flow)
    tls = xo.tls.capture(sock)                 # TlsState | None (no kTLS); before xo.tcp.capture
    tcp = xo.tcp.capture(sock)
    ... elsewhere:
    sock = xo.tcp.restore(tcp, local=..., probe=False)
    xo.tls.install(sock, tls)                  # before the peer can send: then nudge/thaw
    tls.zero()

A stock kernel cannot read the TCP queues of a kTLS socket, so only quiescent sockets are
captured (TlsRefusedError otherwise, the connection stays with its owner). TlsFrontend
terminates TLS for a Python server: user-space handshake, then kTLS. See docs/tls.md.
"""

from xo.tls.errors import (
    HandshakeError,
    TlsError,
    TlsKernelError,
    TlsRefusedError,
    TlsStateError,
    TlsStateVersionError,
    TlsUnsupportedError,
)
from xo.tls.frontend import TlsFrontend
from xo.tls.handshake import ServerTls, handshake
from xo.tls.kernel import (
    capture,
    check_quiescent,
    install,
    recv,
    send_close_notify,
    unavailable_reason,
    wait_quiescent,
)
from xo.tls.state import TLS_STATE_VERSION, TlsCipher, TlsDirection, TlsState, TlsVersion

__all__ = [
    "TLS_STATE_VERSION",
    "HandshakeError",
    "ServerTls",
    "TlsCipher",
    "TlsDirection",
    "TlsError",
    "TlsFrontend",
    "TlsKernelError",
    "TlsRefusedError",
    "TlsState",
    "TlsStateError",
    "TlsStateVersionError",
    "TlsUnsupportedError",
    "TlsVersion",
    "capture",
    "check_quiescent",
    "handshake",
    "install",
    "recv",
    "send_close_notify",
    "unavailable_reason",
    "wait_quiescent",
]
