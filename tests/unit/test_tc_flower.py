"""The flower plugin against iproute2's bytes: requests byte-identical, dumps decoded."""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
from pyroute2 import protocols
from tc_wire import decode, encode, ifindex_of, raw, same_request

from xo import tc
from xo.tc import TcError, flower

V4 = dict(src_ip="198.18.0.10", dst_ip="198.18.0.100")
V6 = dict(src_ip="fd00:78:6f::10", dst_ip="fd00:78:6f::100")
DST_MAC, SRC_MAC = "02:00:00:00:00:21", "02:00:00:00:00:01"
BACKEND = {4: "198.18.0.21", 6: "fd00:78:6f::21"}
HPORT = 61000


def locator(name: str, protocol: int) -> dict[str, object]:
    return dict(index=ifindex_of(raw(name, "request")), parent=tc.INGRESS, prio=10,
                handle=1, protocol=protocol)


def match(addrs: dict[str, str], **flags: bool) -> dict[str, object]:
    return dict(ip_proto="tcp", **addrs, src_port=40000, dst_port=80, **flags)


def redirect_actions(version: int, out: int) -> list[dict[str, object]]:
    return [
        {"kind": "pedit", "action": "pipe", "keys": [
            ("eth", "dst", DST_MAC), ("eth", "src", SRC_MAC),
            ("ip" if version == 4 else "ip6", "dst", BACKEND[version]), ("tcp", "dport", HPORT)]},
        {"kind": "csum", "action": "pipe", "update": ["iph", "tcp"] if version == 4 else ["tcp"]},
        {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": out},
    ]


CASES = {
    "flower_v4_redirect": (protocols.ETH_P_IP, V4, {"skip_hw": True}, 4, "redirect"),
    "flower_v6_redirect": (protocols.ETH_P_IPV6, V6, {"skip_hw": True}, 6, "redirect"),
    "flower_v4_block": (protocols.ETH_P_IP, V4, {"skip_hw": True}, 4, "drop"),
    "flower_v6_block": (protocols.ETH_P_IPV6, V6, {"skip_hw": True}, 6, "drop"),
    "flower_v4_redirect_skip_sw": (protocols.ETH_P_IP, V4, {"skip_sw": True}, 4, "redirect"),
    "flower_v4_block_in_hw": (protocols.ETH_P_IP, V4, {"skip_sw": True}, 4, "drop"),
}


def request_args(name: str) -> dict[str, object]:
    protocol, addrs, flags, version, what = CASES[name]
    loc = locator(name, protocol)
    action = (redirect_actions(version, int(loc["index"])) if what == "redirect"
              else [{"kind": "gact", "action": "drop"}])
    return {**loc, **match(addrs, **flags), "action": action}


@pytest.mark.parametrize("name", sorted(CASES))
def test_add_request_is_byte_identical_to_tc(name: str) -> None:
    ours = encode("add-filter", "flower", **request_args(name))
    assert same_request(ours, raw(name, "request")), f"{name}: {ours.hex()}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_delete_request_is_byte_identical_to_tc(name: str) -> None:
    ours = encode("del-filter", "flower", **locator(name, CASES[name][0]))
    assert same_request(ours, raw(name, "delete"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_tc_request_keys(name: str) -> None:
    protocol, addrs, flags, version, _ = CASES[name]
    opts = decode(raw(name, "request")).get_attr("TCA_OPTIONS")
    assert opts.get_attr("TCA_FLOWER_KEY_ETH_TYPE") == protocol
    assert opts.get_attr("TCA_FLOWER_KEY_IP_PROTO") == 6
    assert opts.get_attr(f"TCA_FLOWER_KEY_IPV{version}_SRC") == addrs["src_ip"]
    assert opts.get_attr(f"TCA_FLOWER_KEY_IPV{version}_DST") == addrs["dst_ip"]
    assert opts.get_attr("TCA_FLOWER_KEY_TCP_SRC") == 40000
    assert opts.get_attr("TCA_FLOWER_KEY_TCP_DST") == 80
    want = flower.SKIP_SW if flags.get("skip_sw") else flower.SKIP_HW
    assert opts.get_attr("TCA_FLOWER_FLAGS") == want


@pytest.mark.parametrize("name,in_hw", [
    ("flower_v4_redirect", False), ("flower_v6_redirect", False), ("flower_v4_block", False),
    ("flower_v6_block", False), ("flower_v4_redirect_skip_sw", True),
    ("flower_v4_block_in_hw", True)])
def test_dump_offload_state(name: str, in_hw: bool) -> None:
    state = flower.offload_state(decode(raw(name, "dump")))
    assert state.in_hw is in_hw
    assert state.not_in_hw is not in_hw
    assert state.in_hw_count == (1 if in_hw else 0)
    assert state.skip_sw is in_hw and state.skip_hw is not in_hw


def test_dump_carries_the_kernel_masks() -> None:
    opts = decode(raw("flower_v4_redirect", "dump")).get_attr("TCA_OPTIONS")
    assert opts.get_attr("TCA_FLOWER_KEY_TCP_DST_MASK") == 0xFFFF
    assert opts.get_attr("TCA_FLOWER_KEY_IPV4_DST_MASK") == "255.255.255.255"


def test_prefix_match_encodes_the_netmask() -> None:
    msg = decode(encode("add-filter", "flower", index=1, parent=tc.INGRESS, prio=1,
                        protocol=protocols.ETH_P_IP, dst_ip="198.18.0.0/24", action="drop"))
    opts = msg.get_attr("TCA_OPTIONS")
    assert opts.get_attr("TCA_FLOWER_KEY_IPV4_DST") == "198.18.0.0"
    assert opts.get_attr("TCA_FLOWER_KEY_IPV4_DST_MASK") == "255.255.255.0"


@pytest.mark.parametrize("kwarg,message", [
    (dict(protocol=protocols.ETH_P_IP, dst_ip="fd00::1"), "needs protocol"),
    (dict(protocol=protocols.ETH_P_IP, dst_ip="198.18.0.1/24"), "bad dst_ip"),
    (dict(protocol=protocols.ETH_P_IP, dst_port=80), "needs ip_proto tcp"),
    (dict(protocol=protocols.ETH_P_IP, ip_proto="tcp", dst_port=0), "port 1..65535"),
    (dict(protocol=protocols.ETH_P_IP, ip_proto="sctp"), "ip_proto must be"),
    (dict(protocol=protocols.ETH_P_IP, skip_sw=True, skip_hw=True), "nowhere"),
])
def test_bad_keys_raise_tc_error(kwarg: dict[str, object], message: str) -> None:
    with pytest.raises(TcError, match=message):
        flower.get_parameters(kwarg)


def test_offload_state_refuses_other_kinds() -> None:
    msg = decode(encode("add-filter", "flower", **request_args("flower_v4_block")))
    msg["attrs"] = [a for a in msg["attrs"] if a[0] != "TCA_KIND"] + [["TCA_KIND", "u32"]]
    with pytest.raises(TcError, match="not a flower filter"):
        flower.offload_state(msg)


HEADERS = sorted(glob.glob("/usr/src/linux-headers-*-common/include/uapi/linux/pkt_cls.h"))


@pytest.mark.skipif(not HEADERS, reason="no kernel headers (linux-headers-*-common)")
def test_attribute_numbers_match_pkt_cls_h() -> None:
    text = Path(HEADERS[-1]).read_text()
    body = text[text.index("TCA_FLOWER_UNSPEC"):text.index("__TCA_FLOWER_MAX")]
    names = re.findall(r"^\s*(TCA_FLOWER_\w+)", body, re.M)
    numbers = {name: i for i, name in enumerate(names)}
    for number, name, _kind in flower.options.nla_map:
        assert numbers[name] == number, name
