"""TcpState: everything needed to recreate an ESTABLISHED TCP socket elsewhere.

The wire form is the protobuf message xo.v1.TcpState, the same one the offload protocol
carries, so a state captured here can travel in a Handoff unchanged. Reading is strict: state
bytes come from another host, and a wrong sequence number or queue silently corrupts a live
stream, so every field is range-checked and unknown layout versions are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from google.protobuf.message import DecodeError

from xo import uapi
from xo.flow import Endpoint, FlowError
from xo.tcp.errors import QueueTooLargeError, StateFormatError, StateVersionError
from xo.v1 import offload_pb2

TCP_STATE_VERSION = 1
U32_MAX = 2**32 - 1
MSS_MAX = 2**16 - 1  # the MSS option is 16 bits on the wire


def _check_u32(name: str, value: int) -> None:
    if not 0 <= value <= U32_MAX:
        raise StateFormatError(f"{name} must fit in 32 bits, got {value}")


@dataclass(frozen=True, slots=True)
class TcpWindow:
    """struct tcp_repair_window: the windows the kernel would otherwise rebuild from zero."""

    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_u32(f"window.{f.name}", getattr(self, f.name))

    def pack(self) -> bytes:
        return uapi.TCP_REPAIR_WINDOW_STRUCT.pack(
            self.snd_wl1, self.snd_wnd, self.max_window, self.rcv_wnd, self.rcv_wup
        )

    @classmethod
    def unpack(cls, raw: bytes) -> TcpWindow:
        return cls(*uapi.TCP_REPAIR_WINDOW_STRUCT.unpack(raw))


@dataclass(frozen=True, slots=True)
class TcpState:
    """A captured connection. Sequence numbers are the kernel's TCP_QUEUE_SEQ values:
    send_seq is write_seq (after the last queued byte), recv_seq is rcv_nxt."""

    local: Endpoint
    remote: Endpoint
    send_seq: int
    recv_seq: int
    recv_queue: bytes
    send_unacked: bytes
    send_unsent: bytes
    mss_clamp: int
    snd_wscale: int
    rcv_wscale: int
    sack_ok: bool
    timestamps_ok: bool
    timestamp: int
    window: TcpWindow
    sndbuf: int
    rcvbuf: int

    def __post_init__(self) -> None:
        if self.local.family != self.remote.family:
            raise StateFormatError(f"mixed address families: {self.local} -> {self.remote}")
        for name in ("send_seq", "recv_seq", "timestamp", "sndbuf", "rcvbuf"):
            _check_u32(name, getattr(self, name))
        # A live socket always has buffers; zero means the field was lost (protobuf writes
        # fields in number order and rcvbuf is last, so this also catches truncated bytes).
        if self.sndbuf == 0 or self.rcvbuf == 0:
            raise StateFormatError("sndbuf and rcvbuf must be non-zero (truncated state?)")
        if not uapi.TCP_MIN_MSS <= self.mss_clamp <= MSS_MAX:
            raise StateFormatError(
                f"mss_clamp must be {uapi.TCP_MIN_MSS}..{MSS_MAX}, got {self.mss_clamp}"
            )
        for name in ("snd_wscale", "rcv_wscale"):
            if not 0 <= getattr(self, name) <= uapi.TCP_MAX_WSCALE:
                raise StateFormatError(
                    f"{name} must be 0..{uapi.TCP_MAX_WSCALE}, got {getattr(self, name)}"
                )
        if len(self.recv_queue) > self.rcvbuf:
            raise QueueTooLargeError(
                f"receive queue of {len(self.recv_queue)} bytes exceeds rcvbuf {self.rcvbuf}"
            )
        if self.send_queue_len > self.sndbuf:
            raise QueueTooLargeError(
                f"send queue of {self.send_queue_len} bytes exceeds sndbuf {self.sndbuf}"
            )

    @property
    def send_queue_len(self) -> int:
        return len(self.send_unacked) + len(self.send_unsent)

    def to_proto(self) -> offload_pb2.TcpState:
        w = self.window
        return offload_pb2.TcpState(
            version=TCP_STATE_VERSION,
            local=self.local.to_proto(),
            remote=self.remote.to_proto(),
            send_seq=self.send_seq,
            recv_seq=self.recv_seq,
            recv_queue=self.recv_queue,
            send_unacked=self.send_unacked,
            send_unsent=self.send_unsent,
            mss_clamp=self.mss_clamp,
            snd_wscale=self.snd_wscale,
            rcv_wscale=self.rcv_wscale,
            sack_ok=self.sack_ok,
            timestamps_ok=self.timestamps_ok,
            timestamp=self.timestamp,
            window=offload_pb2.TcpWindow(
                snd_wl1=w.snd_wl1,
                snd_wnd=w.snd_wnd,
                max_window=w.max_window,
                rcv_wnd=w.rcv_wnd,
                rcv_wup=w.rcv_wup,
            ),
            sndbuf=self.sndbuf,
            rcvbuf=self.rcvbuf,
        )

    @classmethod
    def from_proto(cls, msg: offload_pb2.TcpState) -> TcpState:
        """Validate and convert; raises StateVersionError / StateFormatError."""
        if msg.version != TCP_STATE_VERSION:
            raise StateVersionError(
                f"TcpState version {msg.version} not supported (this reader knows "
                f"{TCP_STATE_VERSION})"
            )
        for name in ("local", "remote", "window"):
            if not msg.HasField(name):
                raise StateFormatError(f"TcpState without {name}")
        try:
            local = Endpoint.from_proto(msg.local)
            remote = Endpoint.from_proto(msg.remote)
        except FlowError as e:
            raise StateFormatError(f"bad address in TcpState: {e}") from None
        w = msg.window
        return cls(
            local=local,
            remote=remote,
            send_seq=msg.send_seq,
            recv_seq=msg.recv_seq,
            recv_queue=msg.recv_queue,
            send_unacked=msg.send_unacked,
            send_unsent=msg.send_unsent,
            mss_clamp=msg.mss_clamp,
            snd_wscale=msg.snd_wscale,
            rcv_wscale=msg.rcv_wscale,
            sack_ok=msg.sack_ok,
            timestamps_ok=msg.timestamps_ok,
            timestamp=msg.timestamp,
            window=TcpWindow(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup),
            sndbuf=msg.sndbuf,
            rcvbuf=msg.rcvbuf,
        )

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> TcpState:
        """Parse state bytes; raises StateFormatError (or a subclass) on anything invalid."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise StateFormatError(f"state must be bytes, got {type(data).__name__}")
        msg = offload_pb2.TcpState()
        try:
            msg.ParseFromString(bytes(data))
        except DecodeError as e:
            raise StateFormatError(
                f"TcpState bytes do not parse ({len(data)} bytes): {e}"
            ) from None
        return cls.from_proto(msg)
