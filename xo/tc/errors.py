"""The one exception type of xo.tc: a rule pyroute2 would otherwise encode wrong or drop."""

from __future__ import annotations


class TcError(ValueError):
    """A flower key, pedit munge or csum target that cannot be encoded (named in the message)."""
