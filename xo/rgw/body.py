"""Receiving a request body the way S3 clients send it, verified before anything is stored.

Bodies arrive with Content-Length or Transfer-Encoding: chunked and may be aws-chunked inside
(SigV4 streaming: every chunk signed, or unsigned with a checksum trailer). The body is spooled
while its hashes are computed; the caller stores it only after `receive` returned, so a body
whose signature, SHA-256, Content-MD5 or checksum is wrong is never stored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from xo.rgw import sigv4
from xo.rgw.errors import S3Error
from xo.rgw.http import (
    ConnectionClosed,
    HttpConnection,
    HttpError,
    Request,
    read_chunked,
    read_length,
)

# S3's largest single PUT.
MAX_PUT_BYTES = 5 * 1024**3
SPOOL_IN_MEMORY = 16 * 1024 * 1024
MAX_AWS_CHUNK = 64 * 1024 * 1024
MAX_LINE = 4096


class Crc32:
    """zlib's CRC-32 with the hashlib interface (S3 sends it as 4 big-endian bytes)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


# x-amz-checksum-* algorithms the gateway verifies (crc32c and crc64nvme need native code
# the standard library lacks: they are accepted unverified).
CHECKSUMS: dict[str, Callable[[], Any]] = {
    "crc32": Crc32,
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
}


