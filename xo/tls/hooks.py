"""The agent's kTLS seam (xo.agent.context.TlsHooks) backed by xo.tls.

Capture refuses a socket that is not quiescent (see xo.tls.kernel); call it BEFORE
xo.tcp.capture: TCP_REPAIR's queue peek on a kTLS socket returns decrypted data, so the TLS
check has to have proven the queues empty first.
"""

from __future__ import annotations

import functools
import logging
import socket

from xo.tls import kernel
from xo.tls.state import TlsState
from xo.v1 import offload_pb2

log = logging.getLogger("xo.tls")


@functools.cache
def _log_unavailable(reason: str) -> None:
    """Once per process, not per connection."""
    log.warning("no kTLS: TLS connections are served locally, never offloaded: %s", reason)


class KernelTls:
    """TlsHooks for an agent on a kernel with kTLS (supported is False without it)."""

    def __init__(self) -> None:
        self.reason = kernel.unavailable_reason()
        self.supported = self.reason is None
        if self.reason is not None:
            _log_unavailable(self.reason)

    def capture(self, sock: socket.socket) -> offload_pb2.TlsState | None:
        state = kernel.capture(sock)
        if state is None:
            return None
        try:
            return state.to_proto()
        finally:
            state.zero()

    def install(self, sock: socket.socket, state: offload_pb2.TlsState) -> None:
        tls = TlsState.from_proto(state)
        try:
            kernel.install(sock, tls)
        finally:
            tls.zero()
