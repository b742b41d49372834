"""A storage node: the durable store behind a small HTTP API for the gateway, and the server
of GETs whose client connection the gateway handed in (offload).

The API is internal (gateway -> node, on the storage network): paths under /_xo/v1/, object
metadata as JSON in the X-Xo-Meta header, errors as the S3 code in X-Xo-Error so the gateway
can re-raise them unchanged.

A handed-in connection may carry kernel TLS (an HTTPS client of the gateway): the node writes
plaintext and the kernel encrypts it. A stock kernel moves a kTLS socket only when it is
quiescent (every record sent acknowledged, nothing unread), so before giving it back the node
waits for the client's acknowledgements and reads whatever the client sent meanwhile: its next
request travels back as preread; its close_notify (or FIN) ends the connection here.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

from xo.rgw.errors import S3Error
from xo.rgw.http import (
    ConnectionClosed,
    HttpConnection,
    HttpError,
    Request,
    Server,
    read_length,
    response_head,
)
from xo.rgw.store import ObjectMeta, Store
from xo.tls import TlsRefusedError, wait_quiescent

log = logging.getLogger(__name__)

API = "/_xo/v1/"
# S3's minimum size of every part but the last.
MIN_PART_SIZE = 5 * 1024 * 1024
# How long the client of a handed-in kTLS connection has to acknowledge the response before
# the node gives up on it (as long as the gateway waits for the connection by default).
ACK_TIMEOUT_S = 30.0
# Give-backs of a kTLS connection the agent refused because the client sent a record meanwhile.
GIVE_BACK_ATTEMPTS = 3


class GiveBackRefused(Exception):
    """The agent refused a give-back and the socket is still the node's: a kTLS socket that
    was not quiescent (the client sent its next request or close_notify meanwhile)."""


@dataclass(frozen=True, slots=True)
class ServeState:
    """What the gateway decided for an offloaded GET: the node sends `head` then the bytes."""

    bucket: str
    key: str
    etag: str
    start: int
    length: int
    head: bytes

    def to_bytes(self) -> bytes:
        return json.dumps({
            "bucket": self.bucket, "key": self.key, "etag": self.etag, "start": self.start,
            "length": self.length, "head": base64.b64encode(self.head).decode(),
        }).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ServeState:
        try:
            d = json.loads(data)
            return cls(str(d["bucket"]), str(d["key"]), str(d["etag"]), int(d["start"]),
                       int(d["length"]), base64.b64decode(d["head"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"bad serve state: {e}") from None


def send_object(conn: HttpConnection, store: Store, state: ServeState) -> None:
    """Send the prepared response head and the object's bytes [start, start+length).

    Raises S3Error (nothing sent) when the object is gone or is not the version the gateway
    saw, so the caller can fall back.
    """
    meta, f = store.open(state.bucket, state.key)
    with f:
        if meta.etag != state.etag:
            raise S3Error("PreconditionFailed", "object changed since the gateway looked")
        if state.start + state.length > meta.size:
            raise S3Error("InvalidRange")
        conn.send(state.head)
        conn.sendfile(f.fileno(), state.start, state.length)


def settle(conn: HttpConnection, timeout: float) -> bool:
    """Make a kTLS connection movable: wait until the client acknowledged everything sent,
    reading into conn.buf whatever it sends meanwhile (a record left unread would pin the
    socket here). True when quiescent; False when the client closed (close_notify or FIN).
    Raises ConnectionClosed when the client does not acknowledge within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            wait_quiescent(conn.sock, max(left, 0.0))
            return True
        except TlsRefusedError as e:
            if e.reason == TlsRefusedError.UNACKED or left <= 0:
                raise ConnectionClosed(f"client did not acknowledge the response: {e}") from None
        conn.sock.settimeout(left)
        try:
            if not conn.fill():
                return False
        finally:
            conn.sock.settimeout(None)


