"""Datapath: the flow table of one interface (block / redirect / snat / pass), from Python.

Why a class per interface: one agent drives one NIC; the program pair and its pinned maps
belong to that interface. `attach` is idempotent across processes: a restarted agent finds
the pins, reuses the maps (flows in place keep working) and replaces the filters in place.
`close` drops this process's handles and leaves everything running; `detach` removes the
filters, clsact (if nothing else uses it) and the pins.

Flows are named by xo.flow.FlowKey(client, local): on a frontend `local` is the VIP:vport the
client dialled; on a backend it is the backend's own address and handoff port. Ingress entries
match client -> local, egress entries match local -> client.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bcc.libbcc import lib as _bcc  # type: ignore[import-untyped]

from xo.datapath import tc
from xo.datapath.errors import DatapathError, DatapathPermissionError, FlowTableFull, UnknownFlow
from xo.datapath.layout import (
    Action,
    Counter,
    Direction,
    FlowActionStruct,
    FlowKeyStruct,
    FlowStatsStruct,
    Redirect,
    action_target,
    check_flow,
    format_mac,
    make_action,
    make_key,
    parse_key,
)
from xo.datapath.program import (
    DEFAULT_MAX_FLOWS,
    PIN_ROOT,
    Program,
    check_pinned_size,
    pin_lock,
    pins_exist,
    prepare_pin_dir,
    release_pin_dir,
)
from xo.flow import Endpoint, FlowError, FlowKey

BPF_ANY = 0
BPF_NOEXIST = 1
HOST_NETNS_DIR = "_host"  # pin directory name for the namespace we run in


@dataclass(frozen=True, slots=True)
class FlowStats:
    """Packets and bytes a flow's entries matched (both directions summed)."""

    packets: int
    bytes: int


@dataclass(frozen=True, slots=True)
class FlowEntry:
    """One map entry, decoded."""

    flow: FlowKey
    direction: Direction
    action: Action
    target: Endpoint | None  # REDIRECT: new destination; SNAT: new source
    dst_mac: str | None
    src_mac: str | None
    ifindex: int | None
    packets: int
    bytes: int


def default_pin_dir(ifname: str, netns: str | None) -> Path:
    return PIN_ROOT / (netns or HOST_NETNS_DIR) / ifname