@dataclass
class Body:
    """A received, verified body: a file positioned anywhere (seek(0) before reading)."""

    file: IO[bytes]
    size: int
    md5_hex: str

    def read_all(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def close(self) -> None:
        self.file.close()


class _Source:
    """Line and exact reads over an iterator of byte strings."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = bytearray()

    def _more(self) -> None:
        try:
            self._buf += next(self._chunks)
        except StopIteration:
            raise S3Error("IncompleteBody") from None

    def readline(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > MAX_LINE:
                raise S3Error("InvalidRequest", "aws-chunked line too long")
            self._more()
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._more()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def at_end(self) -> bool:
        while not self._buf:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                return True
        return False


def decode_aws_chunked(source: _Source, signer: sigv4.ChunkSigner | None,
                       trailers: dict[str, str]) -> Iterator[bytes]:
    """Yield the payload of an aws-chunked body; fills `trailers` from the trailing headers."""
    while True:
        line = source.readline().decode("latin-1")
        size_text, _, ext = line.partition(";")
        try:
            size = int(size_text.strip(), 16)
        except ValueError:
            raise S3Error("InvalidRequest", f"bad aws-chunked size {size_text[:20]!r}") from None
        if size > MAX_AWS_CHUNK:
            raise S3Error("InvalidRequest", "aws-chunked chunk too large")
        data = source.read_exact(size) if size else b""
        if signer is not None:
            name, _, signature = ext.partition("=")
            if name.strip() != "chunk-signature":
                raise S3Error("SignatureDoesNotMatch", "chunk without a signature")
            signer.verify(data, signature.strip())
        if size == 0:
            break
        if source.readline():
            raise S3Error("InvalidRequest", "aws-chunked data not followed by CRLF")
        yield data
    while not source.at_end():
        trailer = source.readline()
        if not trailer:
            break
        name, _, value = trailer.decode("latin-1").partition(":")
        trailers[name.strip().lower()] = value.strip()


def raw_body(conn: HttpConnection, req: Request) -> Iterator[bytes]:
    """The HTTP message body (Transfer-Encoding decoded), lazily."""
    te = (req.header("transfer-encoding") or "").lower()
    if te:
        if te != "chunked":
            raise S3Error("NotImplemented", f"Transfer-Encoding {te!r}")
        return read_chunked(conn)
    length_text = req.header("content-length")
    if length_text is None:
        if req.method in ("PUT", "POST"):
            raise S3Error("MissingContentLength")
        return iter(())
    if not length_text.isdigit():
        raise S3Error("InvalidArgument", f"bad Content-Length {length_text!r}")
    return read_length(conn, int(length_text))


def has_body(req: Request) -> bool:
    return bool(req.header("transfer-encoding")) or int(req.header("content-length") or 0) > 0


def receive(conn: HttpConnection, req: Request, auth: sigv4.AuthResult,
            max_size: int = MAX_PUT_BYTES) -> Body:
    """Read and verify the whole body (raises S3Error; the connection is then unusable)."""
    payload_hash = auth.payload_hash
    if payload_hash == sigv4.STREAMING_SIGNED_TRAILER:
        raise S3Error("NotImplemented", "signed trailers are not supported")
    raw = raw_body(conn, req)
    chunks = raw
    encodings = [e.strip() for e in (req.header("content-encoding") or "").split(",")]
    streaming = payload_hash.startswith("STREAMING-")
    trailers: dict[str, str] = {}
    if streaming or "aws-chunked" in encodings:
        signer = sigv4.ChunkSigner(auth) if payload_hash == sigv4.STREAMING_SIGNED else None
        chunks = decode_aws_chunked(_Source(chunks), signer, trailers)
    md5 = hashlib.md5()
    sha = hashlib.sha256() if not streaming and payload_hash != sigv4.UNSIGNED else None
    algo = _checksum_algorithm(req)
    checksum = CHECKSUMS[algo]() if algo in CHECKSUMS else None
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
    size = 0
    try:
        for data in chunks:
            size += len(data)
            if size > max_size:
                raise S3Error("EntityTooLarge")
            md5.update(data)
            if sha is not None:
                sha.update(data)
            if checksum is not None:
                checksum.update(data)
            spool.write(data)
        # The aws-chunked decoder stops at its own end; the transport's may follow (the final
        # CRLF and zero chunk of Transfer-Encoding: chunked, as boto3 sends over HTTPS): read
        # it, or it would prefix the next request on this connection.
        for extra in raw:
            if extra.strip(b"\r\n"):
                raise S3Error("InvalidRequest", "data after the end of the aws-chunked body")
        _verify(req, size, md5, sha, payload_hash, algo, checksum, trailers)
    except (HttpError, ConnectionClosed) as e:
        spool.close()
        raise S3Error("IncompleteBody", str(e)) from None
    except BaseException:
        spool.close()
        raise
    return Body(spool, size, md5.hexdigest())


def _checksum_algorithm(req: Request) -> str | None:
    trailer = req.header("x-amz-trailer")
    if trailer and trailer.lower().startswith("x-amz-checksum-"):
        return trailer.lower().removeprefix("x-amz-checksum-")
    for name in req.headers:
        if name.startswith("x-amz-checksum-") and name not in (
            "x-amz-checksum-algorithm", "x-amz-checksum-type", "x-amz-checksum-mode"
        ):
            return name.removeprefix("x-amz-checksum-")
    return None


def _verify(req: Request, size: int, md5: Any, sha: Any, payload_hash: str, algo: str | None,
            checksum: Any, trailers: dict[str, str]) -> None:
    decoded = req.header("x-amz-decoded-content-length")
    if decoded is not None and decoded != str(size):
        raise S3Error("IncompleteBody", f"got {size} bytes, x-amz-decoded-content-length "
                                        f"says {decoded}")
    if sha is not None and sha.hexdigest() != payload_hash:
        raise S3Error("XAmzContentSHA256Mismatch")
    if (content_md5 := req.header("content-md5")) is not None:
        try:
            expected = base64.b64decode(content_md5, validate=True)
        except binascii.Error:
            raise S3Error("InvalidDigest") from None
        if len(expected) != md5.digest_size:
            raise S3Error("InvalidDigest")
        if expected != md5.digest():
            raise S3Error("BadDigest")
    if checksum is not None and algo is not None:
        name = f"x-amz-checksum-{algo}"
        claimed = trailers.get(name) or req.header(name)
        if claimed is None:
            raise S3Error("InvalidRequest", f"{name} announced but not sent")
        if base64.b64encode(checksum.digest()).decode() != claimed:
            raise S3Error("BadDigest", f"{name} does not match the body")
