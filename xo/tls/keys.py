"""Traffic keys of an established TLS session, derived from the secrets OpenSSL logs.

Python's ssl module does not hand out traffic keys, but it writes the NSS key log format
(`SSLContext.keylog_filename`). From those secrets:
  TLS 1.3: key/iv = HKDF-Expand-Label({CLIENT,SERVER}_TRAFFIC_SECRET_0, "key"/"iv")  (RFC 8446 7.3)
  TLS 1.2: key_block = PRF(master_secret, "key expansion", server_random + client_random)
           = client key, server key, client IV, server IV                       (RFC 5246 6.3)
The kernel wants for AES-GCM: salt = the first 4 IV bytes (1.3) or the implicit IV (1.2), and
iv = the other 8 bytes (1.3) or the initial explicit nonce (1.2: we use the record sequence
number, as RFC 5288 suggests and OpenSSL does); for ChaCha20-Poly1305 iv = the 12-byte IV.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from xo.tls.errors import HandshakeError
from xo.tls.state import TlsCipher, TlsDirection, TlsState, TlsVersion

RANDOM_LEN = 32
TLS13_LABEL_PREFIX = b"tls13 "
TLS13_IV_LEN = 12
SHA256, SHA384 = "sha256", "sha384"
U8_MAX, U16_MAX = 0xFF, 0xFFFF


@dataclass(frozen=True)
class Suite:
    """What the kernel and the derivation need to know about a negotiated cipher suite."""

    cipher: TlsCipher
    hash_name: str

    @property
    def fixed_iv_len(self) -> int:
        """TLS 1.2 implicit IV length: 4 for AES-GCM (RFC 5288), 12 for ChaCha (RFC 7905)."""
        return self.cipher.layout.salt or self.cipher.layout.iv


def suite_of(openssl_name: str) -> Suite | None:
    """Map an OpenSSL cipher name (SSLObject.cipher()[0]) to a kTLS suite; None = no kTLS."""
    name = openssl_name.upper().replace("_", "-")
    if "CHACHA20-POLY1305" in name:
        return Suite(TlsCipher.CHACHA20_POLY1305, SHA256)
    if "AES-128-GCM" in name or "AES128-GCM" in name:
        return Suite(TlsCipher.AES_GCM_128, SHA256)
    if "AES-256-GCM" in name or "AES256-GCM" in name:
        return Suite(TlsCipher.AES_GCM_256, SHA384)
    return None


def hkdf_expand(hash_name: str, prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand of RFC 5869."""
    digest_len = hashlib.new(hash_name).digest_size
    if length > U8_MAX * digest_len:
        raise ValueError(f"HKDF-Expand: {length} bytes is too long for {hash_name}")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def hkdf_expand_label(hash_name: str, secret: bytes, label: bytes, context: bytes,
                      length: int) -> bytes:
    """HKDF-Expand-Label of RFC 8446 section 7.1."""
    full = TLS13_LABEL_PREFIX + label
    if length > U16_MAX or len(full) > U8_MAX or len(context) > U8_MAX:
        raise ValueError("HKDF-Expand-Label: field out of range")
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    return hkdf_expand(hash_name, secret, info, length)


def tls12_prf(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """The TLS 1.2 PRF, P_<hash>(secret, label + seed), RFC 5246 section 5."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, hash_name).digest()
        out += hmac.new(secret, a + seed, hash_name).digest()
    return out[:length]


def _tls13_direction(suite: Suite, secret: bytes, rec_seq: int) -> TlsDirection:
    layout = suite.cipher.layout
    key = bytearray(hkdf_expand_label(suite.hash_name, secret, b"key", b"", layout.key))
    iv = bytearray(hkdf_expand_label(suite.hash_name, secret, b"iv", b"", TLS13_IV_LEN))
    return TlsDirection(key, iv[layout.salt :], iv[: layout.salt], rec_seq)


def tls13_state(suite: Suite, client_secret: bytes, server_secret: bytes, tx_seq: int,
                rx_seq: int) -> TlsState:
    """The server side's kTLS state from the application traffic secrets (TX = server's)."""
    return TlsState(
        TlsVersion.TLS_1_3, suite.cipher,
        tx=_tls13_direction(suite, server_secret, tx_seq),
        rx=_tls13_direction(suite, client_secret, rx_seq),
    )


def tls12_state(suite: Suite, master_secret: bytes, client_random: bytes,
                server_random: bytes, tx_seq: int, rx_seq: int) -> TlsState:
    """The server side's kTLS state from the TLS 1.2 master secret and both hello randoms."""
    if len(client_random) != RANDOM_LEN or len(server_random) != RANDOM_LEN:
        raise HandshakeError("TLS 1.2 key expansion needs both 32-byte hello randoms")
    layout = suite.cipher.layout
    fixed = suite.fixed_iv_len
    block = bytearray(tls12_prf(suite.hash_name, master_secret, b"key expansion",
                                server_random + client_random, 2 * (layout.key + fixed)))
    client_key, server_key = block[: layout.key], block[layout.key : 2 * layout.key]
    client_iv = block[2 * layout.key : 2 * layout.key + fixed]
    server_iv = block[2 * layout.key + fixed :]
    block[:] = bytes(len(block))

    def direction(key: bytearray, implicit: bytearray, seq: int) -> TlsDirection:
        if layout.salt:  # AES-GCM: implicit IV is the salt, explicit nonce starts at rec_seq
            return TlsDirection(key, bytearray(seq.to_bytes(layout.iv, "big")), implicit, seq)
        return TlsDirection(key, implicit, bytearray(), seq)

    return TlsState(
        TlsVersion.TLS_1_2, suite.cipher,
        tx=direction(server_key, server_iv, tx_seq),
        rx=direction(client_key, client_iv, rx_seq),
    )


def parse_keylog(text: bytes, client_random: bytes) -> dict[str, bytes]:
    """Secrets of one connection (by client random) from NSS key log lines: label -> secret."""
    want = client_random.hex().encode()
    out: dict[str, bytes] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[0].startswith(b"#") or parts[1].lower() != want:
            continue
        try:
            out[parts[0].decode()] = bytes.fromhex(parts[2].decode())
        except ValueError:
            raise HandshakeError(f"malformed key log line for label {parts[0]!r}") from None
    return out
