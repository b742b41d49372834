"""The gateway's client for one storage node: pooled keep-alive HTTP with hard timeouts.

A node that does not answer costs at most the connect timeout once; it is then marked down
for a while so requests try the other replicas first instead of waiting on it again.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import quote, urlencode

from xo.rgw.config import NodeSpec
from xo.rgw.errors import CODES, S3Error
from xo.rgw.node import API
from xo.rgw.store import ObjectMeta

BLOCK_SIZE = 1024 * 1024
# After a failure the node is tried last for this long.
DOWN_SECONDS = 5.0
MAX_IDLE = 16


class NodeUnavailable(Exception):
    """The node could not be reached or broke the connection."""


def object_path(bucket: str, key: str) -> str:
    return f"{API}objects/{quote(bucket, safe='')}/{quote(key, safe='')}"


class NodeClient:
    def __init__(self, spec: NodeSpec, connect_timeout: float, io_timeout: float) -> None:
        self.spec = spec
        self._connect_timeout = connect_timeout
        self._io_timeout = io_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self.down_until = 0.0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self.down_until

    def _connect(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        host, port = self.spec.address.sockaddr()
        conn = http.client.HTTPConnection(host, port, timeout=self._connect_timeout,
                                          blocksize=BLOCK_SIZE)
        try:
            conn.connect()
        except OSError as e:
            self.down_until = time.monotonic() + DOWN_SECONDS
            raise NodeUnavailable(f"node {self.name}: {e}") from None
        if conn.sock is not None:
            conn.sock.settimeout(self._io_timeout)
        return conn, False

    def _release(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    @contextlib.contextmanager
    def open(self, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | IO[bytes] | None = None) -> Iterator[http.client.HTTPResponse]:
        """Send a request and yield the response (status checked); its body must be read."""
        headers = dict(headers or {})
        if body is None:
            headers.setdefault("Content-Length", "0")
        for attempt in range(2):
            conn, reused = self._connect()
            try:
                if body is not None and not isinstance(body, bytes):
                    body.seek(0)
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # a stale keep-alive connection: retry once on a fresh one
                self.down_until = time.monotonic() + DOWN_SECONDS
                raise NodeUnavailable(f"node {self.name}: {e}") from None
            break
        try:
            if resp.status >= 300:
                code = resp.getheader("X-Xo-Error") or "InternalError"
                try:
                    message = resp.read().decode(errors="replace") or None
                except (OSError, http.client.HTTPException) as e:
                    raise NodeUnavailable(f"node {self.name}: {e}") from None
                raise S3Error(code if code in CODES else "InternalError", message)
            yield resp
        finally:
            if resp.isclosed() and not resp.will_close:
                self._release(conn)
            else:
                conn.close()

    def read_chunks(self, resp: http.client.HTTPResponse, size: int) -> Iterator[bytes]:
        """The response body in pieces; a node failure mid-body raises NodeUnavailable."""
        left = size
        while left > 0:
            try:
                data = resp.read(min(left, BLOCK_SIZE))
            except (OSError, http.client.HTTPException) as e:
                self.down_until = time.monotonic() + DOWN_SECONDS
                raise NodeUnavailable(f"node {self.name}: {e}") from None
            if not data:
                raise NodeUnavailable(f"node {self.name}: body ended early")
            left -= len(data)
            yield data

    def call(self, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | IO[bytes] | None = None) -> tuple[http.client.HTTPResponse, bytes]:
        with self.open(method, path, headers, body) as resp:
            try:
                return resp, resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise NodeUnavailable(f"node {self.name}: {e}") from None

    def json(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Any:
        _, data = self.call(method, path, headers, body)
        return json.loads(data) if data else None

    # --- typed calls -----------------------------------------------------------------------
    def buckets(self) -> list[tuple[str, float]]:
        return [(str(n), float(t)) for n, t in self.json("GET", f"{API}buckets")]

    def create_bucket(self, bucket: str) -> bool:
        return bool(self.json("PUT", f"{API}buckets/{quote(bucket, safe='')}")["created"])

    def delete_bucket(self, bucket: str) -> None:
        self.call("DELETE", f"{API}buckets/{quote(bucket, safe='')}")

    def has_bucket(self, bucket: str) -> bool:
        try:
            self.call("HEAD", f"{API}buckets/{quote(bucket, safe='')}")
        except S3Error as e:
            if e.code == "NoSuchBucket":
                return False
            raise
        return True

    def list_objects(self, bucket: str, prefix: str, start_after: str) -> list[ObjectMeta]:
        q = urlencode({"prefix": prefix, "start_after": start_after})
        rows = self.json("GET", f"{API}list/{quote(bucket, safe='')}?{q}")
        return [ObjectMeta.from_dict(r) for r in rows]

    def head(self, bucket: str, key: str) -> ObjectMeta:
        resp, _ = self.call("HEAD", object_path(bucket, key))
        return _meta(resp)

    def put(self, bucket: str, key: str, body: IO[bytes], size: int, content_type: str,
            user_meta: dict[str, str]) -> ObjectMeta:
        headers = {"Content-Length": str(size), "X-Xo-Meta": _meta_json(content_type, user_meta)}
        resp, _ = self.call("PUT", object_path(bucket, key), headers, body)
        return _meta(resp)

    def delete(self, bucket: str, key: str) -> bool:
        return bool(self.json("DELETE", object_path(bucket, key))["deleted"])

    def _upload_path(self, upload_id: str, bucket: str, key: str, suffix: str = "") -> str:
        q = urlencode({"bucket": bucket, "key": key})
        return f"{API}uploads/{upload_id}{suffix}?{q}"

    def create_upload(self, upload_id: str, bucket: str, key: str, content_type: str,
                      user_meta: dict[str, str]) -> None:
        self.call("POST", self._upload_path(upload_id, bucket, key),
                  {"X-Xo-Meta": _meta_json(content_type, user_meta)})

    def put_part(self, upload_id: str, bucket: str, key: str, number: int, body: IO[bytes],
                 size: int) -> ObjectMeta:
        resp, _ = self.call("PUT", self._upload_path(upload_id, bucket, key, f"/{number}"),
                            {"Content-Length": str(size)}, body)
        return _meta(resp)

    def complete(self, upload_id: str, bucket: str, key: str,
                 parts: list[tuple[int, str]]) -> ObjectMeta:
        body = json.dumps(parts).encode()
        resp, _ = self.call("POST", self._upload_path(upload_id, bucket, key, "/complete"),
                            {"Content-Length": str(len(body))}, body)
        return _meta(resp)

    def abort(self, upload_id: str, bucket: str, key: str) -> None:
        self.call("DELETE", self._upload_path(upload_id, bucket, key))


def _meta_json(content_type: str, user_meta: dict[str, str]) -> str:
    return json.dumps({"content_type": content_type, "user_meta": user_meta})


def _meta(resp: http.client.HTTPResponse) -> ObjectMeta:
    text = resp.getheader("X-Xo-Meta")
    if text is None:
        raise S3Error("InternalError", "storage node sent no object metadata")
    return ObjectMeta.from_json(text)
