"""Local API framing over real unix socketpairs: fds ride with the right frame; bad input fails
with FrameError; the decoder survives arbitrary bytes (hypothesis)."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xo.agent import framing
from xo.v1 import local_pb2


def msg(i: int, preread: bytes = b"") -> local_pb2.LocalMessage:
    return local_pb2.LocalMessage(
        offload=local_pb2.OffloadRequest(request_id=i, target="b0", preread=preread)
    )


def read_all(sock: socket.socket, want: int) -> list[framing.Frame]:
    dec = framing.Decoder()
    out: list[framing.Frame] = []
    while len(out) < want:
        frames = framing.recv_into(sock, dec)
        assert frames is not None
        out += frames
    return out


def test_fds_pair_with_their_frames() -> None:
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(3)]
    try:
        # frames 0, 2, 4 carry the read end of pipe 0, 1, 2; 1 and 3 carry none. Frames are
        # larger than the socket buffer, so the sender runs in a thread while we read.
        def sender() -> None:
            for i in range(5):
                fd = pipes[i // 2][0] if i % 2 == 0 else None
                framing.send(a, msg(i, b"x" * (i * 50000)), fd)

        t = threading.Thread(target=sender)
        t.start()
        frames = read_all(b, 5)
        t.join()
        for i, f in enumerate(frames):
            assert f.msg.offload.request_id == i
            assert len(f.msg.offload.preread) == i * 50000
            if i % 2:
                assert f.fd is None
                continue
            # the received fd is the same pipe: what we write comes out of it
            os.write(pipes[i // 2][1], bytes([i]))
            assert f.fd is not None and os.read(f.fd, 1) == bytes([i])
            f.close()
    finally:
        a.close()
        b.close()
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_oversized_length_is_refused() -> None:
    dec = framing.Decoder()
    with pytest.raises(framing.FrameError, match="exceeds"):
        dec.feed(framing.HEADER.pack(framing.MAX_FRAME + 1), [])


def test_garbage_body_is_refused() -> None:
    dec = framing.Decoder()
    with pytest.raises(framing.FrameError, match="undecodable"):
        dec.feed(framing.HEADER.pack(3) + b"\xff\xff\xff", [])


def test_two_fds_on_one_frame_are_refused_and_closed() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    dec = framing.Decoder()
    with pytest.raises(framing.FrameError, match="exactly one"):
        dec.feed(framing.encode(msg(1)), [r1, r2])
    for fd in (r1, r2):  # the decoder closed them
        with pytest.raises(OSError):
            os.fstat(fd)
    os.close(w1)
    os.close(w2)


def test_eof_returns_none() -> None:
    a, b = socket.socketpair()
    a.close()
    assert framing.recv_into(b, framing.Decoder()) is None
    b.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_decoder_never_crashes_on_arbitrary_bytes(chunks: list[bytes]) -> None:
    dec = framing.Decoder()
    try:
        for c in chunks:
            for f in dec.feed(c, []):
                assert f.msg.WhichOneof("body") is None or f.msg.IsInitialized()
    except framing.FrameError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2**63), min_size=1, max_size=6),
       st.integers(min_value=1, max_value=7))
def test_any_split_of_a_stream_yields_the_same_frames(ids: list[int], step: int) -> None:
    data = b"".join(framing.encode(msg(i)) for i in ids)
    dec = framing.Decoder()
    got = []
    for pos in range(0, len(data), step):
        got += [f.msg.offload.request_id for f in dec.feed(data[pos : pos + step], [])]
    assert got == ids
