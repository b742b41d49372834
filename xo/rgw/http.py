"""A minimal HTTP/1.1 server connection that owns its socket and its read buffer.

The gateway must be able to hand a client's socket to another host together with the bytes
it already read, and to resume serving a socket handed back, so it cannot use a server whose
buffered reader hides those bytes. `HttpConnection` keeps them in one bytearray.

On a kernel TLS socket (HTTPS whose records the kernel encrypts: the gateway's clients, and
the same connections handed to a storage node) a plain recv() fails with EIO when the client
sends a non-data record, so reads go through xo.tls.recv: the client's close_notify reads as
end of stream, a fatal alert as a TlsKernelError (an OSError: the connection ends).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate

import xo.tls
from xo.tls import kernel as tls_kernel

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 200
RECV_SIZE = 256 * 1024
SENDFILE_CHUNK = 8 * 1024 * 1024
JOIN_SECONDS = 5.0

REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 206: "Partial Content",
    304: "Not Modified", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 411: "Length Required",
    412: "Precondition Failed", 416: "Range Not Satisfiable", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable",
}


class HttpError(Exception):
    """The peer sent something that is not HTTP/1.x; the connection must be closed."""


class ConnectionClosed(Exception):
    """The peer closed the connection in the middle of a message."""


@dataclass
class Request:
    """A parsed request head. `path` and `query` are raw (still percent-encoded)."""

    method: str
    target: str
    version: str
    headers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: str, default: str | None = None) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else default

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def is_ktls(sock: socket.socket) -> bool:
    """Whether the kernel runs TLS on `sock` (a TCP socket with the "tls" upper layer)."""
    if isinstance(sock, ssl.SSLSocket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    return tls_kernel.ulp_of(sock) == tls_kernel.ULP_TLS.decode()


class HttpConnection:
    """One client connection: buffered reads of request heads and bodies, raw writes."""

    def __init__(self, sock: socket.socket, preread: bytes = b"") -> None:
        self.sock = sock
        self.buf = bytearray(preread)
        self.ktls = is_ktls(sock)

    def fill(self) -> bool:
        """Read what the peer sent into the buffer; False at end of stream (FIN, or a TLS
        close_notify)."""
        data = xo.tls.recv(self.sock, RECV_SIZE) if self.ktls else self.sock.recv(RECV_SIZE)
        if not data:
            return False
        self.buf += data
        return True

    def close(self, fin: bool = False) -> None:
        """Close the socket; on kTLS say close_notify first, as TLS asks. `fin`: shut down
        the sending side first, so the peer gets a FIN even if another descriptor keeps the
        socket open. Best effort: the peer may be gone already."""
        with contextlib.suppress(OSError):
            if self.ktls:
                xo.tls.send_close_notify(self.sock)
            if fin:
                self.sock.shutdown(socket.SHUT_WR)
        self.sock.close()

    def read_request(self) -> Request | None:
        """Read the next request head; None when the peer closed cleanly between requests."""
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buf) > MAX_HEADER_BYTES:
                raise HttpError("request head too large")
            if not self.fill():
                if self.buf.strip():
                    raise ConnectionClosed("peer closed inside a request head")
                return None
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        return parse_head(head)

    def readline(self, limit: int = MAX_HEADER_BYTES) -> bytes:
        """One CRLF-terminated line, without the CRLF."""
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > limit:
                raise HttpError("line too long")
            if not self.fill():
                raise ConnectionClosed("peer closed inside a line")

    def read_some(self, limit: int) -> bytes:
        """Up to `limit` bytes (at least one), from the buffer first."""
        if not self.buf and not self.fill():
            raise ConnectionClosed("peer closed inside a body")
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data

    def read_exact(self, n: int) -> bytes:
        parts = []
        while n > 0:
            data = self.read_some(n)
            parts.append(data)
            n -= len(data)
        return b"".join(parts)

    def take_buffer(self) -> bytes:
        """Hand over the bytes read but not consumed (e.g. before an offload)."""
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Copy `count` bytes of a file to the socket in the kernel."""
        while count > 0:
            sent = os.sendfile(self.sock.fileno(), fd, offset, min(count, SENDFILE_CHUNK))
            if sent == 0:
                raise ConnectionClosed("file shorter than expected")
            offset += sent
            count -= sent


def parse_head(head: str) -> Request:
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(f"bad request line {lines[0][:100]!r}")
    if len(lines) > MAX_HEADERS:
        raise HttpError("too many headers")
    req = Request(parts[0], parts[1], parts[2])
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(f"bad header line {line[:100]!r}")
        req.headers.setdefault(name.lower(), []).append(value.strip())
    return req


def response_head(status: int, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    lines.append(f"Date: {formatdate(usegmt=True)}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_chunked(conn: HttpConnection, max_chunk: int = 64 * 1024 * 1024) -> Iterator[bytes]:
    """Decode a Transfer-Encoding: chunked body (trailers are read and dropped)."""
    while True:
        line = conn.readline()
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size_text[:20]!r}") from None
        if size > max_chunk:
            raise HttpError("chunk too large")
        if size == 0:
            while conn.readline():
                pass
            return
        yield conn.read_exact(size)
        if conn.readline():
            raise HttpError("chunk not followed by CRLF")


def read_length(conn: HttpConnection, length: int) -> Iterator[bytes]:
    while length > 0:
        data = conn.read_some(min(length, RECV_SIZE))
        length -= len(data)
        yield data


class Server:
    """Threaded TCP server: one thread per connection, closed and joined by `close()`."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: Callable[[socket.socket], None],
        name: str = "http",
        backlog: int = 128,
    ) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(address)
        self._listener.listen(backlog)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._handler = handler
        self._name = name
        self._lock = threading.Lock()
        # connection thread -> the socket it serves now
        self._conns: dict[int, socket.socket] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"{name}-accept",
                                        daemon=True)

    def start(self) -> Server:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.spawn(sock)

    def spawn(self, sock: socket.socket) -> None:
        """Serve `sock` on its own thread (also used for handed-in connections)."""
        with self._lock:
            if self._closing:
                sock.close()
                return
        threading.Thread(target=self._run, args=(sock,), name=f"{self._name}-conn",
                         daemon=True).start()

    def adopt(self, sock: socket.socket) -> None:
        """The calling connection thread now serves `sock` (e.g. one handed back)."""
        with self._lock:
            self._conns[threading.get_ident()] = sock

    def _run(self, sock: socket.socket) -> None:
        self.adopt(sock)
        try:
            self._handler(sock)
        except Exception:  # one broken connection must not take the server down
            log.exception("%s: connection handler failed", self._name)
        finally:
            with self._lock:
                current = self._conns.pop(threading.get_ident(), sock)
            current.close()  # a no-op when the handler closed it or handed it away

    def close(self) -> None:
        """Stop accepting and shut down open connections."""
        with self._lock:
            self._closing = True
            conns = list(self._conns.values())
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread.ident is not None:
            self._thread.join(timeout=JOIN_SECONDS)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
