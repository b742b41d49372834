"""kTLS on Debian's stock kernel (VM tier): the kernel's records against an independent
user-space record layer, the quiescence refusals, and a capture/restore round trip of a kTLS
socket between two namespaces with records in flight during the move.

The peer here is a raw TCP socket that seals and opens records itself (tests/tls_records.py)
with the mirror of the server's TlsState, so every byte the kernel writes or accepts is
checked against RFC record formats, for each version and cipher, from arbitrary rec_seq.
"""

from __future__ import annotations

import socket
import time

import pytest
from lab_kit import assert_no_resets, connect, recv_exact, rst_counts
from tls_records import open_record, seal, split_records

from xo import uapi
from xo.flow import Endpoint
from xo.lab import Lab
from xo.tls import (
    TlsCipher,
    TlsDirection,
    TlsRefusedError,
    TlsState,
    TlsVersion,
    capture,
    check_quiescent,
    install,
    recv,
    send_close_notify,
    wait_quiescent,
)
from xo.tls.kernel import CLOSE_NOTIFY, CONTENT_ALERT
from xo.tls.move import FlowPath, Place, move

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("ktls")]

FRONT_PORT, BACK_PORT = 8443, 9443
IO_TIMEOUT_S = 20.0
SETTLE_S = 0.2
ALL = [(v, c) for v in TlsVersion for c in TlsCipher]
# Start near the 32-bit boundary: the kernel's 64-bit big-endian increment must carry.
START_SEQ = 2**32 - 2


def _state(version: TlsVersion, cipher: TlsCipher, seq: int) -> TlsState:
    layout = cipher.layout

    def d(fill: int) -> TlsDirection:
        return TlsDirection(bytearray(range(fill, fill + layout.key)),
                            bytearray(range(fill + 64, fill + 64 + layout.iv)),
                            bytearray(range(fill + 96, fill + 96 + layout.salt)), seq)

    return TlsState(version, cipher, d(1), d(120))


def _mirror(state: TlsState) -> TlsState:
    """The peer's view: its TX is our RX."""
    return TlsState.from_bytes(_swap(state.to_bytes(), state))


def _swap(wire: bytes, state: TlsState) -> bytes:
    msg = state.to_proto()
    msg.tx.CopyFrom(state.rx.to_proto())
    msg.rx.CopyFrom(state.tx.to_proto())
    return msg.SerializeToString()


class Peer:
    """The unmodified-kernel side: a plain TCP socket with a user-space record layer."""

    def __init__(self, sock: socket.socket, state: TlsState) -> None:
        self.sock, self.state, self.buf = sock, state, b""
        sock.settimeout(IO_TIMEOUT_S)

    def send(self, data: bytes) -> None:
        self.sock.sendall(seal(self.state, self.state.tx, data))

    def recv_alert(self) -> bytes:
        """Open records (data ones are skipped) until an alert; return its two bytes."""
        while True:
            records, self.buf = split_records(self.buf)
            for i, record in enumerate(records):
                kind, data = open_record(self.state, self.state.rx, record)
                if kind == CONTENT_ALERT:
                    assert i == len(records) - 1, "records after the alert"
                    return data
            self.buf += self.sock.recv(65536)

    def recv_records(self, count: int) -> list[bytes]:
        out: list[bytes] = []
        while len(out) < count:
            records, self.buf = split_records(self.buf)
            out += [open_record(self.state, self.state.rx, r)[1] for r in records]
            if len(out) < count:
                chunk = self.sock.recv(65536)
                assert chunk, "server closed"
                self.buf += chunk
        return out


@pytest.mark.parametrize(("version", "cipher"), ALL, ids=[f"{v.name}-{c.name}" for v, c in ALL])
def test_kernel_records_match_user_space(lab: Lab, version: TlsVersion,
                                         cipher: TlsCipher) -> None:
    server, raw, _ = connect(lab, FRONT_PORT, IO_TIMEOUT_S)
    state = _state(version, cipher, START_SEQ)
    peer = Peer(raw, _mirror(state))
    with server, raw:
        install(server, state)
        server.sendall(b"kernel to user space")  # one record, sealed by the kernel
        server.sendall(b"second")
        assert peer.recv_records(2) == [b"kernel to user space", b"second"]
        peer.send(b"user space to kernel")
        assert recv_exact(server, 20, recv) == b"user space to kernel"
        got = capture(server)
        assert got is not None
        assert (got.version, got.cipher) == (version, cipher)
        assert got.tx.rec_seq == START_SEQ + 2 and got.rx.rec_seq == START_SEQ + 1
        assert bytes(got.tx.key) == bytes(state.tx.key) and bytes(got.rx.key) == bytes(state.rx.key)


