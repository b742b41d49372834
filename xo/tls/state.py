"""TlsState: the kernel TLS session of one connection, both directions, as kTLS holds it.

The fields are those of struct tls12_crypto_info_<cipher> (xo/uapi.py has the layouts): key,
iv, salt and the 64-bit record sequence number of the next record, for TX and RX. The wire
form is the protobuf message xo.v1.TlsState of the offload protocol. Key material lives in
bytearrays so that zero() can wipe it; repr() never shows it. Protobuf messages hold their
own immutable copies (Python cannot wipe those): keep them short-lived.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from xo import uapi
from xo.tls.errors import TlsStateError, TlsStateVersionError
from xo.v1 import offload_pb2

TLS_STATE_VERSION = 1
REC_SEQ_BYTES = 8
REC_SEQ_MAX = 2**64 - 1


class TlsVersion(enum.IntEnum):
    """Record-layer protocol versions kTLS implements (values as in struct tls_crypto_info)."""

    TLS_1_2 = uapi.TLS_1_2_VERSION
    TLS_1_3 = uapi.TLS_1_3_VERSION


class TlsCipher(enum.IntEnum):
    """kTLS cipher types (TLS_CIPHER_* of include/uapi/linux/tls.h)."""

    AES_GCM_128 = uapi.TLS_CIPHER_AES_GCM_128
    AES_GCM_256 = uapi.TLS_CIPHER_AES_GCM_256
    CHACHA20_POLY1305 = uapi.TLS_CIPHER_CHACHA20_POLY1305

    @property
    def layout(self) -> uapi.TlsCipherLayout:
        return uapi.TLS_CIPHERS[self.value]


_VERSION_TO_PROTO = {
    TlsVersion.TLS_1_2: offload_pb2.TLS_1_2,
    TlsVersion.TLS_1_3: offload_pb2.TLS_1_3,
}
_CIPHER_TO_PROTO = {
    TlsCipher.AES_GCM_128: offload_pb2.AES_GCM_128,
    TlsCipher.AES_GCM_256: offload_pb2.AES_GCM_256,
    TlsCipher.CHACHA20_POLY1305: offload_pb2.CHACHA20_POLY1305,
}
_VERSION_FROM_PROTO = {v: k for k, v in _VERSION_TO_PROTO.items()}
_CIPHER_FROM_PROTO = {v: k for k, v in _CIPHER_TO_PROTO.items()}


def _check_len(cipher: TlsCipher, field: str, value: bytes | bytearray, expected: int) -> None:
    if len(value) != expected:
        raise TlsStateError(
            f"{cipher.layout.name} {field} must be {expected} bytes, got {len(value)}"
        )


@dataclass(eq=False, slots=True)
class TlsDirection:
    """One direction (TX or RX): key, iv, salt, and rec_seq, the sequence number of the next
    record (an integer; the kernel holds it as 8 bytes big endian)."""

    key: bytearray
    iv: bytearray
    salt: bytearray
    rec_seq: int

    def __post_init__(self) -> None:
        self.key, self.iv, self.salt = bytearray(self.key), bytearray(self.iv), bytearray(self.salt)
        if not isinstance(self.rec_seq, int) or not 0 <= self.rec_seq <= REC_SEQ_MAX:
            raise TlsStateError(f"rec_seq must be a 64-bit unsigned integer, got {self.rec_seq!r}")

    def check(self, cipher: TlsCipher) -> None:
        """Raise TlsStateError unless the field sizes are those of `cipher`."""
        layout = cipher.layout
        _check_len(cipher, "key", self.key, layout.key)
        _check_len(cipher, "iv", self.iv, layout.iv)
        _check_len(cipher, "salt", self.salt, layout.salt)

    def zero(self) -> None:
        """Overwrite the key material in place (the bytearrays this object owns)."""
        for buf in (self.key, self.iv, self.salt):
            buf[:] = bytes(len(buf))

    def same_as(self, other: TlsDirection) -> bool:
        """Field-wise equality, for tests and diagnostics (not a constant-time comparison)."""
        return (self.key, self.iv, self.salt, self.rec_seq) == (
            other.key, other.iv, other.salt, other.rec_seq,
        )

    def __repr__(self) -> str:
        return f"TlsDirection(rec_seq={self.rec_seq}, key=<{len(self.key)} bytes hidden>)"

    def to_proto(self) -> offload_pb2.TlsDirection:
        return offload_pb2.TlsDirection(
            key=bytes(self.key),
            iv=bytes(self.iv),
            salt=bytes(self.salt),
            rec_seq=self.rec_seq.to_bytes(REC_SEQ_BYTES, "big"),
        )

    @classmethod
    def from_proto(cls, msg: offload_pb2.TlsDirection) -> TlsDirection:
        if len(msg.rec_seq) != REC_SEQ_BYTES:
            raise TlsStateError(f"rec_seq must be {REC_SEQ_BYTES} bytes, got {len(msg.rec_seq)}")
        return cls(
            bytearray(msg.key), bytearray(msg.iv), bytearray(msg.salt),
            int.from_bytes(msg.rec_seq, "big"),
        )


@dataclass(eq=False, slots=True)
class TlsState:
    """Both directions of a kTLS session, as capture() reads them and install() writes them."""

    version: TlsVersion
    cipher: TlsCipher
    tx: TlsDirection
    rx: TlsDirection

    def __post_init__(self) -> None:
        try:
            self.version = TlsVersion(self.version)
            self.cipher = TlsCipher(self.cipher)
        except ValueError as e:
            raise TlsStateError(str(e)) from None
        if not isinstance(self.tx, TlsDirection) or not isinstance(self.rx, TlsDirection):
            raise TlsStateError("tx and rx must be TlsDirection")
        self.tx.check(self.cipher)
        self.rx.check(self.cipher)

    def __repr__(self) -> str:
        return (
            f"TlsState({self.version.name}, {self.cipher.name}, "
            f"tx_seq={self.tx.rec_seq}, rx_seq={self.rx.rec_seq})"
        )

    __str__ = __repr__

    def zero(self) -> None:
        """Wipe both directions' keys in place; the state is unusable afterwards."""
        self.tx.zero()
        self.rx.zero()

    # --- kernel structs (struct tls12_crypto_info_*) ---------------------------------------
    def crypto_info(self, direction: TlsDirection) -> bytearray:
        """The setsockopt(SOL_TLS, TLS_TX/TLS_RX) buffer for one direction (wipe after use)."""
        layout = self.cipher.layout
        out = bytearray(layout.size)
        layout.struct.pack_into(
            out, 0, int(self.version), int(self.cipher), bytes(direction.iv),
            bytes(direction.key), bytes(direction.salt),
            direction.rec_seq.to_bytes(REC_SEQ_BYTES, "big"),
        )
        return out

    @staticmethod
    def parse_crypto_info(raw: bytes | bytearray) -> tuple[TlsVersion, TlsCipher, TlsDirection]:
        """Decode what getsockopt(SOL_TLS, TLS_TX/TLS_RX) returned."""
        if len(raw) < uapi.TLS_CRYPTO_INFO.size:
            raise TlsStateError(f"crypto info of {len(raw)} bytes is too short")
        version, cipher_type = uapi.TLS_CRYPTO_INFO.unpack_from(raw)
        try:
            tls_version, cipher = TlsVersion(version), TlsCipher(cipher_type)
        except ValueError as e:
            raise TlsStateError(f"kernel crypto info: {e}") from None
        layout = cipher.layout
        if len(raw) < layout.size:
            raise TlsStateError(
                f"{layout.name} crypto info needs {layout.size} bytes, got {len(raw)}"
            )
        _, _, iv, key, salt, rec_seq = layout.struct.unpack_from(raw)
        return tls_version, cipher, TlsDirection(
            bytearray(key), bytearray(iv), bytearray(salt), int.from_bytes(rec_seq, "big")
        )

    # --- the wire form: xo.v1.TlsState ------------------------------------------------------
    def to_proto(self) -> offload_pb2.TlsState:
        return offload_pb2.TlsState(
            version=TLS_STATE_VERSION,
            tls_version=_VERSION_TO_PROTO[self.version],
            cipher=_CIPHER_TO_PROTO[self.cipher],
            tx=self.tx.to_proto(),
            rx=self.rx.to_proto(),
        )

    @classmethod
    def from_proto(cls, msg: offload_pb2.TlsState) -> TlsState:
        if msg.version != TLS_STATE_VERSION:
            raise TlsStateVersionError(
                f"TlsState layout version {msg.version}; this code reads {TLS_STATE_VERSION}"
            )
        if msg.tls_version not in _VERSION_FROM_PROTO:
            raise TlsStateError(f"unknown TLS version {msg.tls_version}")
        if msg.cipher not in _CIPHER_FROM_PROTO:
            raise TlsStateError(f"unknown cipher {msg.cipher}")
        if not msg.HasField("tx") or not msg.HasField("rx"):
            raise TlsStateError("TlsState needs both tx and rx")
        return cls(
            _VERSION_FROM_PROTO[msg.tls_version],
            _CIPHER_FROM_PROTO[msg.cipher],
            TlsDirection.from_proto(msg.tx),
            TlsDirection.from_proto(msg.rx),
        )

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    @classmethod
    def from_bytes(cls, data: bytes) -> TlsState:
        msg = offload_pb2.TlsState()
        try:
            msg.ParseFromString(data)
        except DecodeError as e:
            raise TlsStateError(f"not a TlsState message: {e}") from None
        return cls.from_proto(msg)