class Datapath:
    """The XO TC program pair attached to one interface, and its flow table."""

    def __init__(
        self,
        program: Program,
        ifname: str,
        ifindex: int,
        mac: str,
        netns: str | None,
        pin_dir: Path,
        reattached: bool,
    ) -> None:
        self._program: Program | None = program
        self.ifname = ifname
        self.ifindex = ifindex
        self.mac = mac
        self.netns = netns
        self.pin_dir = pin_dir
        self.reattached = reattached  # True: maps came from pins left by an earlier attach

    # --- lifecycle -------------------------------------------------------------------------
    @classmethod
    def attach(
        cls,
        ifname: str,
        netns: str | None = None,
        pin_dir: Path | str | None = None,
        max_flows: int = DEFAULT_MAX_FLOWS,
    ) -> Datapath:
        """Load the program (≈0.5 s BCC compile) and attach it to ifname's clsact hooks."""
        if not isinstance(max_flows, int) or max_flows < 1:
            raise DatapathError(f"max_flows must be a positive integer, got {max_flows!r}")
        if os.geteuid() != 0:
            raise DatapathPermissionError(
                "attaching the datapath needs root (BPF, tc, bpffs mount)"
            )
        ipr = tc.open_ipr(netns)
        try:
            ifindex, mac = tc.lookup(ipr, ifname, netns)
            pins = Path(pin_dir) if pin_dir is not None else default_pin_dir(ifname, netns)
            with pin_lock():
                prepare_pin_dir(pins)
                reattached = pins_exist(pins)
                if reattached:
                    check_pinned_size(pins, max_flows)
                try:
                    program = Program(pins, max_flows)
                except BaseException:
                    if not reattached:
                        release_pin_dir(pins)
                    raise
            try:
                tc.attach(
                    ipr,
                    ifindex,
                    {Direction.INGRESS: program.ingress, Direction.EGRESS: program.egress},
                )
            except BaseException:
                program.close()
                if not reattached:
                    with pin_lock():
                        release_pin_dir(pins)
                raise
        finally:
            ipr.close()
        return cls(program, ifname, ifindex, mac, netns, pins, reattached)

    def close(self) -> None:
        """Forget this process's handles; filters and pinned flows keep running (restart)."""
        if self._program is not None:
            self._program.close()
            self._program = None

    def detach(self) -> None:
        """Remove our filters (and clsact if unused), the pins and the maps with them."""
        program = self._live()
        if self.netns is None or (tc.NETNS_DIR / self.netns).exists():
            ipr = tc.open_ipr(self.netns)
            try:
                if ipr.link_lookup(index=self.ifindex):
                    tc.detach(ipr, self.ifindex)
            finally:
                ipr.close()
        with pin_lock():
            release_pin_dir(self.pin_dir)
        program.close()
        self._program = None

    def __enter__(self) -> Datapath:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._program is not None:
            self.detach()

    def _live(self) -> Program:
        if self._program is None:
            raise DatapathError(f"datapath on {self.ifname} is closed or detached")
        return self._program

    # --- entries ---------------------------------------------------------------------------
    def block(self, flow: FlowKey) -> None:
        """Drop the client's packets of this flow (ingress) until changed or removed."""
        self._set(check_flow(flow), Direction.INGRESS, make_action(Action.BLOCK))

    def unblock(self, flow: FlowKey) -> bool:
        """Delete the flow's ingress entry if it is still a BLOCK; a REDIRECT that replaced
        the block is kept (freeze -> redirect -> thaw must leave the redirect working)."""
        flow = check_flow(flow)
        program = self._live()
        key = make_key(flow, Direction.INGRESS)
        value = FlowActionStruct()
        if not self._lookup(program.flows.map_fd, key, value) or value.action != Action.BLOCK:
            return False
        self._delete(program.flows.map_fd, key)
        self._delete(program.stats.map_fd, key)
        return True

    def allow(self, flow: FlowKey) -> None:
        """PASS: deliver the client's packets unchanged, but count them."""
        self._set(check_flow(flow), Direction.INGRESS, make_action(Action.PASS))

    def redirect(self, flow: FlowKey, target: Redirect) -> None:
        """Rewrite the client's packets to target.to / target.mac and send them out again."""
        flow = check_flow(flow)
        if not isinstance(target, Redirect):
            raise FlowError(f"expected xo.datapath.Redirect, got {type(target).__name__}")
        if target.to.family != flow.family:
            raise FlowError(f"redirect of IPv{flow.family} flow {flow} to {target.to}")
        value = make_action(
            Action.REDIRECT,
            target.to,
            ifindex=target.ifindex or self.ifindex,
            dst_mac=target.mac,
            src_mac=target.src_mac or self.mac,
        )
        self._set(flow, Direction.INGRESS, value)

    def snat(self, flow: FlowKey, as_endpoint: Endpoint) -> None:
        """Egress packets local -> client leave with source as_endpoint (e.g. VIP:vport)."""
        flow = check_flow(flow)
        if not isinstance(as_endpoint, Endpoint):
            raise FlowError(f"expected xo.flow.Endpoint, got {type(as_endpoint).__name__}")
        if as_endpoint.family != flow.family:
            raise FlowError(f"source rewrite of IPv{flow.family} flow {flow} to {as_endpoint}")
        self._set(flow, Direction.EGRESS, make_action(Action.SNAT, as_endpoint))

    def remove(self, flow: FlowKey, direction: Direction | None = None) -> bool:
        """Delete the flow's entries (both directions unless told); False if there were none."""
        flow = check_flow(flow)
        program = self._live()
        found = False
        for d in Direction if direction is None else (direction,):
            key = make_key(flow, d)
            found |= self._delete(program.flows.map_fd, key)
            self._delete(program.stats.map_fd, key)
        return found

    def stats(self, flow: FlowKey) -> FlowStats:
        """Packets/bytes matched by the flow's entries; UnknownFlow if it has none."""
        flow = check_flow(flow)
        program = self._live()
        packets = nbytes = 0
        found = False
        for d in Direction:
            key = make_key(flow, d)
            if not self._lookup(program.flows.map_fd, key, FlowActionStruct()):
                continue
            found = True
            st = FlowStatsStruct()
            if self._lookup(program.stats.map_fd, key, st):
                packets += st.packets
                nbytes += st.bytes
        if not found:
            raise UnknownFlow(f"flow {flow} has no entry on {self.ifname}")
        return FlowStats(packets, nbytes)

    def flows(self) -> list[FlowEntry]:
        """Every entry of the table, decoded (order unspecified)."""
        program = self._live()
        out = []
        for key in self._keys(program.flows.map_fd):
            value = FlowActionStruct()
            if not self._lookup(program.flows.map_fd, key, value):
                continue  # removed while we listed
            st = FlowStatsStruct()
            self._lookup(program.stats.map_fd, key, st)
            flow, direction = parse_key(key)
            redirect = value.action == Action.REDIRECT
            out.append(
                FlowEntry(
                    flow=flow,
                    direction=direction,
                    action=Action(value.action),
                    target=action_target(value, flow.family),
                    dst_mac=format_mac(bytes(value.dst_mac)) if redirect else None,
                    src_mac=format_mac(bytes(value.src_mac)) if redirect else None,
                    ifindex=value.ifindex if redirect else None,
                    packets=st.packets,
                    bytes=st.bytes,
                )
            )
        return out

    def counters(self) -> dict[str, int]:
        """The global counters: passed, blocked, redirected, snatted, errors."""
        program = self._live()
        return {c.name.lower(): int(program.counters[ctypes.c_int(c)].value) for c in Counter}

    # --- map access ------------------------------------------------------------------------
    def _set(self, flow: FlowKey, direction: Direction, value: FlowActionStruct) -> None:
        program = self._live()
        key = make_key(flow, direction)
        # Stats first, so the first packet after the action lands is counted; keep old counts.
        created_stats = self._update(program.stats.map_fd, key, FlowStatsStruct(), BPF_NOEXIST)
        try:
            self._update(program.flows.map_fd, key, value, BPF_ANY)
        except DatapathError:
            if created_stats:
                self._delete(program.stats.map_fd, key)
            raise

    def _update(self, fd: int, key: FlowKeyStruct, value: Any, flags: int) -> bool:
        """bpf_map_update_elem; False if NOEXIST and it existed; FlowTableFull on E2BIG."""
        if _bcc.bpf_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST and flags == BPF_NOEXIST:
            return False
        if err == errno.E2BIG:
            raise FlowTableFull(
                f"flow table on {self.ifname} is full: remove finished flows or attach "
                "with a larger max_flows"
            )
        raise DatapathError(f"map update on {self.ifname}: {os.strerror(err)}")

    @staticmethod
    def _delete(fd: int, key: FlowKeyStruct) -> bool:
        return bool(_bcc.bpf_delete_elem(fd, ctypes.byref(key)) == 0)

    @staticmethod
    def _lookup(fd: int, key: FlowKeyStruct, value: Any) -> bool:
        return bool(_bcc.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) == 0)

    @staticmethod
    def _keys(fd: int) -> list[FlowKeyStruct]:
        keys: list[FlowKeyStruct] = []
        key = FlowKeyStruct()
        size = ctypes.sizeof(key)
        if _bcc.bpf_get_first_key(fd, ctypes.byref(key), size) != 0:
            return keys
        while True:
            keys.append(key)
            nxt = FlowKeyStruct()
            if _bcc.bpf_get_next_key(fd, ctypes.byref(key), ctypes.byref(nxt)) != 0:
                return keys
            key = nxt