def test_refusals_then_capture(lab: Lab) -> None:
    server, raw, _ = connect(lab, FRONT_PORT, IO_TIMEOUT_S)
    state = _state(TlsVersion.TLS_1_3, TlsCipher.AES_GCM_128, 0)
    peer = Peer(raw, _mirror(state))
    with server, raw:
        install(server, state)
        # a whole record not read by the application
        peer.send(b"unread")
        time.sleep(SETTLE_S)
        with pytest.raises(TlsRefusedError) as e:
            capture(server)
        assert e.value.reason == TlsRefusedError.PARTIAL_RECORD
        assert recv_exact(server, 6, recv) == b"unread"
        # half a record on the wire
        record = seal(peer.state, peer.state.tx, b"split record")
        raw.sendall(record[:9])
        time.sleep(SETTLE_S)
        with pytest.raises(TlsRefusedError) as e:
            check_quiescent(server)
        assert e.value.reason == TlsRefusedError.PARTIAL_RECORD
        raw.sendall(record[9:])
        assert recv_exact(server, 12, recv) == b"split record"
        # sent but not acknowledged: the peer's window is full
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            while True:
                server.send(bytes(65536))
        with pytest.raises(TlsRefusedError) as e:
            wait_quiescent(server, 0.05)
        assert e.value.reason == TlsRefusedError.UNACKED
        raw.setblocking(False)
        deadline = time.monotonic() + IO_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                peer.buf += raw.recv(1 << 20)  # opened (in order) by recv_alert below
            except BlockingIOError:
                try:
                    wait_quiescent(server, 0.05)
                    break
                except TlsRefusedError:
                    continue
        got = capture(server)
        assert got is not None and got.rx.rec_seq == 2
        send_close_notify(server)
        raw.settimeout(IO_TIMEOUT_S)
        assert peer.recv_alert() == CLOSE_NOTIFY


@pytest.mark.parametrize(("version", "cipher"), ALL, ids=[f"{v.name}-{c.name}" for v, c in ALL])
def test_round_trip_with_records_in_flight(lab: Lab, version: TlsVersion,
                                           cipher: TlsCipher) -> None:
    """F -> B -> F; while each move's freeze drops the client's packets, the client keeps
    sending records: TCP retransmits them to the restored socket, whose installed state
    decrypts them at the right sequence number."""
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    before = rst_counts(c, f, b)
    server, raw, front = connect(lab, FRONT_PORT, IO_TIMEOUT_S)
    back = Place(b, Endpoint(b.ip4, BACK_PORT))
    state = _state(version, cipher, START_SEQ)
    peer = Peer(raw, _mirror(state))
    client_ep = Endpoint.parse(f"{raw.getsockname()[0]}:{raw.getsockname()[1]}")
    path = FlowPath(front, client_ep)
    try:
        install(server, state)
        state.zero()
        for hop, dst in enumerate((back, front)):
            server.sendall(b"before move %d" % hop)
            assert peer.recv_records(1) == [b"before move %d" % hop]
            # Acked before the test's own freeze: frozen, the peer's ACK could not arrive and
            # move() would rightly refuse (send-queue-unacked).
            wait_quiescent(server, IO_TIMEOUT_S)
            path.freeze()
            peer.send(b"during move %d" % hop)  # dropped: TCP retransmits it to the new socket
            time.sleep(SETTLE_S)
            server, _ = move(server, path, dst)
            assert server.getsockname()[0] == str(dst.local.ip)
            assert recv_exact(server, 13, recv) == b"during move %d" % hop
            server.sendall(b"after move %d" % hop)
            assert peer.recv_records(1) == [b"after move %d" % hop]
        wait_quiescent(server, IO_TIMEOUT_S)  # the peer's (delayed) ACK of the last record
        got = capture(server)
        assert got is not None
        assert got.tx.rec_seq == START_SEQ + 4 and got.rx.rec_seq == START_SEQ + 2
    finally:
        server.close()
        raw.close()
        path.close()
    assert_no_resets(before, c, f, b, settle=SETTLE_S)


def test_install_accepted_in_repair_mode(lab: Lab) -> None:
    """The restore order of the issue (ULP + crypto before repair off) is possible: the TLS
    ULP only needs ESTABLISHED, which a socket in repair mode is."""
    server, raw, _ = connect(lab, FRONT_PORT, IO_TIMEOUT_S)
    state = _state(TlsVersion.TLS_1_3, TlsCipher.AES_GCM_256, 0)
    peer = Peer(raw, _mirror(state))
    with server, raw:
        server.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, uapi.TCP_REPAIR_ON)
        install(server, state)
        server.setsockopt(uapi.SOL_TCP, uapi.TCP_REPAIR, uapi.TCP_REPAIR_OFF)
        server.sendall(b"installed in repair mode")
        assert peer.recv_records(1) == [b"installed in repair mode"]
        peer.send(b"and back")
        assert recv_exact(server, 8, recv) == b"and back"
