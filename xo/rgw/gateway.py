"""The S3 gateway: authenticates and parses S3 requests, places objects on storage nodes, and
serves GETs by proxying or, above a size threshold, by offloading the client's connection to
the node that holds the object (which sends the bytes itself and gives the connection back).

With [tls] the gateway speaks HTTPS through xo.tls.TlsFrontend: a user-space handshake, then
kernel TLS, so a connection can still be offloaded (the agents carry the kTLS state and the
node's plaintext is encrypted by its kernel). Where the kernel has no kTLS, or the connection
is not quiescent, the GET is proxied and the reason counted in `stats.kept_local`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import socket
import ssl
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import parse_qsl, unquote

from xo.rgw import s3xml
from xo.rgw.body import SPOOL_IN_MEMORY, Body, has_body, receive
from xo.rgw.config import ConfigError, S3Config
from xo.rgw.errors import S3Error
from xo.rgw.http import (
    ConnectionClosed,
    HttpConnection,
    HttpError,
    Request,
    Server,
    response_head,
)
from xo.rgw.node import ServeState
from xo.rgw.nodeclient import NodeClient, NodeUnavailable, object_path
from xo.rgw.offload import Offloader, OffloadUnknown
from xo.rgw.placement import rank
from xo.rgw.sigv4 import AuthResult, Verifier
from xo.rgw.store import ObjectMeta, check_bucket_name, check_key
from xo.tls import HandshakeError, ServerTls, TlsFrontend, TlsRefusedError

log = logging.getLogger(__name__)

SERVER = "xo-s3"
OWNER = "xo"
REGION = "us-east-1"
DEFAULT_MAX_KEYS = 1000
# Appended to a common prefix to make a marker that sorts after every key under it.
AFTER_PREFIX = "\U0010ffff"
# A rejected request's body up to this size is read and dropped to keep the connection.
DRAIN_LIMIT = 1024 * 1024
RECV_CHUNK = 64 * 1024
# Query parameters that select an S3 feature this gateway does not implement.
UNSUPPORTED_SUBRESOURCES = {
    "acl", "analytics", "cors", "encryption", "intelligent-tiering", "inventory", "legal-hold",
    "lifecycle", "logging", "metrics", "notification", "object-lock", "ownershipControls",
    "policy", "policyStatus", "publicAccessBlock", "replication", "requestPayment",
    "restore", "retention", "select", "tagging", "torrent", "versioning", "versions",
    "website", "accelerate", "attributes",
}
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


@dataclass
class Exchange:
    """One request in flight: what was parsed, and whether its body is still unread."""

    conn: HttpConnection
    req: Request
    request_id: str
    query: dict[str, str]
    body_pending: bool
    auth: AuthResult | None = None


@dataclass
class Stats:
    """GETs by how they were served (counted under a lock: connection threads race).

    `kept_local`: GETs big enough to offload that stayed here because of their TLS
    connection, by reason (xo.tls.TlsRefusedError words: no-ktls, send-queue-unacked, ...).
    `tls_failed`: HTTPS connections closed because their handshake failed.
    """

    offloaded: int = 0
    proxied: int = 0
    offload_refused: int = 0
    tls_failed: int = 0
    kept_local: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)

    def keep_local(self, reason: str) -> None:
        with self.lock:
            self.kept_local[reason] += 1


class Gateway:
    """An S3 endpoint on `config.listen` in front of `config.nodes`."""

    def __init__(self, config: S3Config, offloader: Offloader | None = None,
                 listen: tuple[str, int] | None = None) -> None:
        self.config = config
        self.verifier = Verifier(config.keys)
        self.clients = [NodeClient(n, config.connect_timeout, config.io_timeout)
                        for n in config.nodes]
        self._by_name = {c.name: c for c in self.clients}
        self.offloader = offloader
        self.stats = Stats()
        self.tls: TlsFrontend | None = None
        if config.tls is not None:
            self.tls = TlsFrontend(ServerTls(config.tls.cert, config.tls.key,
                                             timeout=config.tls.handshake_timeout))
            try:  # a bad certificate or key fails here, not per client
                self.tls.config.context()
            except OSError as e:  # ssl.SSLError included
                raise ConfigError(f"tls: cannot load certificate {config.tls.cert} with key "
                                  f"{config.tls.key}: {e}") from None
        self.server = Server(listen or config.listen, self._serve, name="s3-gateway")

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def start(self) -> Gateway:
        self.server.start()
        return self

    def close(self) -> None:
        self.server.close()
        for c in self.clients:
            c.close()
        if self.offloader is not None:
            self.offloader.close()

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    # --- connection loop -------------------------------------------------------------------
    def _serve(self, sock: socket.socket) -> None:
        if self.tls is not None:
            tls_sock = self._handshake(sock)
            if tls_sock is None:
                return
            self.server.adopt(tls_sock)
            sock = tls_sock
        conn: HttpConnection | None = HttpConnection(sock)
        try:
            while conn is not None:
                req = conn.read_request()
                if req is None:
                    break
                conn = self._exchange(conn, req)
        except (ConnectionClosed, HttpError, OSError) as e:
            log.debug("client connection ended: %s", e)
        finally:
            if conn is not None:
                conn.close()

    def _handshake(self, sock: socket.socket) -> socket.socket | None:
        """TLS server handshake on a fresh client: the socket to serve HTTP on (kTLS, or an
        ssl.SSLSocket where the kernel has no kTLS), or None after a failed handshake (the
        client, e.g. one speaking plain HTTP, gets a FIN, not a reset)."""
        if self.tls is None:
            raise S3Error("InternalError", "TLS handshake without a TLS configuration")
        timeout = self.tls.config.timeout
        sock.settimeout(timeout)
        # ssl closes its descriptor when the handshake fails: a second one keeps the
        # connection open until _close_gently has ended it with a FIN.
        spare = sock.dup()
        try:
            served = self.tls.accept(sock)
        except (HandshakeError, OSError) as e:  # ssl.SSLError is an OSError
            self.stats.count("tls_failed")
            log.debug("TLS handshake failed: %s", e)
            sock.close()
            _close_gently(spare, timeout)
            return None
        spare.close()
        served.settimeout(None)
        return served

    def _offload_allowed(self, conn: HttpConnection) -> bool:
        """Whether this connection's TLS (if any) lets it move; else count the reason."""
        if self.tls is None:
            return True
        if isinstance(conn.sock, ssl.SSLSocket):  # user-space TLS: the kernel has no kTLS
            self.stats.keep_local(TlsRefusedError.NO_KTLS)
            return False
        why = self.tls.offloadable(conn.sock)
        if why is None:
            return True
        # TlsRefusedError's text is "<reason word>: <explanation>"
        self.stats.keep_local(why.partition(":")[0])
        return False

    def _exchange(self, conn: HttpConnection, req: Request) -> HttpConnection | None:
        """Serve one request; the connection to continue on, or None when it is closed or
        no longer ours (offloaded and not returned)."""
        ex = Exchange(conn, req, uuid.uuid4().hex[:16].upper(),
                      dict(parse_qsl(req.query, keep_blank_values=True)), has_body(req))
        try:
            result = self._dispatch(ex)
        except S3Error as e:
            return self._send_error(ex, e)
        except NodeUnavailable as e:
            log.warning("%s", e)
            return self._send_error(ex, S3Error("ServiceUnavailable", str(e)))
        if result is None or not req.keep_alive or ex.body_pending:
            if result is not None:
                result.close()
            return None
        return result

    def _send_error(self, ex: Exchange, err: S3Error) -> HttpConnection | None:
        keep = ex.req.keep_alive
        if ex.body_pending:
            keep = keep and self._drain(ex)
        body = err.to_xml(ex.request_id) if ex.req.method != "HEAD" else b""
        headers = [("Content-Type", "application/xml"), ("x-amz-request-id", ex.request_id),
                   ("Server", SERVER), ("Content-Length", str(len(body)))]
        if err.code == "InvalidRange":
            headers.append(("Content-Range", "bytes */*"))
        if not keep:
            headers.append(("Connection", "close"))
        ex.conn.send(response_head(err.status, headers) + body)
        if keep:
            return ex.conn
        ex.conn.close(fin=True)  # FIN after the response
        return None

    def _drain(self, ex: Exchange) -> bool:
        """Read and drop a small unread body (never after the client waits for 100-continue)."""
        length = ex.req.header("content-length")
        expect = (ex.req.header("expect") or "").lower()
        if ex.req.header("transfer-encoding") or expect == "100-continue" or length is None:
            return False
        if not length.isdigit() or int(length) > DRAIN_LIMIT:
            return False
        ex.conn.read_exact(int(length))
        ex.body_pending = False
        return True

    def _reply(self, ex: Exchange, status: int, body: bytes = b"",
               headers: list[tuple[str, str]] | None = None,
               content_type: str = "application/xml") -> HttpConnection:
        h = [("x-amz-request-id", ex.request_id), ("Server", SERVER)]
        if body:
            h.append(("Content-Type", content_type))
        h.extend(headers or [])
        h.append(("Content-Length", str(len(body))))
        ex.conn.send(response_head(status, h) + (b"" if ex.req.method == "HEAD" else body))
        return ex.conn

    def _body(self, ex: Exchange) -> Body:
        """Receive the verified body (answering 100-continue first)."""
        if (ex.req.header("expect") or "").lower() == "100-continue":
            ex.conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if ex.auth is None:
            raise S3Error("AccessDenied")
        body = receive(ex.conn, ex.req, ex.auth)
        ex.body_pending = False
        return body

    # --- routing ---------------------------------------------------------------------------
    def _dispatch(self, ex: Exchange) -> HttpConnection | None:
        req = ex.req
        if not req.path.startswith("/"):
            raise S3Error("InvalidRequest", "only path-style requests are supported")
        ex.auth = self.verifier.verify(req.method, req.path, req.query, req.headers)
        bucket, _, raw_key = req.path[1:].partition("/")
        bucket, key = unquote(bucket), unquote(raw_key)
        if unsupported := UNSUPPORTED_SUBRESOURCES & ex.query.keys():
            raise S3Error("NotImplemented", f"?{sorted(unsupported)[0]} is not supported")
        if not bucket:
            if req.method != "GET":
                raise S3Error("MethodNotAllowed")
            return self._reply(ex, 200, s3xml.list_buckets(self._buckets(), OWNER))
        check_bucket_name(bucket)
        if not key:
            return self._bucket_op(ex, bucket)
        check_key(key)
        return self._object_op(ex, bucket, key)

    def _bucket_op(self, ex: Exchange, bucket: str) -> HttpConnection | None:
        method, q = ex.req.method, ex.query
        handlers: dict[str, Callable[[], HttpConnection | None]] = {
            "PUT": lambda: self._create_bucket(ex, bucket),
            "HEAD": lambda: self._head_bucket(ex, bucket),
            "DELETE": lambda: self._delete_bucket(ex, bucket),
        }
        if method == "GET":
            if "location" in q:
                self._require_bucket(bucket)
                return self._reply(ex, 200, s3xml.location(REGION))
            if "uploads" in q:
                raise S3Error("NotImplemented", "ListMultipartUploads is not supported")
            return self._list(ex, bucket, v2=q.get("list-type") == "2")
        if method == "POST" and "delete" in q:
            return self._delete_objects(ex, bucket)
        if method not in handlers:
            raise S3Error("MethodNotAllowed")
        return handlers[method]()

    def _object_op(self, ex: Exchange, bucket: str, key: str) -> HttpConnection | None:
        method, q = ex.req.method, ex.query
        if method in ("GET", "HEAD"):
            if "uploadId" in q or "partNumber" in q:
                raise S3Error("NotImplemented", "part-level reads are not supported")
            return self._get_object(ex, bucket, key)
        if method == "PUT":
            if ex.req.header("x-amz-copy-source"):
                if "uploadId" in q:
                    raise S3Error("NotImplemented", "UploadPartCopy is not supported")
                return self._copy_object(ex, bucket, key)
            if "uploadId" in q:
                return self._upload_part(ex, bucket, key)
            return self._put_object(ex, bucket, key)
        if method == "POST" and "uploads" in q:
            return self._initiate_upload(ex, bucket, key)
        if method == "POST" and "uploadId" in q:
            return self._complete_upload(ex, bucket, key)
        if method == "DELETE":
            if "uploadId" in q:
                return self._abort_upload(ex, bucket, key)
            self._delete_object(bucket, key)
            return self._reply(ex, 204)
        raise S3Error("MethodNotAllowed")

    # --- node selection --------------------------------------------------------------------
    def _ranked(self, bucket: str, key: str) -> list[NodeClient]:
        """Placement order, with nodes recently seen down moved last."""
        ordered = [self._by_name[n] for n in rank(list(self._by_name), bucket, key)]
        return sorted(ordered, key=lambda c: not c.healthy)

    def _all_nodes(self) -> list[NodeClient]:
        return sorted(self.clients, key=lambda c: not c.healthy)

    # --- buckets ---------------------------------------------------------------------------
    def _buckets(self) -> list[tuple[str, float]]:
        found: dict[str, float] = {}
        reached = False
        for c in self._all_nodes():
            try:
                for name, created in c.buckets():
                    found[name] = min(created, found.get(name, created))
                reached = True
            except NodeUnavailable:
                continue
        if not reached:
            raise S3Error("ServiceUnavailable", "no storage node is reachable")
        return sorted(found.items())

    def _bucket_exists(self, bucket: str) -> bool:
        reached = False
        for c in self._all_nodes():
            try:
                if c.has_bucket(bucket):
                    return True
                reached = True
            except NodeUnavailable:
                continue
        if not reached:
            raise S3Error("ServiceUnavailable", "no storage node is reachable")
        return False

    def _require_bucket(self, bucket: str) -> None:
        if not self._bucket_exists(bucket):
            raise S3Error("NoSuchBucket", resource=bucket)

    def _create_bucket(self, ex: Exchange, bucket: str) -> HttpConnection:
        if self._bucket_exists(bucket):
            raise S3Error("BucketAlreadyOwnedByYou", resource=bucket)
        body = self._body(ex)  # CreateBucketConfiguration: one region, nothing to apply
        body.close()
        created = 0
        for c in self.clients:
            try:
                c.create_bucket(bucket)
                created += 1
            except NodeUnavailable:
                continue
        if not created:
            raise S3Error("ServiceUnavailable", "no storage node is reachable")
        return self._reply(ex, 200, headers=[("Location", f"/{bucket}")])

    def _head_bucket(self, ex: Exchange, bucket: str) -> HttpConnection:
        self._require_bucket(bucket)
        return self._reply(ex, 200)

    def _delete_bucket(self, ex: Exchange, bucket: str) -> HttpConnection:
        self._require_bucket(bucket)
        if self._list_all(bucket, "", ""):
            raise S3Error("BucketNotEmpty", resource=bucket)
        for c in self.clients:
            try:
                c.delete_bucket(bucket)
            except NodeUnavailable:
                continue
            except S3Error as e:
                if e.code != "NoSuchBucket":
                    raise
        return self._reply(ex, 204)

    # --- listing ---------------------------------------------------------------------------
    def _list_all(self, bucket: str, prefix: str, start_after: str) -> list[ObjectMeta]:
        """Every object of the bucket after start_after, merged over the nodes, by key."""
        merged: dict[str, ObjectMeta] = {}
        reached = missing = 0
        for c in self.clients:
            try:
                rows = c.list_objects(bucket, prefix, start_after)
            except NodeUnavailable:
                continue
            except S3Error as e:
                if e.code != "NoSuchBucket":
                    raise
                missing += 1
                continue
            reached += 1
            for m in rows:
                old = merged.get(m.key)
                if old is None or m.mtime > old.mtime:
                    merged[m.key] = m
        if not reached:
            if missing:
                raise S3Error("NoSuchBucket", resource=bucket)
            raise S3Error("ServiceUnavailable", "no storage node is reachable")
        return [merged[k] for k in sorted(merged)]

    def _list(self, ex: Exchange, bucket: str, v2: bool) -> HttpConnection:
        q = ex.query
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        max_keys = _int_param(q, "max-keys", DEFAULT_MAX_KEYS)
        encoding = q.get("encoding-type", "")
        if encoding not in ("", "url"):
            raise S3Error("InvalidArgument", f"bad encoding-type {encoding!r}")
        if v2:
            token = q.get("continuation-token")
            marker = _decode_token(token) if token is not None else q.get("start-after", "")
        else:
            marker = q.get("marker", "")
        entries = self._list_all(bucket, prefix, marker.rstrip(AFTER_PREFIX))
        contents, prefixes, truncated, last = _page(entries, prefix, delimiter, marker, max_keys)
        fields: list[tuple[str, object]] = [("Prefix", prefix)]
        if delimiter:
            fields.append(("Delimiter", delimiter))
        fields += [("MaxKeys", max_keys), ("IsTruncated", "true" if truncated else "false")]
        if encoding:
            fields.append(("EncodingType", encoding))
        if v2:
            fields.append(("KeyCount", len(contents) + len(prefixes)))
            if "continuation-token" in q:
                fields.append(("ContinuationToken", q["continuation-token"]))
            if "start-after" in q:
                fields.append(("StartAfter", q["start-after"]))
            if truncated:
                fields.append(("NextContinuationToken", _encode_token(last)))
        else:
            fields.append(("Marker", marker))
            if truncated and delimiter:
                fields.append(("NextMarker", last))
        return self._reply(ex, 200, s3xml.list_objects(bucket, fields, contents, prefixes,
                                                       encoding == "url"))

    # --- objects ---------------------------------------------------------------------------
    def _locate(self, bucket: str, key: str,
                skip: set[str] | None = None) -> tuple[ObjectMeta, NodeClient]:
        """The object's metadata from the first node that has it, in placement order."""
        no_key = no_bucket = down = 0
        for c in self._ranked(bucket, key):
            if skip and c.name in skip:
                continue
            try:
                return c.head(bucket, key), c
            except NodeUnavailable:
                down += 1
            except S3Error as e:
                if e.code == "NoSuchKey":
                    no_key += 1
                elif e.code == "NoSuchBucket":
                    no_bucket += 1
                else:
                    raise
        if no_bucket and not no_key and (not down or no_bucket >= self.config.replicas):
            raise S3Error("NoSuchBucket", resource=bucket)
        # Writes land on `replicas` reachable nodes: with fewer answers the object may exist.
        if no_key + no_bucket >= self.config.replicas or not down:
            raise S3Error("NoSuchKey", resource=key)
        raise S3Error("ServiceUnavailable", "the nodes that may hold the object are down")

    def _get_object(self, ex: Exchange, bucket: str, key: str) -> HttpConnection | None:
        tried: set[str] = set()
        while True:
            meta, node = self._locate(bucket, key, tried)
            status, start, length, headers = self._prepare_get(ex, meta)
            if ex.req.method == "HEAD" or status == 304 or length == 0:
                return self._send_head(ex, status, headers)
            head = response_head(status, headers)
            state = ServeState(bucket, key, meta.etag, start, length, head)
            try:
                if self._offload_wanted(node, length) and self._offload_allowed(ex.conn):
                    return self._offload_get(ex, node, state)
                return self._proxy_get(ex, node, state)
            except _NodeFailedBeforeHead:  # nothing sent yet: try the next replica
                tried.add(node.name)

    def _prepare_get(self, ex: Exchange,
                     meta: ObjectMeta) -> tuple[int, int, int, list[tuple[str, str]]]:
        """Conditionals and Range: (status, start, length, response headers)."""
        req = ex.req
        headers = [("x-amz-request-id", ex.request_id), ("Server", SERVER),
                   ("ETag", f'"{meta.etag}"'),
                   ("Last-Modified", formatdate(meta.mtime, usegmt=True))]
        status = _conditional(req, meta)
        if status == 304:
            return 304, 0, 0, headers
        headers += [("Accept-Ranges", "bytes"), ("Content-Type", meta.content_type)]
        headers += [(f"x-amz-meta-{k}", v) for k, v in sorted(meta.user_meta.items())]
        overrides = {h: ex.query[p] for p, h in RESPONSE_OVERRIDES.items() if p in ex.query}
        headers = [(k, v) for k, v in headers if k not in overrides] + list(overrides.items())
        start, length = 0, meta.size
        status = 200
        if (rng := req.header("range")) is not None:
            parsed = parse_range(rng, meta.size)
            if parsed is not None:
                start, length = parsed
                status = 206
                headers.append(
                    ("Content-Range", f"bytes {start}-{start + length - 1}/{meta.size}"))
        headers.append(("Content-Length", str(length)))
        return status, start, length, headers

    def _send_head(self, ex: Exchange, status: int,
                   headers: list[tuple[str, str]]) -> HttpConnection:
        if status == 304:
            headers = headers + [("Content-Length", "0")]
        ex.conn.send(response_head(status, headers))
        return ex.conn

    def _offload_wanted(self, node: NodeClient, length: int) -> bool:
        off = self.config.offload
        return (self.offloader is not None and off.enabled and length >= off.threshold
                and bool(node.spec.target))

    def _offload_get(self, ex: Exchange, node: NodeClient,
                     state: ServeState) -> HttpConnection | None:
        """Hand the client to the node; continue on the connection it gives back."""
        offloader = self.offloader
        if offloader is None:
            raise S3Error("InternalError", "offload without an offloader")
        conn = ex.conn
        preread = conn.take_buffer()
        try:
            handoff = offloader.offload(conn.sock, node.spec.target, preread, state.to_bytes(),
                                        expected_bytes=state.length)
        except OffloadUnknown as e:
            log.error("%s; giving up this client connection", e)
            conn.sock.close()  # our copy only: the agent holds the socket
            return None
        if handoff is None:
            self.stats.count("offload_refused")
            conn.buf[:0] = preread
            return self._proxy_get(ex, node, state)
        conn.sock.close()
        log.debug("GET %s/%s offloaded to %s as %s", state.bucket, state.key, node.name, handoff)
        back = offloader.wait_return(handoff, self.config.offload.return_timeout)
        if back is None:
            log.warning("offloaded connection %s did not come back in time", handoff)
            return None
        if back.sock is None:
            log.debug("client closed %s while it was offloaded", handoff)
            self.stats.count("offloaded")
            return None
        self.server.adopt(back.sock)
        returned = HttpConnection(back.sock, back.preread)
        ex.conn = returned
        if _served(back.app_state):
            log.debug("%s came back after the node served it", handoff)
            self.stats.count("offloaded")
            return returned
        log.info("%s came back unserved; proxying", handoff)
        return self._proxy_get(ex, node, state)

    def _proxy_get(self, ex: Exchange, node: NodeClient, state: ServeState) -> HttpConnection:
        headers = {"X-Xo-Range": f"{state.start},{state.length}", "X-Xo-If-Match": state.etag}
        head_sent = False
        try:
            with node.open("GET", object_path(state.bucket, state.key), headers) as resp:
                ex.conn.send(state.head)
                head_sent = True
                for data in node.read_chunks(resp, state.length):
                    ex.conn.send(data)
        except (NodeUnavailable, S3Error) as e:
            if head_sent:
                raise ConnectionClosed(f"node failed in the middle of a GET: {e}") from None
            raise _NodeFailedBeforeHead(str(e)) from None
        self.stats.count("proxied")
        return ex.conn

    def _placed_write(self, bucket: str, key: str,
                      write: Callable[[NodeClient], ObjectMeta]) -> ObjectMeta:
        """Write to `replicas` nodes in placement order, skipping down ones; check quorum."""
        results: list[ObjectMeta] = []
        for c in self._ranked(bucket, key):
            if len(results) == self.config.replicas:
                break
            try:
                try:
                    results.append(write(c))
                except S3Error as e:
                    if e.code != "NoSuchBucket":
                        raise
                    c.create_bucket(bucket)  # the node was down when the bucket was created
                    results.append(write(c))
            except NodeUnavailable as e:
                log.warning("write skips %s", e)
        if len(results) < self.config.write_quorum:
            raise S3Error("ServiceUnavailable",
                          f"only {len(results)} of {self.config.write_quorum} copies written")
        return results[0]

    def _put_object(self, ex: Exchange, bucket: str, key: str) -> HttpConnection:
        self._require_bucket(bucket)
        content_type, user_meta = _object_meta(ex.req)
        body = self._body(ex)
        try:
            meta = self._placed_write(bucket, key, lambda c: c.put(
                bucket, key, body.file, body.size, content_type, user_meta))
        finally:
            body.close()
        if meta.etag != body.md5_hex:
            raise S3Error("InternalError", "storage node stored different bytes")
        return self._reply(ex, 200, headers=[("ETag", f'"{meta.etag}"')])

    def _copy_object(self, ex: Exchange, bucket: str, key: str) -> HttpConnection:
        """CopyObject: read the source from a node that has it, write it like a PUT."""
        source = unquote(ex.req.header("x-amz-copy-source") or "")
        src_path, _, src_query = source.partition("?")
        if src_query:
            raise S3Error("NotImplemented", "versioned copy sources are not supported")
        src_bucket, _, src_key = src_path.lstrip("/").partition("/")
        check_bucket_name(src_bucket)
        check_key(src_key)
        directive = (ex.req.header("x-amz-metadata-directive") or "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", f"bad x-amz-metadata-directive {directive!r}")
        if (src_bucket, src_key) == (bucket, key) and directive == "COPY":
            raise S3Error("InvalidRequest", "This copy request is illegal because it is trying "
                          "to copy an object to itself without changing the object's metadata.")
        self._require_bucket(bucket)
        self._body(ex).close()  # a copy carries no body
        meta, node = self._locate(src_bucket, src_key)
        _copy_conditions(ex.req, meta)
        content_type, user_meta = ((meta.content_type, meta.user_meta) if directive == "COPY"
                                   else _object_meta(ex.req))
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
            with node.open("GET", object_path(src_bucket, src_key),
                           {"X-Xo-If-Match": meta.etag}) as resp:
                for data in node.read_chunks(resp, meta.size):
                    spool.write(data)
            new = self._placed_write(bucket, key, lambda c: c.put(
                bucket, key, spool, meta.size, content_type, user_meta))
        return self._reply(ex, 200, s3xml.copy_result(new.etag, new.mtime))

    def _delete_object(self, bucket: str, key: str) -> None:
        self._require_bucket(bucket)
        reached = 0
        for c in self.clients:  # a copy may sit on any node that took over during a failure
            try:
                c.delete(bucket, key)
                reached += 1
            except NodeUnavailable:
                continue
            except S3Error as e:
                if e.code != "NoSuchBucket":
                    raise
                reached += 1
        if not reached:
            raise S3Error("ServiceUnavailable", "no storage node is reachable")

    def _delete_objects(self, ex: Exchange, bucket: str) -> HttpConnection:
        body = self._body(ex)
        try:
            keys, quiet = s3xml.parse_delete(body.read_all())
        finally:
            body.close()
        deleted, errors = [], []
        for key in keys:
            try:
                check_key(key)
                self._delete_object(bucket, key)
                deleted.append(key)
            except S3Error as e:
                if e.code == "NoSuchBucket":
                    raise
                errors.append((key, e))
            except NodeUnavailable as e:
                errors.append((key, S3Error("ServiceUnavailable", str(e))))
        return self._reply(ex, 200, s3xml.delete_result(deleted, errors, quiet))

    # --- multipart uploads -----------------------------------------------------------------
    def _upload_nodes(self, bucket: str, key: str,
                      call: Callable[[NodeClient], ObjectMeta | None]) -> list[ObjectMeta | None]:
        """Run `call` on every node holding the upload; NoSuchUpload if none does."""
        results: list[ObjectMeta | None] = []
        down = 0
        first_error: S3Error | None = None
        for c in self._ranked(bucket, key):
            try:
                results.append(call(c))
            except NodeUnavailable:
                down += 1
            except S3Error as e:
                if e.code != "NoSuchUpload" and first_error is None:
                    first_error = e
        if results:
            return results
        if first_error is not None:
            raise first_error
        if down:
            raise S3Error("ServiceUnavailable", "the nodes holding the upload are down")
        raise S3Error("NoSuchUpload")

    def _upload_id(self, ex: Exchange) -> str:
        upload_id = ex.query.get("uploadId", "")
        if len(upload_id) != len(uuid.uuid4().hex) or not upload_id.isalnum():
            raise S3Error("NoSuchUpload", resource=upload_id)
        return upload_id

    def _initiate_upload(self, ex: Exchange, bucket: str, key: str) -> HttpConnection:
        self._require_bucket(bucket)
        content_type, user_meta = _object_meta(ex.req)
        self._body(ex).close()
        upload_id = uuid.uuid4().hex

        def create(c: NodeClient) -> ObjectMeta:
            c.create_upload(upload_id, bucket, key, content_type, user_meta)
            return ObjectMeta(key, 0, "", 0.0)

        self._placed_write(bucket, key, create)
        return self._reply(ex, 200, s3xml.initiate_upload(bucket, key, upload_id))

    def _upload_part(self, ex: Exchange, bucket: str, key: str) -> HttpConnection:
        upload_id = self._upload_id(ex)
        number = _int_param(ex.query, "partNumber", 0)
        body = self._body(ex)
        try:
            results = self._upload_nodes(bucket, key, lambda c: c.put_part(
                upload_id, bucket, key, number, body.file, body.size))
        finally:
            body.close()
        if any(m is not None and m.etag != body.md5_hex for m in results):
            raise S3Error("InternalError", "storage node stored different bytes")
        return self._reply(ex, 200, headers=[("ETag", f'"{body.md5_hex}"')])

    def _complete_upload(self, ex: Exchange, bucket: str, key: str) -> HttpConnection:
        upload_id = self._upload_id(ex)
        body = self._body(ex)
        try:
            parts = s3xml.parse_complete(body.read_all())
        finally:
            body.close()
        results = self._upload_nodes(bucket, key,
                                     lambda c: c.complete(upload_id, bucket, key, parts))
        meta = next(m for m in results if m is not None)
        doc = s3xml.complete_upload(f"/{bucket}/{key}", bucket, key, meta.etag)
        return self._reply(ex, 200, doc)

    def _abort_upload(self, ex: Exchange, bucket: str, key: str) -> HttpConnection:
        upload_id = self._upload_id(ex)

        def abort(c: NodeClient) -> None:
            c.abort(upload_id, bucket, key)

        self._upload_nodes(bucket, key, abort)
        return self._reply(ex, 204)


