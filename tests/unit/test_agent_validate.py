"""Message validation: good messages pass, each malformed field gets a ProtocolError with a
reason, arbitrary bytes never crash the decoders (hypothesis), and `describe` never prints
state bytes or keys."""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from xo.agent import validate
from xo.agent.validate import ProtocolError
from xo.flow import Endpoint, FlowKey
from xo.v1 import offload_pb2

CLIENT = Endpoint(ipaddress.ip_address("198.18.0.100"), 40001)
VIP = Endpoint(ipaddress.ip_address("198.18.0.1"), 80)
TARGET = Endpoint(ipaddress.ip_address("198.18.0.50"), 40000)
SECRET = b"\x13\x37" * 16


def handoff() -> offload_pb2.HandoffRequest:
    return offload_pb2.HandoffRequest(
        handoff_id="f0-abc-1", flow=FlowKey(CLIENT, VIP).to_proto(),
        tcp=offload_pb2.TcpState(version=1, local=VIP.to_proto(), remote=CLIENT.to_proto(),
                                 recv_queue=SECRET),
        tls=offload_pb2.TlsState(tx=offload_pb2.TlsDirection(key=SECRET)),
        preread=b"GET / HTTP/1.1\r\n\r\n", app="http", target=TARGET.to_proto())


def test_good_handoff_passes() -> None:
    assert validate.handoff(handoff()) == ("f0-abc-1", FlowKey(CLIENT, VIP), TARGET)


@pytest.mark.parametrize(
    ("mutate", "detail"),
    [
        (lambda r: r.ClearField("flow"), "flow is missing"),
        (lambda r: r.ClearField("tcp"), "tcp state is missing"),
        (lambda r: r.ClearField("target"), "target is missing"),
        (lambda r: setattr(r, "handoff_id", ""), "handoff_id"),
        (lambda r: setattr(r, "handoff_id", "x" * 65), "handoff_id"),
        (lambda r: setattr(r, "handoff_id", "a\nb"), "handoff_id"),
        (lambda r: setattr(r.flow.client, "addr", b"\1\2\3"), "bad flow"),
        (lambda r: setattr(r.flow.vip, "port", 0), "bad flow"),
        (lambda r: setattr(r.tcp, "version", 9), "version 9"),
        (lambda r: setattr(r.tcp.remote, "port", 1), "is not the flow's client"),
        (lambda r: setattr(r.target, "addr", bytes(16)), "different address families"),
        (lambda r: setattr(r, "preread", bytes(validate.MAX_BLOB + 1)), "preread"),
        (lambda r: setattr(r, "app", "a" * 65), "app name"),
    ],
)
def test_malformed_handoff_is_refused(mutate, detail: str) -> None:  # type: ignore[no-untyped-def]
    req = handoff()
    mutate(req)
    with pytest.raises(ProtocolError, match=detail) as e:
        validate.handoff(req)
    assert e.value.reason == offload_pb2.REFUSED


def test_end_needs_state_when_done_and_a_known_reason() -> None:
    flow = FlowKey(CLIENT, VIP).to_proto()
    with pytest.raises(ProtocolError, match="must carry the tcp state"):
        validate.end(offload_pb2.EndRequest(handoff_id="h", flow=flow, reason=offload_pb2.DONE))
    with pytest.raises(ProtocolError, match="reason 0 unknown"):
        validate.end(offload_pb2.EndRequest(handoff_id="h", flow=flow))
    ok = offload_pb2.EndRequest(handoff_id="h", flow=flow, reason=offload_pb2.CLIENT_CLOSED)
    assert validate.end(ok) == ("h", FlowKey(CLIENT, VIP))


def test_describe_redacts_state_and_keys() -> None:
    text = validate.describe(handoff())
    assert "198.18.0.100:40001 -> 198.18.0.1:80" in text
    assert "tls=<" in text and "tcp=<" in text and "preread=<18 bytes>" in text
    assert SECRET.hex() not in text and repr(SECRET)[2:20] not in text and "GET" not in text


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_never_crash_on_arbitrary_bytes(data: bytes) -> None:
    """Whatever bytes arrive, the result is a parsed message, a DecodeError, or a
    ProtocolError: never another exception (the servicer maps those to INTERNAL)."""
    for cls, check in ((offload_pb2.HandoffRequest, validate.handoff),
                       (offload_pb2.EndRequest, validate.end)):
        try:
            msg = cls.FromString(data)
        except DecodeError:
            continue
        try:
            check(msg)  # type: ignore[operator]
        except ProtocolError as e:
            assert e.reason in offload_pb2.Reason.values()
        validate.describe(msg)


@settings(max_examples=300, deadline=None)
@given(st.builds(offload_pb2.Endpoint, addr=st.binary(max_size=20),
                 port=st.integers(min_value=0, max_value=2**32 - 1)))
def test_endpoint_validation_is_total(ep: offload_pb2.Endpoint) -> None:
    try:
        got = validate.endpoint(ep, "x")
    except ProtocolError:
        return
    assert len(ep.addr) in (4, 16) and 0 < ep.port < 65536 and got.port == ep.port
