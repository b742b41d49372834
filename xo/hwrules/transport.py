"""Issue flower rules over rtnetlink (pyroute2 + the xo.tc plugins) and read where they landed.

Why NLM_F_ECHO: the kernel answers the add with the filter as it stored it, including the
in_hw / not_in_hw flags and in_hw_count, so one round trip both inserts and confirms the rule
(no dump, whose cost grows with the number of rules).
"""

from __future__ import annotations

import errno
import threading
from typing import Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xo import tc
from xo.hwrules.rules import FlowerRule
from xo.tc.flower import OffloadState, offload_state

# Errors that mean "this kernel or device cannot take flower rules at all", not "this rule".
UNSUPPORTED_ERRNOS = {errno.ENOENT, errno.EOPNOTSUPP, errno.EPROTONOSUPPORT}


class RuleRejected(Exception):
    """The kernel refused a flower request; `unsupported` when no flower rule can ever work."""

    def __init__(self, message: str, code: int = 0, unsupported: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.unsupported = unsupported


class Transport(Protocol):
    """How the queue's worker reaches the kernel (the netlink one, or a test double)."""

    def add(self, rule: FlowerRule) -> OffloadState: ...

    def delete(self, rule: FlowerRule) -> None: ...

    def close(self) -> None: ...


class NetlinkTransport:
    """Flower rules in one network namespace. Used from one thread (the queue's worker)."""

    def __init__(self, netns: str | None = None) -> None:
        tc.register()
        self.netns = netns
        self._ipr: IPRoute | None = None
        self._owner: threading.Thread | None = None

    def _socket(self) -> IPRoute:
        if self._ipr is None:
            kwargs = {"netns": self.netns} if self.netns else {}
            self._ipr = IPRoute(ext_ack=True, nlm_echo=True, **kwargs)
            self._owner = threading.current_thread()
        elif self._owner is not threading.current_thread():
            raise RuntimeError("NetlinkTransport is bound to the thread that first used it")
        return self._ipr

    def add(self, rule: FlowerRule) -> OffloadState:
        try:
            replies = self._socket().tc("add-filter", "flower", **rule.tc_args())
        except NetlinkError as e:
            raise _rejected("add", rule, e) from None
        for msg in replies:
            if msg.get_attr("TCA_KIND") == "flower" and msg.get_attr("TCA_OPTIONS"):
                return offload_state(msg)
        raise RuleRejected(f"add {rule.description}: the kernel echoed no flower filter")

    def delete(self, rule: FlowerRule) -> None:
        try:
            self._socket().tc("del-filter", "flower", **rule.locator())
        except NetlinkError as e:
            raise _rejected("delete", rule, e) from None

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


def _rejected(verb: str, rule: FlowerRule, e: NetlinkError) -> RuleRejected:
    text = e.args[1] if len(e.args) > 1 else str(e)
    return RuleRejected(f"{verb} {rule.description}: {text} (errno {e.code})", e.code,
                        unsupported=e.code in UNSUPPORTED_ERRNOS)
