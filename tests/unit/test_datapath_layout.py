"""xo.datapath.layout against bpf/xo_tc.h: constants, struct layout (compiled with the system C
compiler, no root), and the FlowKey <-> map key round trip."""

from __future__ import annotations

import ctypes
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xo.datapath.layout import (
    HEADER,
    Action,
    Counter,
    Direction,
    FlowActionStruct,
    FlowKeyStruct,
    FlowStatsStruct,
    Redirect,
    action_target,
    check_flow,
    make_action,
    make_key,
    parse_key,
    parse_mac,
)
from xo.flow import Endpoint, FlowError, FlowKey


def header_defines() -> dict[str, int]:
    text = HEADER.read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"#define (XO_\w+) (\d+)", text)}


@pytest.mark.parametrize(
    ("enum", "prefix"), [(Action, "XO_ACT_"), (Direction, "XO_DIR_"), (Counter, "XO_CNT_")]
)
def test_enums_match_header(enum: type, prefix: str) -> None:
    defines = {k[len(prefix) :]: v for k, v in header_defines().items() if k.startswith(prefix)}
    defines.pop("MAX", None)
    assert {m.name: m.value for m in enum} == defines  # type: ignore[attr-defined]
    if enum is Counter:
        assert header_defines()["XO_CNT_MAX"] == len(Counter)


FIELDS = {
    "xo_flow_key": (FlowKeyStruct, ["src", "dst", "sport", "dport", "family", "dir"]),
    "xo_flow_action": (
        FlowActionStruct,
        ["action", "ifindex", "addr", "port", "dst_mac", "src_mac"],
    ),
    "xo_flow_stats": (FlowStatsStruct, ["packets", "bytes"]),
}


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to read the header")
def test_struct_layout_matches_header(tmp_path: Path) -> None:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/types.h>",
        f'#include "{HEADER}"',
        "int main(void) {",
    ]
    for struct, (_, fields) in FIELDS.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof(struct {struct}));')
        lines += [f'printf("{struct}.{f} %zu\\n", offsetof(struct {struct}, {f}));' for f in fields]
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    subprocess.run(["cc", "-o", str(tmp_path / "layout"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True, check=True)
    measured = dict(line.split() for line in out.stdout.splitlines())
    for struct, (mirror, fields) in FIELDS.items():
        assert int(measured[struct]) == ctypes.sizeof(mirror), struct
        for f in fields:
            assert int(measured[f"{struct}.{f}"]) == getattr(mirror, f).offset, f"{struct}.{f}"


ipv4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(1, 65535)


@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    ports,
    ports,
    st.sampled_from(list(Direction)),
)
def test_key_round_trip(addrs: tuple, cport: int, vport: int, direction: Direction) -> None:
    flow = FlowKey(Endpoint(addrs[0], cport), Endpoint(addrs[1], vport))
    key = make_key(flow, direction)
    assert parse_key(FlowKeyStruct.from_buffer_copy(bytes(key))) == (flow, direction)


def test_key_bytes_are_wire_order() -> None:
    flow = FlowKey(Endpoint.parse("198.18.0.100:4660"), Endpoint.parse("198.18.0.1:80"))
    ingress, egress = (
        bytes(make_key(flow, Direction.INGRESS)),
        bytes(make_key(flow, Direction.EGRESS)),
    )
    assert ingress[:4] == bytes([198, 18, 0, 100]) and ingress[16:20] == bytes([198, 18, 0, 1])
    assert ingress[32:36] == bytes([0x12, 0x34, 0, 80]) and ingress[36:38] == bytes([4, 0])
    assert egress[:4] == bytes([198, 18, 0, 1]) and egress[32:36] == bytes([0, 80, 0x12, 0x34])
    assert egress[37] == Direction.EGRESS


def test_action_values() -> None:
    to = Endpoint.parse("[fd00:78:6f::32]:47000")
    value = make_action(
        Action.REDIRECT, to, ifindex=2, dst_mac="02:78:6f:00:00:32", src_mac="02:78:6f:00:00:0a"
    )
    assert action_target(value, 6) == to
    assert bytes(value.dst_mac) == bytes.fromhex("02786f000032")
    assert action_target(make_action(Action.BLOCK), 4) is None


@pytest.mark.parametrize("mac", ["", "02:78:6f:00:00", "02-78-6f-00-00-0a", "zz:78:6f:00:00:0a"])
def test_bad_mac(mac: str) -> None:
    with pytest.raises(FlowError, match="not a MAC address"):
        parse_mac(mac)


def test_bad_flow_and_redirect() -> None:
    with pytest.raises(FlowError, match="expected xo.flow.FlowKey"):
        check_flow("198.18.0.1:80")
    with pytest.raises(FlowError, match="Redirect.to must be"):
        Redirect("198.18.0.50:47000", mac="02:78:6f:00:00:32")  # type: ignore[arg-type]
    with pytest.raises(FlowError, match="bad ifindex"):
        Redirect(Endpoint.parse("198.18.0.50:1"), mac="02:78:6f:00:00:32", ifindex=0)
