"""xo.flow: parsing, validation and the proto round trip of endpoints and flow keys."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xo.flow import Endpoint, FlowError, FlowKey
from xo.v1 import offload_pb2


def test_parse_ipv4_and_ipv6() -> None:
    assert Endpoint.parse("198.18.0.1:80") == Endpoint(ipaddress.ip_address("198.18.0.1"), 80)
    e6 = Endpoint.parse("[fd00:78:6f::1]:443")
    assert e6.ip == ipaddress.ip_address("fd00:78:6f::1") and e6.port == 443
    assert str(e6) == "[fd00:78:6f::1]:443"


@pytest.mark.parametrize("text", ["", "1.2.3.4", "1.2.3.4:", "1.2.3.4:x", "nohost:80", "[::1:80"])
def test_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(FlowError):
        Endpoint.parse(text)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_range(port: int) -> None:
    with pytest.raises(FlowError, match="port out of range"):
        Endpoint(ipaddress.ip_address("127.0.0.1"), port)


def test_mixed_families_refused() -> None:
    with pytest.raises(FlowError, match="mixed address families"):
        FlowKey(Endpoint.parse("1.2.3.4:1"), Endpoint.parse("[::1]:2"))


def test_bad_proto_address_length() -> None:
    with pytest.raises(FlowError, match="4 or 16 bytes"):
        Endpoint.from_proto(offload_pb2.Endpoint(addr=b"\x01\x02\x03", port=80))


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


@given(ips, st.integers(1, 65535), st.integers(1, 65535))
def test_flow_proto_round_trip(ip, cport: int, vport: int) -> None:
    other = ipaddress.ip_address("198.18.0.100" if ip.version == 4 else "fd00::64")
    key = FlowKey(Endpoint(ip, cport), Endpoint(other, vport))
    wire = key.to_proto().SerializeToString()
    assert FlowKey.from_proto(offload_pb2.Flow.FromString(wire)) == key
