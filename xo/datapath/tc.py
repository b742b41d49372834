"""Attach/detach the program pair as clsact filters with pyroute2 (optionally in a netns).

One bpf filter per hook, at a fixed priority and handle, so a re-attach replaces it in place
(no window without a filter) and detach removes exactly ours.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from xo.datapath.errors import DatapathError, DatapathPermissionError, InterfaceNotFound
from xo.datapath.layout import Direction

NETNS_DIR = Path("/run/netns")
PARENT = {Direction.INGRESS: 0xFFFFFFF2, Direction.EGRESS: 0xFFFFFFF3}  # clsact ingress/egress
FILTER_PRIO = 0xC0
FILTER_HANDLE = 1
CLASSID = 1


def open_ipr(netns: str | None) -> IPRoute:
    """A route socket in `netns` (None: ours). pyroute2 would create a missing netns: refuse."""
    if netns is None:
        return IPRoute()
    if not (NETNS_DIR / netns).exists():
        raise InterfaceNotFound(f"no network namespace {netns!r} (not in {NETNS_DIR})")
    return IPRoute(netns=netns)


def _netlink(what: str, e: NetlinkError) -> DatapathError:
    if e.code == errno.EPERM:
        return DatapathPermissionError(f"{what}: needs root (CAP_NET_ADMIN)")
    return DatapathError(f"{what}: {e}")


def lookup(ipr: IPRoute, ifname: str, netns: str | None) -> tuple[int, str]:
    """(ifindex, MAC) of ifname; InterfaceNotFound with the namespace in the message."""
    where = f"namespace {netns}" if netns else "this namespace"
    if not isinstance(ifname, str) or not ifname:
        raise InterfaceNotFound(f"interface name must be a non-empty string, got {ifname!r}")
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise InterfaceNotFound(f"no interface {ifname!r} in {where}")
    link = ipr.get_links(idx[0])[0]
    return idx[0], link.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"


def attach(ipr: IPRoute, ifindex: int, programs: dict[Direction, Any]) -> None:
    """Ensure clsact, then add-or-replace our filter on each hook."""
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise _netlink(f"adding clsact to ifindex {ifindex}", e) from None
    for direction, fn in programs.items():
        try:
            ipr.tc(
                "replace-filter",
                "bpf",
                ifindex,
                FILTER_HANDLE,
                fd=fn.fd,
                name=fn.name,
                parent=PARENT[direction],
                prio=FILTER_PRIO,
                classid=CLASSID,
                direct_action=True,
            )
        except NetlinkError as e:
            raise _netlink(f"attaching {fn.name!r} ({direction.name})", e) from None


def our_filters(ipr: IPRoute, ifindex: int, direction: Direction) -> list[Any]:
    """Our bpf filters on one hook (a clsact may carry other tools' filters too)."""
    try:
        found = ipr.get_filters(ifindex, parent=PARENT[direction])
    except NetlinkError as e:
        if e.code == errno.EINVAL:  # no clsact
            return []
        raise _netlink("listing filters", e) from None
    return [
        f for f in found if f.get_attr("TCA_KIND") == "bpf" and (f["info"] >> 16) == FILTER_PRIO
    ]


def detach(ipr: IPRoute, ifindex: int) -> None:
    """Remove our filters, and clsact itself when no other filter remains on it."""
    for direction in Direction:
        if not our_filters(ipr, ifindex, direction):
            continue
        try:
            ipr.tc(
                "del-filter",
                "bpf",
                ifindex,
                FILTER_HANDLE,
                parent=PARENT[direction],
                prio=FILTER_PRIO,
            )
        except NetlinkError as e:
            raise _netlink(f"removing the {direction.name} filter", e) from None
    others = []
    for direction in Direction:
        with contextlib.suppress(NetlinkError):  # EINVAL: no clsact
            others += list(ipr.get_filters(ifindex, parent=PARENT[direction]))
    if others:
        return
    try:
        ipr.tc("del", "clsact", ifindex)
    except NetlinkError as e:
        if e.code not in (errno.EINVAL, errno.ENOENT):
            raise _netlink("removing clsact", e) from None
