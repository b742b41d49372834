"""TLS termination for a Python frontend: handshake in user space, records in the kernel.

    front = TlsFrontend(ServerTls(cert, key))
    conn = front.accept(raw_sock)   # kTLS socket: plain send()/xo.tls.recv() from now on,
                                    # or an ssl.SSLSocket where the kernel has no kTLS
    front.offloadable(conn)         # None, or why this connection must stay here

Where the kernel lacks kTLS the connection is served in user space and never offloaded; the
reason is logged once per process and counted in `stats`, not reported per connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import Counter

from xo.tls import kernel
from xo.tls.handshake import ServerTls, handshake

log = logging.getLogger("xo.tls")

STAT_KTLS = "ktls"
STAT_LOCAL = "local-no-ktls"


class TlsFrontend:
    """Accepts TLS clients for one certificate; counts how each connection is served."""

    def __init__(self, config: ServerTls) -> None:
        self.config = config
        self.stats: Counter[str] = Counter()
        self.no_ktls_reason = kernel.unavailable_reason()
        self._reason_logged = False

    @property
    def ktls(self) -> bool:
        return self.no_ktls_reason is None

    def accept(self, sock: socket.socket) -> socket.socket:
        """Handshake on a freshly accepted socket; returns the socket to serve plaintext on.

        With kTLS: the same socket object, kernel TLS installed. Without: an ssl.SSLSocket
        (a socket subclass) that stays on this host. Raises HandshakeError for a bad client.
        """
        if self.no_ktls_reason is not None:
            self._note_local()
            return self.config.context().wrap_socket(sock, server_side=True)
        state = handshake(sock, self.config)
        try:
            kernel.install(sock, state)
        finally:
            state.zero()
        self.stats[STAT_KTLS] += 1
        return sock

    def offloadable(self, sock: socket.socket) -> str | None:
        """None when `sock` could be handed off now, else the reason it stays here."""
        if isinstance(sock, ssl.SSLSocket):
            return f"served in user space: {self.no_ktls_reason or 'not a kTLS socket'}"
        try:
            kernel.check_quiescent(sock)
        except kernel.TlsRefusedError as e:
            return str(e)
        return None

    def _note_local(self) -> None:
        self.stats[STAT_LOCAL] += 1
        if not self._reason_logged:
            self._reason_logged = True
            log.warning("TLS connections are served locally and never offloaded: %s",
                        self.no_ktls_reason)
