"""Framing of the local app API (proto/xo/v1/local.proto) over a unix stream socket.

A frame is a 4-byte big-endian length and a serialized LocalMessage; a frame that carries a
socket sends exactly one fd with SCM_RIGHTS in the same sendmsg(). On a unix stream socket the
kernel stops a read right after the segment that carried fds, and each frame is one sendmsg,
so fds received in one read belong to the last frame that starts within that read's bytes.
The decoder below applies exactly that rule; it is shared by the agent (asyncio) and the app
side (blocking sockets).
"""

from __future__ import annotations

import array
import os
import socket
import struct
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from xo.v1 import local_pb2

HEADER = struct.Struct("!I")
# Preread bytes and app state ride in frames; a request is rarely above a few KiB. The cap
# bounds what a misbehaving peer on the socket can make us buffer.
MAX_FRAME = 4 * 1024 * 1024
# Fds one read may carry; a frame carries at most one, a read may span a few frames.
MAX_FDS_PER_READ = 16
READ_SIZE = 256 * 1024


class FrameError(ValueError):
    """A frame that breaks the framing rules (too long, undecodable, more than one fd)."""


@dataclass(slots=True)
class Frame:
    msg: local_pb2.LocalMessage
    fd: int | None = None

    def take_fd(self) -> int | None:
        """Hand the fd over to the caller, who then owns (and must close) it."""
        fd, self.fd = self.fd, None
        return fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def encode(msg: local_pb2.LocalMessage) -> bytes:
    body = msg.SerializeToString()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def send(sock: socket.socket, msg: local_pb2.LocalMessage, fd: int | None = None) -> None:
    """Send one frame (blocking socket), the fd riding on its first byte."""
    data = encode(msg)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])


@dataclass
class Decoder:
    """Turns reads (bytes + received fds) into frames, pairing each fd with its frame."""

    _buf: bytearray = field(default_factory=bytearray)
    _pending_fd: dict[int, int] = field(default_factory=dict)  # frame start offset -> fd
    _need: int = 0

    def feed(self, data: bytes, fds: list[int]) -> list[Frame]:
        start_of_read = len(self._buf)
        self._buf += data
        if fds:
            owner = self._last_frame_start(start_of_read)
            if owner is None or len(fds) > 1 or owner in self._pending_fd:
                for fd in fds:
                    os.close(fd)
                raise FrameError("file descriptors not attached to exactly one frame start")
            self._pending_fd[owner] = fds[0]
        return self._frames()

    def _last_frame_start(self, read_start: int) -> int | None:
        """Offset (in the buffer) of the last frame header starting at or after read_start."""
        pos, last = 0, None
        while pos + HEADER.size <= len(self._buf):
            if pos >= read_start:
                last = pos
            (n,) = HEADER.unpack_from(self._buf, pos)
            pos += HEADER.size + n
        if last is None and pos >= read_start and pos < len(self._buf):
            last = pos  # a header split across reads starts in this one
        return last

    def _frames(self) -> list[Frame]:
        out: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self._buf, 0)
            if n > MAX_FRAME:
                self.close()
                raise FrameError(f"frame length {n} exceeds {MAX_FRAME}")
            if len(self._buf) < HEADER.size + n:
                break
            body = bytes(self._buf[HEADER.size : HEADER.size + n])
            fd = self._pending_fd.pop(0, None)
            consumed = HEADER.size + n
            del self._buf[:consumed]
            self._pending_fd = {k - consumed: v for k, v in self._pending_fd.items()}
            msg = local_pb2.LocalMessage()
            try:
                msg.ParseFromString(body)
            except DecodeError as e:
                if fd is not None:
                    os.close(fd)
                raise FrameError(f"undecodable local message: {e}") from None
            out.append(Frame(msg, fd))
        return out

    def close(self) -> None:
        """Close fds of frames never completed (the connection went away)."""
        for fd in self._pending_fd.values():
            os.close(fd)
        self._pending_fd.clear()
        self._buf.clear()


def recv_into(sock: socket.socket, decoder: Decoder) -> list[Frame] | None:
    """One read from `sock`; None at EOF. Works for blocking and non-blocking sockets."""
    data, anc, _flags, _addr = sock.recvmsg(READ_SIZE, socket.CMSG_SPACE(4 * MAX_FDS_PER_READ))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return decoder.feed(data, fds)