def _error_response(conn: HttpConnection, err: S3Error) -> None:
    body = err.message.encode()
    conn.send(response_head(err.status, [
        ("X-Xo-Error", err.code), ("Content-Length", str(len(body))),
        ("Content-Type", "text/plain"),
    ]) + body)


def _json_response(conn: HttpConnection, obj: Any, status: int = 200) -> None:
    body = json.dumps(obj, separators=(",", ":")).encode()
    conn.send(response_head(status, [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
    ]) + body)


def _meta_header(meta: ObjectMeta) -> tuple[str, str]:
    return ("X-Xo-Meta", meta.to_json())


class StorageNode:
    """Serves one Store over the internal API; `serve_handed_in` serves offloaded clients."""

    def __init__(self, store: Store, listen: tuple[str, int]) -> None:
        self.store = store
        self.server = Server(listen, self._serve, name="s3-node")

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> StorageNode:
        self.server.start()
        return self

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> StorageNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve_handed_in(self, sock: socket.socket, preread: bytes, app_state: bytes,
                        give_back: Callable[[socket.socket, bytes, bytes], None]) -> None:
        """Serve one offloaded GET on a client socket, then give the socket back.

        `preread` (bytes the gateway read past the request, e.g. a pipelined next request)
        goes back unchanged. `give_back(sock, preread, app_state)` returns the socket to the
        gateway; app_state says whether the response was sent, so the gateway can serve it
        itself if not.
        """
        conn = HttpConnection(sock, preread)
        try:
            state = ServeState.from_bytes(app_state)
            send_object(conn, self.store, state)
            log.debug("served handed-in GET %s/%s [%d+%d]", state.bucket, state.key,
                      state.start, state.length)
            result: dict[str, object] = {"served": True}
        except (S3Error, ValueError) as e:
            log.warning("handed-in GET not served: %s", e)
            result = {"served": False, "reason": str(e)}
        done = json.dumps(result).encode()
        if not conn.ktls:
            give_back(sock, conn.take_buffer(), done)
            return
        for attempt in range(1, GIVE_BACK_ATTEMPTS + 1):
            try:
                if not settle(conn, ACK_TIMEOUT_S):
                    log.debug("client ended the TLS session on the node")
                    conn.close(fin=True)  # the agent ends the flow once the socket is gone
                    return
            except (ConnectionClosed, OSError) as e:
                log.warning("handed-in TLS connection dropped: %s", e)
                conn.close()
                return
            rest = conn.take_buffer()
            try:
                give_back(sock, rest, done)
                return
            except GiveBackRefused as e:
                conn.buf[:0] = rest
                log.info("give-back %d/%d refused (%s): reading what the client sent",
                         attempt, GIVE_BACK_ATTEMPTS, e)
        log.warning("handed-in TLS connection never became quiescent: closing it")
        conn.close(fin=True)

    def _serve(self, sock: socket.socket) -> None:
        conn = HttpConnection(sock)
        try:
            while True:
                req = conn.read_request()
                if req is None:
                    return
                self._handle(conn, req)
                if not req.keep_alive:
                    return
        except (ConnectionClosed, HttpError, OSError) as e:
            log.debug("node connection ended: %s", e)
        finally:
            sock.close()

    def _handle(self, conn: HttpConnection, req: Request) -> None:
        path = req.path
        if not path.startswith(API):
            raise HttpError(f"not an internal API path: {path[:100]!r}")
        parts = [unquote(p) for p in path[len(API):].split("/")]
        query = dict(parse_qsl(req.query, keep_blank_values=True))
        length = int(req.header("content-length", "0") or 0)
        body = read_length(conn, length)
        try:
            try:
                self._route(conn, req.method, parts, query, req, body)
            except ValueError as e:  # bad JSON or numbers from the gateway
                raise S3Error("InvalidRequest", f"bad internal request: {e}") from None
        except S3Error as e:
            for _ in body:  # keep the connection usable
                pass
            _error_response(conn, e)

    def _route(self, conn: HttpConnection, method: str, parts: list[str],
               query: dict[str, str], req: Request, body: Any) -> None:
        store = self.store
        kind, args = parts[0], parts[1:]
        if kind == "buckets" and not args and method == "GET":
            _json_response(conn, store.buckets())
        elif kind == "buckets" and len(args) == 1:
            bucket = args[0]
            if method == "PUT":
                _json_response(conn, {"created": store.create_bucket(bucket)})
            elif method == "DELETE":
                store.delete_bucket(bucket)
                _json_response(conn, {})
            elif method == "HEAD":
                if not store.has_bucket(bucket):
                    raise S3Error("NoSuchBucket", resource=bucket)
                conn.send(response_head(200, [("Content-Length", "0")]))
            else:
                raise S3Error("MethodNotAllowed")
        elif kind == "list" and len(args) == 1 and method == "GET":
            metas = store.list_objects(args[0], query.get("prefix", ""),
                                       query.get("start_after", ""))
            _json_response(conn, [json.loads(m.to_json()) for m in metas])
        elif kind == "objects" and len(args) == 2:
            self._object(conn, method, args[0], args[1], req, body)
        elif kind == "uploads" and args:
            self._upload(conn, method, args, query, req, body)
        else:
            raise S3Error("InvalidRequest", f"unknown internal call {method} {'/'.join(parts)}")

    def _object(self, conn: HttpConnection, method: str, bucket: str, key: str, req: Request,
                body: Any) -> None:
        store = self.store
        if method == "PUT":
            meta_in = json.loads(req.header("x-xo-meta") or "{}")
            meta = store.put(bucket, key, body, str(meta_in.get("content_type", "")),
                             dict(meta_in.get("user_meta", {})))
            conn.send(response_head(200, [_meta_header(meta), ("Content-Length", "0")]))
        elif method == "HEAD":
            meta = store.head(bucket, key)
            conn.send(response_head(200, [_meta_header(meta), ("Content-Length", "0")]))
        elif method == "GET":
            meta = store.head(bucket, key)
            start, length = 0, meta.size
            if rng := req.header("x-xo-range"):
                start_text, _, length_text = rng.partition(",")
                start, length = int(start_text), int(length_text)
            etag = req.header("x-xo-if-match") or meta.etag
            head = response_head(200, [_meta_header(meta), ("Content-Length", str(length))])
            send_object(conn, store, ServeState(bucket, key, etag, start, length, head))
        elif method == "DELETE":
            _json_response(conn, {"deleted": store.delete(bucket, key)})
        else:
            raise S3Error("MethodNotAllowed")

    def _upload(self, conn: HttpConnection, method: str, args: list[str],
                query: dict[str, str], req: Request, body: Any) -> None:
        store = self.store
        upload_id = args[0]
        bucket, key = query.get("bucket", ""), query.get("key", "")
        if method == "POST" and len(args) == 1:
            meta_in = json.loads(req.header("x-xo-meta") or "{}")
            store.create_upload(upload_id, bucket, key, str(meta_in.get("content_type", "")),
                                dict(meta_in.get("user_meta", {})))
            _json_response(conn, {})
        elif method == "PUT" and len(args) == 2 and args[1].isdigit():
            meta = store.put_part(upload_id, bucket, key, int(args[1]), body)
            conn.send(response_head(200, [_meta_header(meta), ("Content-Length", "0")]))
        elif method == "POST" and args[1:] == ["complete"]:
            parts = [(int(n), str(e)) for n, e in json.loads(b"".join(body))]
            meta = store.complete(upload_id, bucket, key, parts, MIN_PART_SIZE)
            conn.send(response_head(200, [_meta_header(meta), ("Content-Length", "0")]))
        elif method == "DELETE" and len(args) == 1:
            store.abort(upload_id, bucket, key)
            _json_response(conn, {})
        else:
            raise S3Error("InvalidRequest", "unknown upload call")

