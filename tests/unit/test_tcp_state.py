"""xo.tcp.TcpState: wire round trip, every malformed-input case, and property tests."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xo import uapi
from xo.flow import Endpoint
from xo.tcp import (
    QueueTooLargeError,
    StateFormatError,
    StateVersionError,
    TcpState,
    TcpWindow,
)
from xo.tcp.restore import buffer_needed
from xo.tcp.state import TCP_STATE_VERSION, U32_MAX
from xo.v1 import offload_pb2

V4_LOCAL = Endpoint(ipaddress.ip_address("198.18.0.50"), 8080)
V4_REMOTE = Endpoint(ipaddress.ip_address("198.18.0.100"), 40000)
V6_LOCAL = Endpoint(ipaddress.ip_address("fd00:78:6f::32"), 8080)
V6_REMOTE = Endpoint(ipaddress.ip_address("fd00:78:6f::64"), 40000)


def make_state(**changes: object) -> TcpState:
    base = TcpState(
        local=V4_LOCAL,
        remote=V4_REMOTE,
        send_seq=0xFFFFFFF0,  # near the wrap: sequence arithmetic must be modular
        recv_seq=12345,
        recv_queue=b"request bytes",
        send_unacked=b"in flight",
        send_unsent=b"never sent",
        mss_clamp=1460,
        snd_wscale=7,
        rcv_wscale=9,
        sack_ok=True,
        timestamps_ok=True,
        timestamp=0xDEADBEEF,
        window=TcpWindow(1, 2, 3, 4, 5),
        sndbuf=16384,
        rcvbuf=131072,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "state",
    [
        make_state(),
        make_state(local=V6_LOCAL, remote=V6_REMOTE),
        make_state(recv_queue=b"", send_unacked=b"", send_unsent=b""),
        make_state(sack_ok=False, timestamps_ok=False, snd_wscale=0, rcv_wscale=0, timestamp=0),
    ],
    ids=["v4", "v6", "empty-queues", "no-options"],
)
def test_round_trip(state: TcpState) -> None:
    wire = state.to_bytes()
    assert TcpState.from_bytes(wire) == state
    msg = offload_pb2.TcpState.FromString(wire)
    assert msg.version == TCP_STATE_VERSION
    assert msg.send_unacked == state.send_unacked and msg.send_unsent == state.send_unsent


def test_from_bytes_accepts_bytearray_and_memoryview() -> None:
    wire = make_state().to_bytes()
    assert TcpState.from_bytes(bytearray(wire)) == TcpState.from_bytes(memoryview(wire))


def test_every_truncation_is_refused() -> None:
    wire = make_state().to_bytes()
    for cut in range(len(wire)):
        with pytest.raises(StateFormatError):
            TcpState.from_bytes(wire[:cut])


def test_not_bytes_is_refused() -> None:
    with pytest.raises(StateFormatError, match="must be bytes"):
        TcpState.from_bytes("text")  # type: ignore[arg-type]


def test_garbage_is_refused() -> None:
    with pytest.raises(StateFormatError, match="do not parse"):
        TcpState.from_bytes(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")


@pytest.mark.parametrize("version", [0, TCP_STATE_VERSION + 1, 999])
def test_wrong_version_is_refused(version: int) -> None:
    msg = make_state().to_proto()
    msg.version = version
    with pytest.raises(StateVersionError, match=f"version {version} not supported"):
        TcpState.from_bytes(msg.SerializeToString())


def _mutated(edit: object) -> bytes:
    msg = make_state().to_proto()
    edit(msg)  # type: ignore[operator]
    return msg.SerializeToString()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.ClearField("local"), "without local"),
        (lambda m: m.ClearField("remote"), "without remote"),
        (lambda m: m.ClearField("window"), "without window"),
        (lambda m: setattr(m.local, "addr", b"\x01\x02\x03"), "bad address"),
        (lambda m: setattr(m.remote, "port", 0), "bad address"),
        (lambda m: setattr(m.remote, "port", 70000), "bad address"),
        (lambda m: setattr(m.remote, "addr", bytes(16)), "mixed address families"),
        (lambda m: setattr(m, "mss_clamp", 0), "mss_clamp"),
        (lambda m: setattr(m, "mss_clamp", 70000), "mss_clamp"),
        (lambda m: setattr(m, "snd_wscale", uapi.TCP_MAX_WSCALE + 1), "snd_wscale"),
        (lambda m: setattr(m, "rcv_wscale", 200), "rcv_wscale"),
        (lambda m: setattr(m, "sndbuf", 0), "non-zero"),
        (lambda m: setattr(m, "rcvbuf", 0), "non-zero"),
    ],
    ids=[
        "no-local",
        "no-remote",
        "no-window",
        "short-addr",
        "port-0",
        "port-big",
        "mixed-family",
        "mss-0",
        "mss-big",
        "snd-wscale",
        "rcv-wscale",
        "no-sndbuf",
        "no-rcvbuf",
    ],
)
def test_corrupted_fields_are_refused(edit: object, match: str) -> None:
    with pytest.raises(StateFormatError, match=match):
        TcpState.from_bytes(_mutated(edit))


def test_recv_queue_larger_than_rcvbuf() -> None:
    wire = _mutated(lambda m: setattr(m, "rcvbuf", 4))
    with pytest.raises(QueueTooLargeError, match="receive queue of 13 bytes exceeds rcvbuf 4"):
        TcpState.from_bytes(wire)


def test_send_queue_larger_than_sndbuf() -> None:
    with pytest.raises(QueueTooLargeError, match="send queue of 19 bytes exceeds sndbuf 18"):
        make_state(sndbuf=18)


@pytest.mark.parametrize("field", ["send_seq", "recv_seq", "timestamp", "sndbuf"])
def test_u32_range(field: str) -> None:
    with pytest.raises(StateFormatError, match="32 bits"):
        make_state(**{field: U32_MAX + 1})
    with pytest.raises(StateFormatError, match="32 bits"):
        make_state(**{field: -1})


def test_window_u32_range() -> None:
    with pytest.raises(StateFormatError, match="window.rcv_wnd"):
        TcpWindow(0, 0, 0, U32_MAX + 1, 0)


def test_window_struct_round_trip() -> None:
    w = TcpWindow(1, 2, 3, 4, U32_MAX)
    assert len(w.pack()) == uapi.TCP_REPAIR_WINDOW_STRUCT.size
    assert TcpWindow.unpack(w.pack()) == w


def test_buffer_needed_grows_with_queue_and_keeps_recorded() -> None:
    assert buffer_needed(0, 200000) == 200000
    small = buffer_needed(0, 1)
    big = buffer_needed(1 << 20, 1)
    assert big > (1 << 20) > small


def test_buffer_needed_refuses_more_than_the_kernel_allows() -> None:
    with pytest.raises(QueueTooLargeError, match="the kernel allows at most"):
        buffer_needed(uapi.SOCK_BUF_MAX, 1)


# --- property tests -------------------------------------------------------------------------
u32 = st.integers(0, U32_MAX)
ports = st.integers(1, 65535)
v4 = st.builds(ipaddress.IPv4Address, u32)
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))


@st.composite
def states(draw: st.DrawFn) -> TcpState:
    ip = draw(st.sampled_from([v4, v6]))
    recv = draw(st.binary(max_size=256))
    unacked = draw(st.binary(max_size=256))
    unsent = draw(st.binary(max_size=256))
    return TcpState(
        local=Endpoint(draw(ip), draw(ports)),
        remote=Endpoint(draw(ip), draw(ports)),
        send_seq=draw(u32),
        recv_seq=draw(u32),
        recv_queue=recv,
        send_unacked=unacked,
        send_unsent=unsent,
        mss_clamp=draw(st.integers(uapi.TCP_MIN_MSS, 65535)),
        snd_wscale=draw(st.integers(0, uapi.TCP_MAX_WSCALE)),
        rcv_wscale=draw(st.integers(0, uapi.TCP_MAX_WSCALE)),
        sack_ok=draw(st.booleans()),
        timestamps_ok=draw(st.booleans()),
        timestamp=draw(u32),
        window=TcpWindow(draw(u32), draw(u32), draw(u32), draw(u32), draw(u32)),
        sndbuf=draw(st.integers(max(1, len(unacked) + len(unsent)), U32_MAX)),
        rcvbuf=draw(st.integers(max(1, len(recv)), U32_MAX)),
    )


@given(states())
def test_property_round_trip(state: TcpState) -> None:
    assert TcpState.from_bytes(state.to_bytes()) == state


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_property_arbitrary_bytes_parse_or_raise_format_error(data: bytes) -> None:
    try:
        state = TcpState.from_bytes(data)
    except StateFormatError:
        return
    # Whatever parses is a fully valid state that survives its own round trip.
    assert TcpState.from_bytes(state.to_bytes()) == state


@settings(max_examples=300)
@given(states(), st.data())
def test_property_corrupted_byte_is_refused_or_still_valid(
    state: TcpState, data: st.DataObject
) -> None:
    """A flipped byte either fails with StateFormatError or decodes to a valid state (a
    changed sequence number is undetectable here: integrity in transit is mTLS's job)."""
    wire = bytearray(state.to_bytes())
    i = data.draw(st.integers(0, len(wire) - 1))
    wire[i] ^= data.draw(st.integers(1, 255))
    try:
        decoded = TcpState.from_bytes(bytes(wire))
    except StateFormatError:
        return
    assert TcpState.from_bytes(decoded.to_bytes()) == decoded
