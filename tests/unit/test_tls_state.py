"""xo.tls without kTLS: TlsState encoding, malformed input, key derivation against real
clients (a user-space record layer stands in for the kernel), and the refusal paths.

Everything here runs without root on any kernel; the kernel tier (tests/kernel/test_tls*.py)
repeats the derivation checks through real kTLS.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from tls_records import open_record, seal, split_records

from xo import uapi
from xo.pki import DevCA
from xo.tls import (
    HandshakeError,
    ServerTls,
    TlsCipher,
    TlsDirection,
    TlsFrontend,
    TlsRefusedError,
    TlsState,
    TlsStateError,
    TlsStateVersionError,
    TlsUnsupportedError,
    TlsVersion,
    capture,
    check_quiescent,
    handshake,
    install,
    keys,
    unavailable_reason,
    wait_quiescent,
)
from xo.tls import hooks as tls_hooks
from xo.tls.hooks import KernelTls
from xo.v1 import offload_pb2

SEQ_MAX = 2**64 - 1
HOST = "xo.test"
IO_TIMEOUT_S = 10.0
SMALL_RCVBUF = 4096
FLOOD = 4 * 1024 * 1024
QUIESCE_TIMEOUT_S = 0.05


def make_state(version: TlsVersion, cipher: TlsCipher, tx_seq: int = 7,
               rx_seq: int = 3) -> TlsState:
    layout = cipher.layout

    def direction(fill: int, seq: int) -> TlsDirection:
        return TlsDirection(
            bytearray([fill] * layout.key), bytearray([fill + 1] * layout.iv),
            bytearray([fill + 2] * layout.salt), seq,
        )

    return TlsState(version, cipher, direction(0x10, tx_seq), direction(0x40, rx_seq))


ALL = [(v, c) for v in TlsVersion for c in TlsCipher]


# --- encoding -------------------------------------------------------------------------------
@pytest.mark.parametrize(("version", "cipher"), ALL)
@pytest.mark.parametrize("seq", [0, 1, 2**32, SEQ_MAX])
def test_round_trip_exact(version: TlsVersion, cipher: TlsCipher, seq: int) -> None:
    state = make_state(version, cipher, tx_seq=seq, rx_seq=SEQ_MAX - seq)
    back = TlsState.from_bytes(state.to_bytes())
    assert (back.version, back.cipher) == (version, cipher)
    assert back.tx.same_as(state.tx) and back.rx.same_as(state.rx)
    assert back.tx.rec_seq == seq and back.rx.rec_seq == SEQ_MAX - seq
    # rec_seq travels as the kernel's 8 big-endian bytes
    assert state.to_proto().tx.rec_seq == seq.to_bytes(8, "big")


@pytest.mark.parametrize(("version", "cipher"), ALL)
def test_crypto_info_matches_kernel_layout(version: TlsVersion, cipher: TlsCipher) -> None:
    state = make_state(version, cipher, tx_seq=0x0102030405060708)
    raw = state.crypto_info(state.tx)
    assert len(raw) == cipher.layout.size
    assert raw[:4] == uapi.TLS_CRYPTO_INFO.pack(int(version), int(cipher))
    assert raw[-8:] == bytes.fromhex("0102030405060708")  # rec_seq last, big endian
    v, c, d = TlsState.parse_crypto_info(raw)
    assert (v, c) == (version, cipher) and d.same_as(state.tx)


def test_repr_hides_keys() -> None:
    state = make_state(TlsVersion.TLS_1_3, TlsCipher.AES_GCM_256)
    text = repr(state) + str(state) + repr(state.tx) + repr(state.rx)
    for d in (state.tx, state.rx):
        assert d.key.hex() not in text and bytes(d.key).decode("latin-1") not in text
    assert "tx_seq=7" in text and "AES_GCM_256" in text


def test_zero_wipes_key_material() -> None:
    state = make_state(TlsVersion.TLS_1_2, TlsCipher.AES_GCM_128)
    key_buffer = state.tx.key
    state.zero()
    assert key_buffer == bytearray(16)
    assert not any(state.rx.key) and not any(state.rx.iv) and not any(state.rx.salt)


# --- malformed input ------------------------------------------------------------------------
def _proto(state: TlsState) -> offload_pb2.TlsState:
    return state.to_proto()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: setattr(m.tx, "key", b"short"), "key must be 16 bytes"),
        (lambda m: setattr(m.rx, "iv", b"123"), "iv must be 8 bytes"),
        (lambda m: setattr(m.tx, "salt", b""), "salt must be 4 bytes"),
        (lambda m: setattr(m.tx, "rec_seq", b"\x00" * 7), "rec_seq must be 8 bytes"),
        (lambda m: setattr(m, "tls_version", 0), "unknown TLS version"),
        (lambda m: setattr(m, "cipher", 0), "unknown cipher"),
        (lambda m: setattr(m, "cipher", 99), "unknown cipher"),
        (lambda m: m.ClearField("rx"), "needs both tx and rx"),
    ],
)
def test_malformed_proto_refused(mutate: object, message: str) -> None:
    msg = _proto(make_state(TlsVersion.TLS_1_3, TlsCipher.AES_GCM_128))
    mutate(msg)  # type: ignore[operator]
    with pytest.raises(TlsStateError, match=message):
        TlsState.from_bytes(msg.SerializeToString())


def test_wrong_cipher_sizes_refused() -> None:
    # ChaCha's iv is 12 bytes and it has no salt: an AES-GCM-sized direction does not fit.
    gcm = make_state(TlsVersion.TLS_1_2, TlsCipher.AES_GCM_256)
    msg = gcm.to_proto()
    msg.cipher = offload_pb2.CHACHA20_POLY1305
    with pytest.raises(TlsStateError, match="chacha20-poly1305 iv must be 12 bytes"):
        TlsState.from_proto(msg)


def test_unknown_layout_version_refused() -> None:
    msg = _proto(make_state(TlsVersion.TLS_1_2, TlsCipher.AES_GCM_128))
    msg.version = 2
    with pytest.raises(TlsStateVersionError, match="layout version 2"):
        TlsState.from_proto(msg)


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x22\x80"])
def test_garbage_bytes_refused(data: bytes) -> None:
    with pytest.raises(TlsStateError):
        TlsState.from_bytes(data)


def test_empty_bytes_refused_as_unknown_version() -> None:
    with pytest.raises(TlsStateVersionError):
        TlsState.from_bytes(b"")


@pytest.mark.parametrize("seq", [-1, 2**64, 1.5])
def test_rec_seq_out_of_range(seq: object) -> None:
    with pytest.raises(TlsStateError, match="64-bit unsigned"):
        TlsDirection(bytearray(16), bytearray(8), bytearray(4), seq)  # type: ignore[arg-type]


def test_bad_enums_in_constructor() -> None:
    d = TlsDirection(bytearray(16), bytearray(8), bytearray(4), 0)
    with pytest.raises(TlsStateError):
        TlsState(0x0302, TlsCipher.AES_GCM_128, d, d)  # type: ignore[arg-type]
    with pytest.raises(TlsStateError):
        TlsState(TlsVersion.TLS_1_2, 55, d, d)  # type: ignore[arg-type]  # SM4: no layout


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x03", "too short"),
        (uapi.TLS_CRYPTO_INFO.pack(0x0303, 55) + bytes(40), "kernel crypto info"),
        (uapi.TLS_CRYPTO_INFO.pack(0x0304, 52) + bytes(10), "needs 56 bytes"),
    ],
)
def test_bad_kernel_crypto_info(raw: bytes, message: str) -> None:
    with pytest.raises(TlsStateError, match=message):
        TlsState.parse_crypto_info(raw)


def test_keylog_parsing() -> None:
    cr = bytes(range(32))
    text = (
        b"# TLS secrets log file\n"
        + b"CLIENT_RANDOM " + cr.hex().encode() + b" " + b"ab" * 48 + b"\n"
        + b"CLIENT_RANDOM " + bytes(32).hex().encode() + b" " + b"cd" * 48 + b"\n"
    )
    assert keys.parse_keylog(text, cr) == {"CLIENT_RANDOM": b"\xab" * 48}
    with pytest.raises(HandshakeError, match="malformed key log"):
        keys.parse_keylog(b"CLIENT_RANDOM " + cr.hex().encode() + b" zz\n", cr)


@pytest.mark.parametrize(
    ("name", "cipher"),
    [
        ("TLS_AES_128_GCM_SHA256", TlsCipher.AES_GCM_128),
        ("TLS_AES_256_GCM_SHA384", TlsCipher.AES_GCM_256),
        ("TLS_CHACHA20_POLY1305_SHA256", TlsCipher.CHACHA20_POLY1305),
        ("ECDHE-ECDSA-AES128-GCM-SHA256", TlsCipher.AES_GCM_128),
        ("ECDHE-RSA-AES256-GCM-SHA384", TlsCipher.AES_GCM_256),
        ("ECDHE-ECDSA-CHACHA20-POLY1305", TlsCipher.CHACHA20_POLY1305),
        ("ECDHE-RSA-AES128-SHA256", None),
        ("TLS_AES_128_CCM_SHA256", None),
    ],
)
def test_suite_mapping(name: str, cipher: TlsCipher | None) -> None:
    suite = keys.suite_of(name)
    assert (suite.cipher if suite else None) == cipher


# --- key derivation against real clients ---------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerTls, Path]:
    files = DevCA().write(tmp_path_factory.mktemp("pki"), HOST)
    return ServerTls(files.cert, files.key, timeout=IO_TIMEOUT_S), files.ca


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(IO_TIMEOUT_S)
    yield lsock
    lsock.close()


def _recv_records(sock: socket.socket, count: int) -> list[bytes]:
    buf, records = b"", []
    while len(records) < count:
        chunk = sock.recv(65536)
        assert chunk, "client closed"
        buf += chunk
        got, buf = split_records(buf)
        records += got
    return records


S_CLIENT_CASES = [
    ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256", TlsCipher.AES_GCM_128),
    ("-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384", TlsCipher.AES_GCM_256),
    ("-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305", TlsCipher.CHACHA20_POLY1305),
    ("-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256", TlsCipher.AES_GCM_128),
    ("-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384", TlsCipher.AES_GCM_256),
    ("-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256", TlsCipher.CHACHA20_POLY1305),
]


@pytest.mark.parametrize(("vflag", "cflag", "cname", "cipher"), S_CLIENT_CASES,
                         ids=[c[2] for c in S_CLIENT_CASES])
def test_derived_keys_work_with_openssl_s_client(
    pki: tuple[ServerTls, Path], listener: socket.socket, vflag: str, cflag: str, cname: str,
    cipher: TlsCipher,
) -> None:
    config, ca = pki
    port = listener.getsockname()[1]
    client = subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOST,
         "-CAfile", str(ca), "-verify_return_error", "-quiet", vflag, cflag, cname],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        sock, _ = listener.accept()
        with sock:
            state = handshake(sock, config)
            assert state.cipher == cipher
            tls13 = vflag == "-tls1_3"
            assert state.version == (TlsVersion.TLS_1_3 if tls13 else TlsVersion.TLS_1_2)
            assert (state.tx.rec_seq, state.rx.rec_seq) == ((0, 0) if tls13 else (1, 1))
            # server -> client: records sealed with the derived TX keys, read by s_client
            lines = [b"first line from xo\n", b"second line\n"]
            sock.sendall(b"".join(seal(state, state.tx, line) for line in lines))
            assert client.stdout is not None and client.stdin is not None
            for line in lines:
                assert client.stdout.readline() == line
            # client -> server: s_client's records open with the derived RX keys
            client.stdin.write(b"ping from s_client\n")
            client.stdin.flush()
            rec = _recv_records(sock, 1)[0]
            assert open_record(state, state.rx, rec) == (23, b"ping from s_client\n")
            assert state.rx.rec_seq == (1 if tls13 else 2)
    finally:
        client.kill()
        client.wait()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_derived_keys_work_with_python_ssl(pki: tuple[ServerTls, Path],
                                           version: ssl.TLSVersion) -> None:
    config, ca = pki
    a, b = socket.socketpair()
    cctx = ssl.create_default_context(cafile=str(ca))
    cctx.minimum_version = cctx.maximum_version = version
    result: dict[str, bytes] = {}

    def run_client() -> None:
        with cctx.wrap_socket(b, server_hostname=HOST) as tls:
            tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
            result["reply"] = tls.recv(100)

    t = threading.Thread(target=run_client)
    t.start()
    with a:
        state = handshake(a, config)
        kind, request = open_record(state, state.rx, _recv_records(a, 1)[0])
        assert (kind, request) == (23, b"GET / HTTP/1.1\r\n\r\n")
        a.sendall(seal(state, state.tx, b"HTTP/1.1 204 No Content\r\n\r\n"))
        t.join(IO_TIMEOUT_S)
    assert result["reply"] == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_handshake_refuses_plain_http(pki: tuple[ServerTls, Path]) -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(HandshakeError):
            handshake(a, pki[0])


def test_handshake_times_out_on_a_silent_client(pki: tuple[ServerTls, Path]) -> None:
    config = ServerTls(pki[0].cert, pki[0].key, timeout=0.05)
    a, b = socket.socketpair()
    with a, b, pytest.raises(HandshakeError, match="timed out"):
        handshake(a, config)


def test_handshake_client_gone(pki: tuple[ServerTls, Path]) -> None:
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(HandshakeError, match="closed"):
        handshake(a, pki[0])


# --- refusal paths on real TCP sockets -----------------------------------------------------
@pytest.fixture
def tcp_pair(listener: socket.socket) -> Iterator[tuple[socket.socket, socket.socket]]:
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
    peer.connect(listener.getsockname())
    mine, _ = listener.accept()
    with mine, peer:
        yield mine, peer


def test_plain_tcp_socket_has_no_tls_state(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    assert capture(tcp_pair[0]) is None


def test_refuses_unread_receive_queue(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = tcp_pair
    peer.sendall(b"\x17\x03\x03\x00\x40partial record")
    mine.recv(1, socket.MSG_PEEK)  # arrived
    with pytest.raises(TlsRefusedError) as e:
        check_quiescent(mine)
    assert e.value.reason == TlsRefusedError.PARTIAL_RECORD
    assert "bytes in the receive queue" in str(e.value)


def test_wait_quiescent_is_bounded_and_refuses_unacked(
    tcp_pair: tuple[socket.socket, socket.socket],
) -> None:
    mine, peer = tcp_pair
    mine.setblocking(False)
    with pytest.raises(BlockingIOError):
        while True:  # fill the peer's small window and our send buffer
            mine.send(bytes(FLOOD))
    with pytest.raises(TlsRefusedError) as e:
        wait_quiescent(mine, QUIESCE_TIMEOUT_S)
    assert e.value.reason == TlsRefusedError.UNACKED
    # the connection is untouched: the peer still gets its bytes and the socket settles
    peer.setblocking(False)
    drained = 0
    while True:
        try:
            got = peer.recv(FLOOD)
        except BlockingIOError:
            try:
                waited = wait_quiescent(mine, QUIESCE_TIMEOUT_S)
                break
            except TlsRefusedError:
                continue
        drained += len(got)
    assert drained > 0 and waited <= QUIESCE_TIMEOUT_S * 2


def test_install_without_ktls_is_unsupported(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    if unavailable_reason() is None:
        pytest.skip("this kernel has kTLS: the refusal path needs a kernel without it")
    with pytest.raises(TlsUnsupportedError, match="kernel has no kTLS"):
        install(tcp_pair[0], make_state(TlsVersion.TLS_1_3, TlsCipher.AES_GCM_128))


def test_frontend_serves_locally_without_ktls(
    pki: tuple[ServerTls, Path], caplog: pytest.LogCaptureFixture,
) -> None:
    if unavailable_reason() is None:
        pytest.skip("this kernel has kTLS: the local fallback needs a kernel without it")
    config, ca = pki
    front = TlsFrontend(config)
    cctx = ssl.create_default_context(cafile=str(ca))
    caplog.set_level(logging.WARNING, logger="xo.tls")
    def run_client(sock: socket.socket, n: int) -> None:
        cctx.wrap_socket(sock, server_hostname=HOST).sendall(b"hi %d" % n)

    for n in range(2):
        a, b = socket.socketpair()
        t = threading.Thread(target=run_client, args=(b, n))
        t.start()
        conn = front.accept(a)
        assert isinstance(conn, ssl.SSLSocket) and conn.recv(10) == b"hi %d" % n
        assert front.offloadable(conn) is not None
        t.join(IO_TIMEOUT_S)
        conn.close()
        b.close()
    assert front.stats["local-no-ktls"] == 2 and front.stats["ktls"] == 0
    notes = [r for r in caplog.records if "served locally" in r.getMessage()]
    assert len(notes) == 1 and "kTLS" in notes[0].getMessage()


def test_agent_hooks_without_ktls(tcp_pair: tuple[socket.socket, socket.socket],
                                  caplog: pytest.LogCaptureFixture) -> None:
    if unavailable_reason() is None:
        pytest.skip("this kernel has kTLS: the refusal path needs a kernel without it")
    caplog.set_level(logging.WARNING, logger="xo.tls")
    tls_hooks._log_unavailable.cache_clear()  # as in a fresh process
    hooks = [KernelTls(), KernelTls()]
    assert not hooks[0].supported and hooks[0].reason == unavailable_reason()
    assert len([r for r in caplog.records if "never offloaded" in r.getMessage()]) == 1
    assert hooks[0].capture(tcp_pair[0]) is None  # a plain TCP socket carries no TLS state
    proto = make_state(TlsVersion.TLS_1_2, TlsCipher.CHACHA20_POLY1305).to_proto()
    with pytest.raises(TlsUnsupportedError):
        hooks[1].install(tcp_pair[0], proto)
