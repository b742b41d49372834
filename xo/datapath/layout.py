"""The flow table's map layout, mirrored from bpf/xo_tc.h, and FlowKey <-> map key conversion.

Why a mirror: the datapath builds keys and values without BCC's generated types so that the
layout can be unit-tested without root; `check_sizes` compares it with what BCC compiled at
every attach, and tests/unit/test_datapath_layout.py compares the constants with the header.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from xo.flow import Endpoint, FlowError, FlowKey, IPAddress

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "xo_tc.h"
PROGRAM = HEADER.with_name("xo_tc.c")
MAC_LEN = 6
ADDR_WORDS = 4
# struct xo_flow_key as bytes: addresses, ports in network order, family, dir, padding.
_KEY_WIRE = struct.Struct("!16s16sHHBB2x")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class Action(enum.IntEnum):
    """XO_ACT_*: what the program does with a packet whose 4-tuple matches."""

    PASS = 0
    BLOCK = 1
    REDIRECT = 2
    SNAT = 3


class Direction(enum.IntEnum):
    """XO_DIR_*: which hook a key matches in (part of the key)."""

    INGRESS = 0
    EGRESS = 1


class Counter(enum.IntEnum):
    """XO_CNT_*: indexes of the global counter array."""

    PASSED = 0
    BLOCKED = 1
    REDIRECTED = 2
    SNATTED = 3
    ERRORS = 4


COUNTER_MAX = len(Counter)


class FlowKeyStruct(ctypes.Structure):
    """struct xo_flow_key: addresses and ports in network byte order."""

    _fields_ = [
        ("src", ctypes.c_uint8 * 16),
        ("dst", ctypes.c_uint8 * 16),
        ("sport", ctypes.c_uint8 * 2),
        ("dport", ctypes.c_uint8 * 2),
        ("family", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class FlowActionStruct(ctypes.Structure):
    """struct xo_flow_action."""

    _fields_ = [
        ("action", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint8 * 2),
        ("dst_mac", ctypes.c_uint8 * MAC_LEN),
        ("src_mac", ctypes.c_uint8 * MAC_LEN),
        ("pad", ctypes.c_uint8 * 2),
    ]


class FlowStatsStruct(ctypes.Structure):
    """struct xo_flow_stats."""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


def check_sizes(key_type: type, leaf_type: type, stats_type: type) -> None:
    """Raise if the compiled structs differ in size from this mirror (header edited alone)."""
    for name, mine, theirs in (
        ("xo_flow_key", FlowKeyStruct, key_type),
        ("xo_flow_action", FlowActionStruct, leaf_type),
        ("xo_flow_stats", FlowStatsStruct, stats_type),
    ):
        if ctypes.sizeof(mine) != ctypes.sizeof(theirs):
            raise RuntimeError(
                f"struct {name}: {ctypes.sizeof(theirs)} bytes in {HEADER}, "
                f"{ctypes.sizeof(mine)} in {__name__}: update both together"
            )


def parse_mac(mac: str) -> bytes:
    """'02:78:6f:00:00:0a' -> 6 bytes; FlowError on anything else."""
    if not isinstance(mac, str) or not _MAC_RE.match(mac):
        raise FlowError(f"not a MAC address (expected xx:xx:xx:xx:xx:xx): {mac!r}")
    return bytes.fromhex(mac.replace(":", ""))


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _addr_bytes(ip: IPAddress) -> bytes:
    return ip.packed.ljust(16, b"\0")


def _addr_from(raw: bytes, family: int) -> IPAddress:
    return ipaddress.ip_address(raw[:4] if family == 4 else raw)


def check_flow(flow: object) -> FlowKey:
    """Return `flow` if it is a FlowKey, else raise FlowError saying what was given."""
    if not isinstance(flow, FlowKey):
        raise FlowError(f"expected xo.flow.FlowKey(client, vip), got {type(flow).__name__}")
    return flow


def make_key(flow: FlowKey, direction: Direction) -> FlowKeyStruct:
    """The map key matching the flow's packets at `direction`.

    flow = (client, local): ingress packets go client -> local; egress packets local -> client.
    """
    src, dst = flow.client, flow.vip
    if direction == Direction.EGRESS:
        src, dst = dst, src
    raw = _KEY_WIRE.pack(
        _addr_bytes(src.ip), _addr_bytes(dst.ip), src.port, dst.port, flow.family, direction
    )
    return FlowKeyStruct.from_buffer_copy(raw)


def parse_key(key: FlowKeyStruct) -> tuple[FlowKey, Direction]:
    """Inverse of make_key."""
    family = key.family
    src = Endpoint(_addr_from(bytes(key.src), family), int.from_bytes(bytes(key.sport), "big"))
    dst = Endpoint(_addr_from(bytes(key.dst), family), int.from_bytes(bytes(key.dport), "big"))
    direction = Direction(key.dir)
    flow = FlowKey(src, dst) if direction == Direction.INGRESS else FlowKey(dst, src)
    return flow, direction


@dataclass(frozen=True, slots=True)
class Redirect:
    """Where REDIRECT sends a flow's packets: new destination, its MAC, our MAC, out which link.

    src_mac and ifindex default to the attached interface (the usual case on a bridge/LAN:
    the rewritten packet leaves the way it came, from us, so switches learn nothing wrong).
    """

    to: Endpoint
    mac: str
    src_mac: str | None = None
    ifindex: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.to, Endpoint):
            raise FlowError(f"Redirect.to must be an xo.flow.Endpoint, got {self.to!r}")
        parse_mac(self.mac)
        if self.src_mac is not None:
            parse_mac(self.src_mac)
        if self.ifindex is not None and not 0 < self.ifindex < 2**31:
            raise FlowError(f"bad ifindex {self.ifindex}")


def make_action(
    action: Action,
    addr: Endpoint | None = None,
    ifindex: int = 0,
    dst_mac: str | None = None,
    src_mac: str | None = None,
) -> FlowActionStruct:
    """The map value for one action."""
    value = FlowActionStruct()
    value.action = action
    value.ifindex = ifindex
    if addr is not None:
        value.addr[:] = _addr_bytes(addr.ip)
        value.port[:] = addr.port.to_bytes(2, "big")
    if dst_mac is not None:
        value.dst_mac[:] = parse_mac(dst_mac)
    if src_mac is not None:
        value.src_mac[:] = parse_mac(src_mac)
    return value


def action_target(value: FlowActionStruct, family: int) -> Endpoint | None:
    """The endpoint a REDIRECT/SNAT value rewrites to (None for PASS/BLOCK)."""
    if value.action not in (Action.REDIRECT, Action.SNAT):
        return None
    port = int.from_bytes(bytes(value.port), "big")
    return Endpoint(_addr_from(bytes(value.addr), family), port)
