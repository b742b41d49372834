"""Errors of the datapath: each names what was wrong and what to do about it."""

from __future__ import annotations


class DatapathError(RuntimeError):
    """The datapath could not do what was asked (load, attach, map update, detach)."""


class DatapathPermissionError(DatapathError, PermissionError):
    """Needs root: loading BPF, tc, mounting the bpffs."""


class InterfaceNotFound(DatapathError, LookupError):
    """No such interface (in the given namespace)."""


class FlowTableFull(DatapathError):
    """The flow map reached max_flows: remove finished flows or attach with a bigger table."""


class UnknownFlow(DatapathError, KeyError):
    """The flow has no entry in the table."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""
