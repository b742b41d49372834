"""Exceptions of xo.tls: one type per thing a caller can act on.

A refusal (TlsRefusedError) leaves the connection untouched with its owner: the caller serves
it locally. Its `reason` is a stable short word for stats and logs; the message says why.
"""

from __future__ import annotations

from xo.syscall_error import KernelCallError


class TlsError(Exception):
    """Base of every xo.tls error."""


class TlsStateError(TlsError, ValueError):
    """Bytes or fields that cannot be a TlsState: truncated, wrong lengths, unknown values."""


class TlsStateVersionError(TlsStateError):
    """A TlsState layout version this code does not know."""


class TlsKernelError(TlsError, KernelCallError):
    """A SOL_TLS / TCP_ULP socket call failed; `step` names it, `errno` is the kernel's answer."""


class TlsUnsupportedError(TlsKernelError):
    """This kernel has no kTLS, or not this version/cipher: serve the connection locally."""


class TlsRefusedError(TlsError):
    """The connection cannot be captured now; it stays with its owner, which serves it.

    `reason` is one of the REASON_* words below (for stats), the message explains it.
    """

    NO_KTLS = "no-ktls"
    HALF_KTLS = "half-ktls"
    UNACKED = "send-queue-unacked"
    UNREAD = "records-unread"
    PARTIAL_RECORD = "partial-record"
    NOT_TCP = "not-established"

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class HandshakeError(TlsError):
    """The user-space TLS handshake of the frontend helper failed (bad client, timeout)."""
