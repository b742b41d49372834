"""One exception shape for a failed kernel call, shared by xo.tcp and xo.tls.

A log line must say which step of a recipe the kernel refused and why: `step` names it, the
errno stays an OSError's `.errno` so callers can still test for EPERM, EEXIST and friends.
"""

from __future__ import annotations

import errno as errno_codes
import os


class KernelCallError(OSError):
    """A socket call failed at `step`; the message is "step: strerror (ECODE)[: detail]"."""

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        self.step = step
        text = f"{step}: {os.strerror(err)} ({errno_codes.errorcode.get(err, err)})"
        OSError.__init__(self, err, text + (f": {detail}" if detail else ""))

    def __str__(self) -> str:
        return str(self.strerror)
