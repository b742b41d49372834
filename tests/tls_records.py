"""A user-space TLS record layer for tests: seal/open records with a TlsState's keys.

It does what the kernel does with struct tls12_crypto_info_*, independently (with the
`cryptography` AEADs), so a test can prove derived keys and sequence numbers right against an
unmodified TLS client on a kernel without kTLS, and read raw records kTLS wrote.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from xo.tls import TlsCipher, TlsDirection, TlsState, TlsVersion

APPLICATION_DATA = 23
LEGACY_VERSION = b"\x03\x03"
TAG_LEN = 16
HEADER_LEN = 5
NONCE_LEN = 12
SEQ_LEN = 8


def _aead(state: TlsState, d: TlsDirection) -> AESGCM | ChaCha20Poly1305:
    if state.cipher == TlsCipher.CHACHA20_POLY1305:
        return ChaCha20Poly1305(bytes(d.key))
    return AESGCM(bytes(d.key))


def _xor_nonce(iv12: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv12, seq.to_bytes(NONCE_LEN, "big"), strict=True))


def _explicit(state: TlsState) -> bool:
    """TLS 1.2 AES-GCM carries an 8-byte explicit nonce in each record."""
    return state.version == TlsVersion.TLS_1_2 and state.cipher != TlsCipher.CHACHA20_POLY1305


def _nonce(state: TlsState, d: TlsDirection, explicit: bytes) -> bytes:
    if _explicit(state):
        return bytes(d.salt) + explicit
    return _xor_nonce(bytes(d.salt) + bytes(d.iv), d.rec_seq)


def seal(state: TlsState, d: TlsDirection, data: bytes, kind: int = APPLICATION_DATA) -> bytes:
    """One record carrying `data`; advances d.rec_seq like the kernel."""
    seq = d.rec_seq.to_bytes(SEQ_LEN, "big")
    if state.version == TlsVersion.TLS_1_3:
        inner = data + bytes([kind])
        length = (len(inner) + TAG_LEN).to_bytes(2, "big")
        header = bytes([APPLICATION_DATA]) + LEGACY_VERSION + length
        body = _aead(state, d).encrypt(_nonce(state, d, b""), inner, header)
    else:
        explicit = seq if _explicit(state) else b""
        aad = seq + bytes([kind]) + LEGACY_VERSION + len(data).to_bytes(2, "big")
        body = explicit + _aead(state, d).encrypt(_nonce(state, d, explicit), data, aad)
        header = bytes([kind]) + LEGACY_VERSION + len(body).to_bytes(2, "big")
    d.rec_seq += 1
    return header + body


def open_record(state: TlsState, d: TlsDirection, record: bytes) -> tuple[int, bytes]:
    """(content type, plaintext) of one whole record; advances d.rec_seq."""
    header, body = record[:HEADER_LEN], record[HEADER_LEN:]
    seq = d.rec_seq.to_bytes(SEQ_LEN, "big")
    if state.version == TlsVersion.TLS_1_3:
        inner = _aead(state, d).decrypt(_nonce(state, d, b""), body, header)
        stripped = inner.rstrip(b"\0")
        kind, data = stripped[-1], stripped[:-1]
    else:
        kind = header[0]
        explicit = body[:SEQ_LEN] if _explicit(state) else b""
        body = body[len(explicit):]
        aad = seq + bytes([kind]) + LEGACY_VERSION + (len(body) - TAG_LEN).to_bytes(2, "big")
        data = _aead(state, d).decrypt(_nonce(state, d, explicit), body, aad)
    d.rec_seq += 1
    return kind, data


def split_records(stream: bytes) -> tuple[list[bytes], bytes]:
    """Whole records at the start of `stream`, and the incomplete rest."""
    out = []
    while len(stream) >= HEADER_LEN:
        end = HEADER_LEN + int.from_bytes(stream[3:5], "big")
        if len(stream) < end:
            break
        out.append(stream[:end])
        stream = stream[end:]
    return out, stream
