"""Exceptions of xo.tcp: one type per thing a caller can act on.

Every failure of capture/restore is a TcpError; syscall failures keep their errno (`.errno`)
and name the step that failed, so a log line says what the kernel refused and where.
"""

from __future__ import annotations

from xo.syscall_error import KernelCallError


class TcpError(Exception):
    """Base of every xo.tcp error."""


class StateFormatError(TcpError, ValueError):
    """State bytes that cannot be a TcpState: truncated, corrupted, or fields out of range."""


class StateVersionError(StateFormatError):
    """State bytes of a layout version this code does not know."""


class QueueTooLargeError(TcpError, ValueError):
    """Queued bytes that do not fit the socket buffers (recorded in the state, or granted)."""


class SyscallError(TcpError, KernelCallError):
    """A socket call failed; `step` names the recipe step, `errno` is the kernel's answer."""


class NotEstablishedError(TcpError):
    """The socket is not a TCP socket in state ESTABLISHED (listening, closing, UDP, ...)."""


class RepairPermissionError(SyscallError, PermissionError):
    """TCP_REPAIR (or a forced buffer size) was refused: the caller lacks CAP_NET_ADMIN."""


class AddressInUseError(SyscallError):
    """The local address, or the whole 4-tuple, is already taken by another socket."""


class CaptureError(SyscallError):
    """Capture failed; the socket was taken out of repair mode and still works."""


class RestoreError(SyscallError):
    """Restore failed; the half-built socket was closed in repair mode (no FIN, no RST)."""
