"""Receiving request bodies: aws-chunked (signed, AWS's example), chunked, and digests.

Real sockets (a socketpair) carry the bytes, as from a client; the body is verified in full
before `receive` returns, so a bad body never reaches storage.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import threading
import zlib

import pytest
from test_s3_sigv4 import CHUNK_SIGS, KEYS, NOW, streaming_headers

from xo.rgw.body import receive
from xo.rgw.errors import S3Error
from xo.rgw.http import HttpConnection, Request
from xo.rgw.sigv4 import AuthResult, Verifier

UNSIGNED_HASH = "UNSIGNED-PAYLOAD"


@pytest.fixture
def connection():
    """make(raw) -> a server-side HttpConnection whose peer sends `raw`, then FIN."""
    opened: list[tuple[socket.socket, socket.socket, threading.Thread]] = []

    def make(raw: bytes) -> HttpConnection:
        a, b = socket.socketpair()

        def feed() -> None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # reader gave up
                a.sendall(raw)
                a.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=feed)
        t.start()
        opened.append((a, b, t))
        return HttpConnection(b)

    yield make
    for a, b, t in opened:
        b.close()
        t.join()
        a.close()


def aws_chunked(sizes_sigs: list[tuple[int, str]], corrupt: bool = False) -> bytes:
    out = b""
    for size, sig in sizes_sigs:
        data = b"a" * size
        if corrupt and size == 1024:
            data = b"b" + data[1:]
        out += f"{size:x};chunk-signature={sig}\r\n".encode() + data + b"\r\n"
    return out


def streaming_request() -> tuple[Request, Verifier]:
    req = Request("PUT", "/examplebucket/chunkObject.txt", "HTTP/1.1", streaming_headers())
    return req, Verifier(KEYS)


def test_signed_aws_chunked_example(connection) -> None:
    req, v = streaming_request()
    auth = v.verify(req.method, req.path, req.query, req.headers, NOW)
    raw = aws_chunked(CHUNK_SIGS)
    assert len(raw) == 66824  # the example's Content-Length
    body = receive(connection(raw), req, auth)
    assert body.size == 66560 and body.read_all() == b"a" * 66560
    assert body.md5_hex == hashlib.md5(b"a" * 66560).hexdigest()


def test_signed_aws_chunked_corrupt_chunk(connection) -> None:
    req, v = streaming_request()
    auth = v.verify(req.method, req.path, req.query, req.headers, NOW)
    with pytest.raises(S3Error) as e:
        receive(connection(aws_chunked(CHUNK_SIGS, corrupt=True)), req, auth)
    assert e.value.code == "SignatureDoesNotMatch"


def test_signed_aws_chunked_truncated(connection) -> None:
    req, v = streaming_request()
    auth = v.verify(req.method, req.path, req.query, req.headers, NOW)
    with pytest.raises(S3Error) as e:
        receive(connection(aws_chunked(CHUNK_SIGS[:1])), req, auth)
    assert e.value.code == "IncompleteBody"


def _auth_for(payload_hash: str) -> AuthResult:
    return AuthResult("AK", "20130524T000000Z", "20130524/us-east-1/s3/aws4_request", b"k",
                      "0" * 64, payload_hash)


def _req(headers: dict[str, str]) -> Request:
    return Request("PUT", "/b/k", "HTTP/1.1", {k: [v] for k, v in headers.items()})


def test_unsigned_trailer_crc32_over_transfer_chunked(connection) -> None:
    data = b"hello aws-chunked world" * 100
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    inner = (f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n"
             + f"x-amz-checksum-crc32:{crc}\r\n\r\n".encode())
    # the aws-chunked body, itself sent with Transfer-Encoding: chunked in two pieces
    half = len(inner) // 2
    outer = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (inner[:half], inner[half:]))
    outer += b"0\r\n\r\n"
    req = _req({"transfer-encoding": "chunked", "content-encoding": "aws-chunked",
                "x-amz-trailer": "x-amz-checksum-crc32",
                "x-amz-decoded-content-length": str(len(data))})
    body = receive(connection(outer), req, _auth_for("STREAMING-UNSIGNED-PAYLOAD-TRAILER"))
    assert body.read_all() == data


def test_unsigned_trailer_bad_crc32(connection) -> None:
    data = b"x" * 1000
    inner = (f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n"
             + b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n")
    req = _req({"content-length": str(len(inner)), "content-encoding": "aws-chunked",
                "x-amz-trailer": "x-amz-checksum-crc32"})
    with pytest.raises(S3Error) as e:
        receive(connection(inner), req, _auth_for("STREAMING-UNSIGNED-PAYLOAD-TRAILER"))
    assert e.value.code == "BadDigest"


def test_sha256_payload(connection) -> None:
    data = b"payload"
    good = hashlib.sha256(data).hexdigest()
    req = _req({"content-length": str(len(data))})
    assert receive(connection(data), req, _auth_for(good)).read_all() == data
    with pytest.raises(S3Error) as e:
        receive(connection(b"PAYLOAD"), req, _auth_for(good))
    assert e.value.code == "XAmzContentSHA256Mismatch"


def test_content_md5(connection) -> None:
    data = b"some bytes"
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    req = _req({"content-length": str(len(data)), "content-md5": md5})
    assert receive(connection(data), req, _auth_for(UNSIGNED_HASH)).size == len(data)
    with pytest.raises(S3Error) as e:
        receive(connection(b"other byte"), req, _auth_for(UNSIGNED_HASH))
    assert e.value.code == "BadDigest"
    bad = _req({"content-length": str(len(data)), "content-md5": "not base64!"})
    with pytest.raises(S3Error) as e:
        receive(connection(data), bad, _auth_for(UNSIGNED_HASH))
    assert e.value.code == "InvalidDigest"


def test_short_body_and_missing_length(connection) -> None:
    with pytest.raises(S3Error) as e:
        receive(connection(b"abc"), _req({"content-length": "10"}), _auth_for(UNSIGNED_HASH))
    assert e.value.code == "IncompleteBody"
    with pytest.raises(S3Error) as e:
        receive(connection(b""), _req({}), _auth_for(UNSIGNED_HASH))
    assert e.value.code == "MissingContentLength"


def test_size_limit(connection) -> None:
    with pytest.raises(S3Error) as e:
        receive(connection(b"x" * 100), _req({"content-length": "100"}),
                _auth_for(UNSIGNED_HASH), max_size=10)
    assert e.value.code == "EntityTooLarge"