def _close_gently(sock: socket.socket, timeout: float) -> None:
    """Close after a failed handshake with a FIN: closing with unread input (a plain HTTP
    request the handshake did not consume) would send a reset. Reads what the client still
    sends until it closes too, for at most `timeout` seconds and DRAIN_LIMIT bytes."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        drained = 0
        while drained <= DRAIN_LIMIT and (data := sock.recv(RECV_CHUNK)):
            drained += len(data)
    except OSError:
        pass
    finally:
        sock.close()


class _NodeFailedBeforeHead(Exception):
    """The node failed before any response byte went to the client: try another replica."""


def _served(app_state: bytes) -> bool:
    """Whether the node's give-back state says it sent the response."""
    try:
        state = json.loads(app_state or b"{}")
    except ValueError:
        return False
    return isinstance(state, dict) and state.get("served") is True


def _int_param(q: dict[str, str], name: str, default: int) -> int:
    text = q.get(name)
    if text is None:
        return default
    if not text.isdigit():
        raise S3Error("InvalidArgument", f"{name} must be a non-negative integer")
    return min(int(text), DEFAULT_MAX_KEYS) if name == "max-keys" else int(text)


def _encode_token(marker: str) -> str:
    return base64.urlsafe_b64encode(marker.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise S3Error("InvalidArgument", "bad continuation token") from None


def _page(entries: list[ObjectMeta], prefix: str, delimiter: str, marker: str,
          max_keys: int) -> tuple[list[ObjectMeta], list[str], bool, str]:
    """One page of a listing: (contents, common prefixes, truncated, last key or prefix).

    A common prefix as marker resumes after every key under it (prefix + AFTER_PREFIX).
    """
    contents: list[ObjectMeta] = []
    prefixes: list[str] = []
    last = marker
    for m in entries:
        if m.key <= marker:
            continue
        if delimiter and (i := m.key.find(delimiter, len(prefix))) >= 0:
            common = m.key[: i + len(delimiter)]
            if prefixes and prefixes[-1] == common or common + AFTER_PREFIX <= marker:
                continue
            if len(contents) + len(prefixes) >= max_keys:
                return contents, prefixes, True, last
            prefixes.append(common)
            last = common + AFTER_PREFIX
            continue
        if len(contents) + len(prefixes) >= max_keys:
            return contents, prefixes, True, last
        contents.append(m)
        last = m.key
    return contents, prefixes, False, last


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range as (start, length); None to serve the whole object.

    Raises InvalidRange when the range is valid but starts past the end of the object.
    """
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise S3Error("InvalidRange")
        return max(0, size - n), min(n, size)
    start = int(first)
    if last and not last.isdigit():
        return None
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise S3Error("InvalidRange")
    end = min(end, size - 1)
    return start, end - start + 1


def _http_time(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError):
        return None


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/").strip('"') for t in header.split(",")]
    return "*" in tags or etag in tags


def _conditional(req: Request, meta: ObjectMeta) -> int:
    """RFC 7232 evaluation order: 412 (raised), 304, or 200 to go on."""
    mtime = int(meta.mtime)
    if_match = req.header("if-match")
    if if_match is not None:
        if not _etag_matches(if_match, meta.etag):
            raise S3Error("PreconditionFailed")
    elif (t := _http_time(req.header("if-unmodified-since"))) is not None and mtime > t:
        raise S3Error("PreconditionFailed")
    if_none = req.header("if-none-match")
    if if_none is not None:
        if _etag_matches(if_none, meta.etag):
            return 304
    elif (t := _http_time(req.header("if-modified-since"))) is not None and mtime <= t:
        return 304
    return 200


def _copy_conditions(req: Request, meta: ObjectMeta) -> None:
    """x-amz-copy-source-if-*: the RFC 7232 rules on the source; any failure is a 412."""
    prefix = "x-amz-copy-source-"
    conditions = {name.removeprefix(prefix): values for name, values in req.headers.items()
                  if name.startswith(prefix + "if-")}
    if conditions and _conditional(Request("GET", "", "HTTP/1.1", conditions), meta) == 304:
        raise S3Error("PreconditionFailed")


def _object_meta(req: Request) -> tuple[str, dict[str, str]]:
    content_type = req.header("content-type") or "binary/octet-stream"
    user = {name.removeprefix("x-amz-meta-"): values[0] for name, values in req.headers.items()
            if name.startswith("x-amz-meta-")}
    return content_type, user
