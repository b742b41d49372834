"""The nginx module's C protobuf codec (integrations/nginx/xo_local_codec.c) against the
generated Python classes of proto/xo/v1/local.proto: both directions, byte-exact, and its
refusals of malformed input. The codec is compiled alone into a shared object and called with
ctypes, so this runs without nginx or root."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from xo.v1 import local_pb2, offload_pb2

SRC = Path(__file__).resolve().parents[2] / "integrations" / "nginx" / "xo_local_codec.c"
TRUNCATED, BAD_WIRE_TYPE, UNKNOWN_TYPE, NO_SPACE = 1, 2, 3, 4
MAX_U64 = 2**64 - 1


class Bytes(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class EndpointC(ctypes.Structure):
    _fields_ = [("addr", Bytes), ("port", ctypes.c_uint32)]


class OptU64(ctypes.Structure):
    _fields_ = [("set", ctypes.c_int), ("value", ctypes.c_uint64)]


BYTE_FIELDS = ("app", "target", "preread", "app_state", "handoff_id", "detail", "agent")


class Msg(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("request_id", ctypes.c_uint64),
        ("reason", ctypes.c_uint32),
        ("flag", ctypes.c_int),
        ("ktls", ctypes.c_int),
        ("has_flow", ctypes.c_int),
        *[(name, Bytes) for name in BYTE_FIELDS],
        ("client", EndpointC),
        ("vip", EndpointC),
        ("expected_bytes", OptU64),
    ]


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build the codec")
    lib = tmp_path_factory.mktemp("codec") / "xo_local_codec.so"
    subprocess.run(
        [cc, "-Wall", "-Wextra", "-Werror", "-O2", "-fPIC", "-shared", "-o", str(lib), str(SRC)],
        check=True,
    )
    dll = ctypes.CDLL(str(lib))
    dll.xo_local_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(Msg)]
    dll.xo_local_encode.argtypes = [ctypes.POINTER(Msg), ctypes.c_char_p, ctypes.c_size_t]
    dll.xo_local_encode.restype = ctypes.c_long
    dll.xo_local_encoded_size.argtypes = [ctypes.POINTER(Msg)]
    dll.xo_local_encoded_size.restype = ctypes.c_size_t
    dll.xo_local_strerror.restype = ctypes.c_char_p
    return dll


def flow() -> offload_pb2.Flow:
    return offload_pb2.Flow(
        client=offload_pb2.Endpoint(addr=bytes([198, 18, 0, 10]), port=54321),
        vip=offload_pb2.Endpoint(addr=bytes(range(16)), port=443),
    )


# One fully populated example of every LocalMessage body, with edge values (max uint64, a
# multi-byte length, binary bytes including NUL).
EXAMPLES = {
    "hello": local_pb2.Hello(app="nginx", accept_connections=True),
    "hello_reply": local_pb2.HelloReply(ok=True, detail="fine", agent="f0", ktls=True),
    "offload": local_pb2.OffloadRequest(
        request_id=MAX_U64,
        target="198.18.0.3:8080",
        preread=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(300),
        app_state=b"\x00\xff",
        app="nginx",
        expected_bytes=MAX_U64,
    ),
    "offload_result": local_pb2.OffloadResult(
        request_id=7, accepted=True, handoff_id="f0-1", reason=offload_pb2.REFUSED, detail="d"
    ),
    "handed_in": local_pb2.HandedIn(
        handoff_id="f0-2", flow=flow(), preread=b"GET /a HTTP/1.1\r\n\r\n", app_state=b"s"
    ),
    "give_back": local_pb2.GiveBack(handoff_id="f0-3", preread=b"GE", app_state=b"\x01"),
    "give_back_result": local_pb2.GiveBackResult(handoff_id="f0-3", ok=True, detail="x"),
    "returned": local_pb2.Returned(
        handoff_id="f0-4",
        flow=flow(),
        reason=offload_pb2.CLIENT_RESET,
        preread=b"next",
        app_state=b"st",
    ),
}
TYPE_NUMBER = {name: i + 1 for i, name in enumerate(EXAMPLES)}
FLAG_FIELD = {
    "hello": "accept_connections",
    "hello_reply": "ok",
    "offload_result": "accepted",
    "give_back_result": "ok",
}


def c_bytes(b: Bytes) -> bytes:
    return ctypes.string_at(b.data, b.len) if b.len else b""


def to_c(name: str, body: object, keep: list[bytes]) -> Msg:
    """Fill the C struct from a Python message (keep holds the buffers alive)."""
    msg = Msg(type=TYPE_NUMBER[name])
    for field, value in body.ListFields():  # type: ignore[attr-defined]
        if field.name in BYTE_FIELDS:
            raw = value.encode() if isinstance(value, str) else value
            keep.append(raw)
            setattr(
                msg, field.name, Bytes(ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p), len(raw))
            )
        elif field.name == FLAG_FIELD.get(name):
            msg.flag = int(value)
        elif field.name == "flow":
            msg.has_flow = 1
            for side in ("client", "vip"):
                ep = getattr(value, side)
                keep.append(ep.addr)
                addr = Bytes(ctypes.cast(ctypes.c_char_p(ep.addr), ctypes.c_void_p), len(ep.addr))
                setattr(msg, side, EndpointC(addr, ep.port))
        elif field.name == "expected_bytes":
            msg.expected_bytes = OptU64(1, value)
        else:
            setattr(msg, field.name, value)
    return msg


def from_c(msg: Msg) -> local_pb2.LocalMessage:
    """Build the Python message the C struct describes."""
    name = next(n for n, t in TYPE_NUMBER.items() if t == msg.type)
    body = getattr(local_pb2.LocalMessage(), name)
    for field in body.DESCRIPTOR.fields:
        if field.name in BYTE_FIELDS:
            raw = c_bytes(getattr(msg, field.name))
            setattr(body, field.name, raw.decode() if field.type == field.TYPE_STRING else raw)
        elif field.name == FLAG_FIELD.get(name):
            setattr(body, field.name, bool(msg.flag))
        elif field.name == "flow":
            if msg.has_flow:
                for side in ("client", "vip"):
                    ep = getattr(msg, side)
                    getattr(body.flow, side).addr = c_bytes(ep.addr)
                    getattr(body.flow, side).port = ep.port
        elif field.name == "ktls":
            body.ktls = bool(msg.ktls)
        elif field.name == "expected_bytes":
            if msg.expected_bytes.set:
                body.expected_bytes = msg.expected_bytes.value
        else:
            setattr(body, field.name, getattr(msg, field.name))
    out = local_pb2.LocalMessage()
    getattr(out, name).CopyFrom(body)
    return out


def wrap(name: str) -> local_pb2.LocalMessage:
    out = local_pb2.LocalMessage()
    getattr(out, name).CopyFrom(EXAMPLES[name])
    return out


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_c_decodes_what_python_encodes(codec: ctypes.CDLL, name: str) -> None:
    wire = wrap(name).SerializeToString()
    msg = Msg()
    assert codec.xo_local_decode(wire, len(wire), ctypes.byref(msg)) == 0
    assert from_c(msg) == wrap(name)


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_c_encodes_byte_exact_python(codec: ctypes.CDLL, name: str) -> None:
    keep: list[bytes] = []
    msg = to_c(name, EXAMPLES[name], keep)
    expected = wrap(name).SerializeToString(deterministic=True)
    size = codec.xo_local_encoded_size(ctypes.byref(msg))
    assert size == len(expected)
    out = ctypes.create_string_buffer(size)
    assert codec.xo_local_encode(ctypes.byref(msg), out, size) == size
    assert out.raw == expected
    assert local_pb2.LocalMessage.FromString(out.raw) == wrap(name)


@pytest.mark.parametrize("size", [None, 0, 2 << 20])
def test_expected_bytes_keeps_unknown_apart_from_zero(codec: ctypes.CDLL,
                                                      size: int | None) -> None:
    """Absent (unknown) and a sent 0 (a known empty transfer) survive both directions."""
    py = local_pb2.LocalMessage(offload=local_pb2.OffloadRequest(
        request_id=1, target="b0", expected_bytes=size))
    wire = py.SerializeToString()
    msg = Msg()
    assert codec.xo_local_decode(wire, len(wire), ctypes.byref(msg)) == 0
    assert (msg.expected_bytes.set, msg.expected_bytes.value) == (size is not None, size or 0)
    out = ctypes.create_string_buffer(len(wire))
    assert codec.xo_local_encode(ctypes.byref(msg), out, len(wire)) == len(wire)
    assert out.raw == wire
    assert local_pb2.LocalMessage.FromString(out.raw).offload.HasField(
        "expected_bytes") is (size is not None)


def test_encode_refuses_small_buffer(codec: ctypes.CDLL) -> None:
    keep: list[bytes] = []
    msg = to_c("offload", EXAMPLES["offload"], keep)
    size = codec.xo_local_encoded_size(ctypes.byref(msg))
    out = ctypes.create_string_buffer(size)
    assert codec.xo_local_encode(ctypes.byref(msg), out, size - 1) == -NO_SPACE
    assert codec.xo_local_strerror(-NO_SPACE) == b"output buffer too small"


def test_every_truncation_is_refused(codec: ctypes.CDLL) -> None:
    wire = wrap("handed_in").SerializeToString()
    msg = Msg()
    for cut in range(1, len(wire)):
        assert codec.xo_local_decode(wire[:cut], cut, ctypes.byref(msg)) == -TRUNCATED, cut
    assert codec.xo_local_decode(b"", 0, ctypes.byref(msg)) == -UNKNOWN_TYPE


def test_unknown_fields_are_skipped(codec: ctypes.CDLL) -> None:
    body = EXAMPLES["offload_result"].SerializeToString()
    # field 15 varint, field 14 length-delimited, field 13 fixed64, field 12 fixed32: a newer
    # agent may add fields; this codec must ignore them.
    extra = b"\x78\x96\x01" + b"\x72\x03abc" + b"\x69" + bytes(8) + b"\x65" + bytes(4)
    body += extra
    wire = b"\x22" + bytes([len(body)]) + body + b"\xf8\x01\x05"  # + unknown oneof member 31
    msg = Msg()
    assert codec.xo_local_decode(wire, len(wire), ctypes.byref(msg)) == 0
    assert from_c(msg) == wrap("offload_result")


def test_wrong_wire_type_is_refused(codec: ctypes.CDLL) -> None:
    # OffloadResult.request_id (a varint) sent as a length-delimited field.
    body = b"\x0a\x01x"
    wire = b"\x22" + bytes([len(body)]) + body
    msg = Msg()
    assert codec.xo_local_decode(wire, len(wire), ctypes.byref(msg)) == -BAD_WIRE_TYPE
    assert b"wire type" in codec.xo_local_strerror(-BAD_WIRE_TYPE)
