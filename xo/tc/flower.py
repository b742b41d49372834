"""cls_flower as a pyroute2 tc plugin (see tc-flower(8), include/uapi/linux/pkt_cls.h).

Keys: protocol (the filter's eth type), ip_proto, src_ip/dst_ip (IPv4 or IPv6, an address
or a network), src_port/dst_port (TCP); flags skip_sw/skip_hw; actions through pyroute2's
generic `action=` list. Attributes are emitted in the order iproute2's `tc` emits them for
`flower ip_proto P src_ip A dst_ip B src_port X dst_port Y action ...`, so the request is
byte-identical to tc's. On dump, the kernel reports where the rule lives: `offload_state()`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import protocols
from pyroute2.netlink import nla
from pyroute2.netlink.rtnl.tcmsg.common_act import get_tca_action, tca_act_prio

from xo.tc.errors import TcError

# TCA_CLS_FLAGS_* (pkt_cls.h)
SKIP_HW = 1 << 0
SKIP_SW = 1 << 1
IN_HW = 1 << 2
NOT_IN_HW = 1 << 3
VERBOSE = 1 << 4

IP_PROTOS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
ETH_TYPES = {4: protocols.ETH_P_IP, 6: protocols.ETH_P_IPV6}
PRIO_SHIFT = 16
PROTOCOL_MASK = 0xFFFF
MAX_PORT = 0xFFFF


def fix_request(request: dict[str, Any]) -> None:
    """tcm_info = prio << 16 | htons(protocol), as for every classifier."""
    protocol = request.get("protocol", protocols.ETH_P_ALL) & PROTOCOL_MASK
    request["info"] = socket.htons(protocol) | (request.get("prio", 0) << PRIO_SHIFT)


def _ip_proto(value: int | str) -> int:
    if isinstance(value, str):
        if value not in IP_PROTOS:
            raise TcError(f"flower: ip_proto must be one of {sorted(IP_PROTOS)} or a number")
        return IP_PROTOS[value]
    if not 0 <= value <= 0xFF:
        raise TcError(f"flower: ip_proto out of range 0..255: {value}")
    return value


def _network(name: str, value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=True)
    except ValueError as e:
        raise TcError(f"flower: bad {name} {value!r}: {e}") from None


def _port(name: str, value: object) -> int:
    if not isinstance(value, int) or not 0 < value <= MAX_PORT:
        raise TcError(f"flower: {name} must be a port 1..65535, got {value!r}")
    return value


def get_parameters(kwarg: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """TCA_OPTIONS of a flower filter from pyroute2-style keyword arguments."""
    attrs: list[list[Any]] = []
    protocol = kwarg.get("protocol", protocols.ETH_P_ALL)
    if "ip_proto" in kwarg:
        attrs.append(["TCA_FLOWER_KEY_IP_PROTO", _ip_proto(kwarg["ip_proto"])])
    for side in ("src", "dst"):
        if f"{side}_ip" not in kwarg:
            continue
        net = _network(f"{side}_ip", kwarg[f"{side}_ip"])
        if ETH_TYPES[net.version] != protocol:
            raise TcError(f"flower: {side}_ip {net} needs protocol {ETH_TYPES[net.version]:#06x},"
                          f" the filter has {protocol:#06x}")
        key = f"TCA_FLOWER_KEY_IPV{net.version}_{side.upper()}"
        attrs.append([key, str(net.network_address)])
        attrs.append([f"{key}_MASK", str(net.netmask)])
    for side in ("src", "dst"):
        if f"{side}_port" not in kwarg:
            continue
        if kwarg.get("ip_proto") not in ("tcp", socket.IPPROTO_TCP):
            raise TcError(f"flower: {side}_port needs ip_proto tcp")
        attrs.append([f"TCA_FLOWER_KEY_TCP_{side.upper()}", _port(f"{side}_port",
                                                                   kwarg[f"{side}_port"])])
    if kwarg.get("action"):
        attrs.append(["TCA_FLOWER_ACT", get_tca_action(kwarg)])
    if kwarg.get("skip_sw") and kwarg.get("skip_hw"):
        raise TcError("flower: skip_sw and skip_hw together leave the rule nowhere")
    flags = (SKIP_SW if kwarg.get("skip_sw") else 0) | (SKIP_HW if kwarg.get("skip_hw") else 0)
    attrs.append(["TCA_FLOWER_FLAGS", flags])
    if protocol != protocols.ETH_P_ALL:
        attrs.append(["TCA_FLOWER_KEY_ETH_TYPE", protocol])
    return {"attrs": attrs}


class options(nla):
    """TCA_OPTIONS of a flower filter; numbered like enum TCA_FLOWER_* of pkt_cls.h."""

    nla_map = (
        (0, "TCA_FLOWER_UNSPEC", "none"),
        (1, "TCA_FLOWER_CLASSID", "uint32"),
        (2, "TCA_FLOWER_INDEV", "asciiz"),
        (3, "TCA_FLOWER_ACT", "tca_act_prio"),
        (4, "TCA_FLOWER_KEY_ETH_DST", "l2addr"),
        (5, "TCA_FLOWER_KEY_ETH_DST_MASK", "l2addr"),
        (6, "TCA_FLOWER_KEY_ETH_SRC", "l2addr"),
        (7, "TCA_FLOWER_KEY_ETH_SRC_MASK", "l2addr"),
        (8, "TCA_FLOWER_KEY_ETH_TYPE", "be16"),
        (9, "TCA_FLOWER_KEY_IP_PROTO", "uint8"),
        (10, "TCA_FLOWER_KEY_IPV4_SRC", "ip4addr"),
        (11, "TCA_FLOWER_KEY_IPV4_SRC_MASK", "ip4addr"),
        (12, "TCA_FLOWER_KEY_IPV4_DST", "ip4addr"),
        (13, "TCA_FLOWER_KEY_IPV4_DST_MASK", "ip4addr"),
        (14, "TCA_FLOWER_KEY_IPV6_SRC", "ip6addr"),
        (15, "TCA_FLOWER_KEY_IPV6_SRC_MASK", "ip6addr"),
        (16, "TCA_FLOWER_KEY_IPV6_DST", "ip6addr"),
        (17, "TCA_FLOWER_KEY_IPV6_DST_MASK", "ip6addr"),
        (18, "TCA_FLOWER_KEY_TCP_SRC", "be16"),
        (19, "TCA_FLOWER_KEY_TCP_DST", "be16"),
        (20, "TCA_FLOWER_KEY_UDP_SRC", "be16"),
        (21, "TCA_FLOWER_KEY_UDP_DST", "be16"),
        (22, "TCA_FLOWER_FLAGS", "uint32"),
        (35, "TCA_FLOWER_KEY_TCP_SRC_MASK", "be16"),
        (36, "TCA_FLOWER_KEY_TCP_DST_MASK", "be16"),
        (86, "TCA_FLOWER_IN_HW_COUNT", "uint32"),
    )

    tca_act_prio = tca_act_prio


@dataclass(frozen=True, slots=True)
class OffloadState:
    """Where the kernel says a dumped flower rule lives."""

    in_hw: bool
    not_in_hw: bool
    in_hw_count: int
    skip_sw: bool
    skip_hw: bool


def offload_state(msg: Any) -> OffloadState:
    """Decode in_hw / not_in_hw / in_hw_count (and the skip flags) of a dumped flower tcmsg."""
    if msg.get_attr("TCA_KIND") != "flower":
        raise TcError(f"not a flower filter: kind {msg.get_attr('TCA_KIND')!r}")
    opts = msg.get_attr("TCA_OPTIONS")
    if opts is None:
        raise TcError("flower filter without options (a chain head, not a rule)")
    flags = opts.get_attr("TCA_FLOWER_FLAGS") or 0
    return OffloadState(
        in_hw=bool(flags & IN_HW),
        not_in_hw=bool(flags & NOT_IN_HW),
        in_hw_count=opts.get_attr("TCA_FLOWER_IN_HW_COUNT") or 0,
        skip_sw=bool(flags & SKIP_SW),
        skip_hw=bool(flags & SKIP_HW),
    )
