"""Server-side TLS handshake in user space that ends with the session's kTLS state.

The handshake runs in Python's ssl module over memory BIOs, fed one whole TLS record at a
time straight from the socket: when it completes, not a byte beyond the client's Finished has
been read, so the kernel can take over the byte stream exactly there. The record sequence
numbers are then known without asking OpenSSL: TLS 1.3 starts the application keys at 0 in
both directions (no NewSessionTicket is sent: num_tickets = 0, and without tickets there is
no 0-RTT); TLS 1.2 has used seq 0 for each side's Finished, so both continue at 1. The keys
come from the secrets OpenSSL writes to its key log, here an anonymous memfd (never a file
on disk), wiped as soon as it is read.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from xo.tls import keys
from xo.tls.errors import HandshakeError
from xo.tls.state import TlsState

RECORD_HEADER = 5
MAX_RECORD_BODY = 2**14 + 2048  # TLSCiphertext.length limit (RFC 5246 6.2.3)
CONTENT_HANDSHAKE = 22
CLIENT_HELLO, SERVER_HELLO = 1, 2
HELLO_RANDOM_AT = RECORD_HEADER + 4 + 2  # record header, handshake header, legacy_version
TLS12_FINISHED_SEQ_NEXT = 1  # each side's Finished went out under seq 0
RECV_CHUNK = 16384
# Only suites kTLS implements; anything else would leave the session stuck in user space.
KTLS_CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
KEYLOG_TLS12 = "CLIENT_RANDOM"
KEYLOG_CLIENT_13, KEYLOG_SERVER_13 = "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"


@dataclass(frozen=True)
class ServerTls:
    """What the frontend's TLS endpoint needs: certificate, key, allowed versions/ciphers."""

    cert: Path
    key: Path
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ciphers: str = KTLS_CIPHERS_TLS12  # OpenSSL cipher string for TLS 1.2 (1.3: all kTLS's)
    timeout: float = 10.0

    def context(self, keylog: str | None = None) -> ssl.SSLContext:
        """A server context whose sessions kTLS can carry (no tickets: known rec_seq)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.minimum_version, ctx.maximum_version = self.min_version, self.max_version
        ctx.set_ciphers(self.ciphers)
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
        if keylog is not None:
            ctx.keylog_filename = keylog
        return ctx


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    out = bytearray()
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeError("handshake timed out")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(out), RECV_CHUNK))
        except TimeoutError:
            raise HandshakeError("handshake timed out") from None
        except OSError as e:
            raise HandshakeError(f"handshake: connection failed: {e.strerror}") from None
        if not chunk:
            raise HandshakeError("client closed the connection during the handshake")
        out += chunk
    return bytes(out)


def _read_record(sock: socket.socket, deadline: float) -> bytes:
    header = _recv_exact(sock, RECORD_HEADER, deadline)
    length = int.from_bytes(header[3:5], "big")
    if length > MAX_RECORD_BODY:
        raise HandshakeError(f"not TLS: record of {length} bytes (header {header.hex()})")
    return header + _recv_exact(sock, length, deadline)


def _hello_random(record: bytes, msg_type: int) -> bytes | None:
    """The random of a plaintext ClientHello/ServerHello record, else None."""
    if len(record) < HELLO_RANDOM_AT + keys.RANDOM_LEN or record[0] != CONTENT_HANDSHAKE:
        return None
    if record[RECORD_HEADER] != msg_type:
        return None
    return record[HELLO_RANDOM_AT : HELLO_RANDOM_AT + keys.RANDOM_LEN]


def _drive(sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO,
           outgoing: ssl.MemoryBIO, timeout: float) -> tuple[bytes, bytes]:
    """Run the handshake record by record; returns (client_random, server_random)."""
    deadline = time.monotonic() + timeout
    client_random = server_random = b""
    while True:
        try:
            obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError as e:
            pending = outgoing.read()  # the alert telling the client why
            if pending:
                _send(sock, pending)
            raise HandshakeError(f"handshake failed: {e.reason or e}") from None
        out = outgoing.read()
        if out:
            server_random = server_random or (_hello_random(out, SERVER_HELLO) or b"")
            _send(sock, out)
        if done:
            return client_random, server_random
        record = _read_record(sock, deadline)
        client_random = client_random or (_hello_random(record, CLIENT_HELLO) or b"")
        incoming.write(record)


def _send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as e:
        raise HandshakeError(f"handshake: send failed: {e.strerror}") from None


def _read_wipe(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    text = os.pread(fd, size, 0)
    os.pwrite(fd, bytes(size), 0)
    return text


def _derive(obj: ssl.SSLObject, log: bytes, client_random: bytes,
            server_random: bytes) -> TlsState:
    cipher = obj.cipher()
    suite = keys.suite_of(cipher[0]) if cipher else None
    if suite is None:
        raise HandshakeError(f"negotiated cipher {cipher} has no kTLS implementation")
    secrets = keys.parse_keylog(log, client_random)
    version = obj.version()
    if version == "TLSv1.3":
        if KEYLOG_CLIENT_13 not in secrets or KEYLOG_SERVER_13 not in secrets:
            raise HandshakeError("TLS 1.3 traffic secrets missing from the key log")
        return keys.tls13_state(suite, secrets[KEYLOG_CLIENT_13], secrets[KEYLOG_SERVER_13], 0, 0)
    if version == "TLSv1.2":
        if KEYLOG_TLS12 not in secrets:
            raise HandshakeError("TLS 1.2 master secret missing from the key log")
        seq = TLS12_FINISHED_SEQ_NEXT
        return keys.tls12_state(suite, secrets[KEYLOG_TLS12], client_random, server_random,
                                seq, seq)
    raise HandshakeError(f"{version} has no kTLS implementation")


def handshake(sock: socket.socket, config: ServerTls) -> TlsState:
    """Complete a server handshake on `sock`; return the session's kTLS state (install it
    with xo.tls.install before any other read or write on the socket)."""
    keylog_fd = os.memfd_create("xo-tls-keylog", os.MFD_CLOEXEC)
    saved_timeout = sock.gettimeout()
    try:
        ctx = config.context(keylog=f"/proc/self/fd/{keylog_fd}")
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
        client_random, server_random = _drive(sock, obj, incoming, outgoing, config.timeout)
        if incoming.pending or obj.pending():
            raise HandshakeError("bytes beyond the handshake were consumed in user space")
        if not client_random:
            raise HandshakeError("no ClientHello random seen")
        return _derive(obj, _read_wipe(keylog_fd), client_random, server_random)
    finally:
        os.close(keylog_fd)
        sock.settimeout(saved_timeout)
