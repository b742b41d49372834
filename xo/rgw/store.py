"""A storage node's durable object store on its local file system.

Each object is one immutable file: the data, then its metadata as JSON, then the JSON length
and a magic number. It is written to a temporary file, fsync'ed, renamed over the old version
and the directory fsync'ed, so an acknowledged PUT survives a crash and a reader sees either
the old or the new object, never a mix. Multipart parts are files of the same format under
uploads/; completing an upload concatenates them into a new object the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from xo.rgw.errors import S3Error

MAGIC = b"XOS3OBJ1"
TRAILER = struct.Struct("!I8s")
MAX_META_BYTES = 1024 * 1024
COPY_CHUNK = 1024 * 1024
UPLOAD_ID_RE = re.compile(r"[0-9a-f]{32}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
MAX_KEY_BYTES = 1024
MAX_PARTS = 10000


@dataclass
class ObjectMeta:
    """What S3 reports about an object; `etag` is unquoted hex (with -N for multipart)."""

    key: str
    size: int
    etag: str
    mtime: float
    content_type: str = "binary/octet-stream"
    user_meta: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectMeta:
        try:
            return cls(
                key=str(d["key"]),
                size=int(d["size"]),
                etag=str(d["etag"]),
                mtime=float(d["mtime"]),
                content_type=str(d.get("content_type", "binary/octet-stream")),
                user_meta={str(k): str(v) for k, v in dict(d.get("user_meta", {})).items()},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad object metadata: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> ObjectMeta:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"bad object metadata: {e}") from None


def check_bucket_name(name: str) -> None:
    if not BUCKET_RE.fullmatch(name) or ".." in name:
        raise S3Error("InvalidBucketName", resource=name)


def check_key(key: str) -> None:
    if not key:
        raise S3Error("InvalidArgument", "empty object key")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise S3Error("KeyTooLongError")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_meta(f: BinaryIO) -> ObjectMeta:
    """The metadata at the end of an object file (the data is bytes 0..size)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    if end < TRAILER.size:
        raise ValueError("object file too short")
    f.seek(end - TRAILER.size)
    length, magic = TRAILER.unpack(f.read(TRAILER.size))
    if magic != MAGIC or length > MAX_META_BYTES or length > end - TRAILER.size:
        raise ValueError("not an object file")
    f.seek(end - TRAILER.size - length)
    meta = ObjectMeta.from_json(f.read(length))
    if meta.size != end - TRAILER.size - length:
        raise ValueError("object size does not match its file")
    f.seek(0)
    return meta


class Store:
    """Buckets are directories under root/buckets; objects are named by the hash of the key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._buckets = root / "buckets"
        self._uploads = root / "uploads"
        self._tmp = root / "tmp"
        for d in (self._buckets, self._uploads, self._tmp):
            d.mkdir(parents=True, exist_ok=True)
        # Temporary files of writes a crash interrupted were never acknowledged.
        for stale in self._tmp.iterdir():
            stale.unlink()

    # --- buckets ---------------------------------------------------------------------------
    def _bucket_dir(self, bucket: str) -> Path:
        check_bucket_name(bucket)
        return self._buckets / bucket

    def has_bucket(self, bucket: str) -> bool:
        return self._bucket_dir(bucket).is_dir()

    def _require_bucket(self, bucket: str) -> Path:
        d = self._bucket_dir(bucket)
        if not d.is_dir():
            raise S3Error("NoSuchBucket", resource=bucket)
        return d

    def buckets(self) -> list[tuple[str, float]]:
        return sorted((d.name, d.stat().st_mtime) for d in self._buckets.iterdir() if d.is_dir())

    def create_bucket(self, bucket: str) -> bool:
        """Create durably; False when it already existed."""
        d = self._bucket_dir(bucket)
        try:
            d.mkdir()
        except FileExistsError:
            return False
        _fsync_dir(self._buckets)
        return True

    def delete_bucket(self, bucket: str) -> None:
        d = self._require_bucket(bucket)
        if any(d.iterdir()):
            raise S3Error("BucketNotEmpty", resource=bucket)
        d.rmdir()
        _fsync_dir(self._buckets)

    # --- objects ---------------------------------------------------------------------------
    def _object_path(self, bucket: str, key: str) -> Path:
        check_key(key)
        return self._require_bucket(bucket) / (hashlib.sha256(key.encode()).hexdigest() + ".obj")

    def _write(self, chunks: Iterable[bytes], meta: ObjectMeta, dest: Path) -> ObjectMeta:
        """Write data + metadata to a temporary file, fsync, rename to dest, fsync the dir."""
        tmp = self._tmp / uuid.uuid4().hex
        md5 = hashlib.md5()
        size = 0
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    md5.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                meta.size = size
                if not meta.etag:
                    meta.etag = md5.hexdigest()
                blob = meta.to_json().encode()
                f.write(blob)
                f.write(TRAILER.pack(len(blob), MAGIC))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)
        return meta

    def put(self, bucket: str, key: str, chunks: Iterable[bytes], content_type: str,
            user_meta: dict[str, str]) -> ObjectMeta:
        dest = self._object_path(bucket, key)
        meta = ObjectMeta(key, 0, "", time.time(), content_type, user_meta)
        return self._write(chunks, meta, dest)

    def open(self, bucket: str, key: str) -> tuple[ObjectMeta, BinaryIO]:
        """The object's metadata and its file, positioned at the data (caller closes)."""
        path = self._object_path(bucket, key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        except FileNotFoundError:
            raise S3Error("NoSuchKey", resource=key) from None
        try:
            return _read_meta(f), f
        except ValueError as e:
            f.close()
            raise S3Error("InternalError", f"corrupt object {key!r}: {e}") from None

    def head(self, bucket: str, key: str) -> ObjectMeta:
        meta, f = self.open(bucket, key)
        f.close()
        return meta

    def delete(self, bucket: str, key: str) -> bool:
        path = self._object_path(bucket, key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(path.parent)
        return True

    def list_objects(self, bucket: str, prefix: str = "",
                     start_after: str = "") -> list[ObjectMeta]:
        """Objects whose key starts with prefix and sorts after start_after, by key."""
        out = []
        for path in self._require_bucket(bucket).iterdir():
            try:
                with open(path, "rb") as f:
                    meta = _read_meta(f)
            except (FileNotFoundError, ValueError):
                continue  # deleted meanwhile, or not an object file
            if meta.key.startswith(prefix) and meta.key > start_after:
                out.append(meta)
        out.sort(key=lambda m: m.key.encode())
        return out

    # --- multipart uploads -----------------------------------------------------------------
    def _upload_dir(self, upload_id: str) -> Path:
        if not UPLOAD_ID_RE.fullmatch(upload_id):
            raise S3Error("NoSuchUpload", resource=upload_id)
        return self._uploads / upload_id

    def create_upload(self, upload_id: str, bucket: str, key: str, content_type: str,
                      user_meta: dict[str, str]) -> None:
        self._object_path(bucket, key)  # validates bucket and key
        d = self._upload_dir(upload_id)
        d.mkdir(exist_ok=True)
        info = ObjectMeta(key, 0, "", time.time(), content_type, user_meta)
        self._write([], info, d / "upload.obj")
        (d / "bucket").write_text(bucket)

    def _upload_info(self, upload_id: str, bucket: str, key: str) -> tuple[Path, ObjectMeta]:
        d = self._upload_dir(upload_id)
        try:
            with open(d / "upload.obj", "rb") as f:
                info = _read_meta(f)
            owner = (d / "bucket").read_text()
        except (FileNotFoundError, ValueError):
            raise S3Error("NoSuchUpload", resource=upload_id) from None
        if owner != bucket or info.key != key:
            raise S3Error("NoSuchUpload", resource=upload_id)
        return d, info

    def put_part(self, upload_id: str, bucket: str, key: str, number: int,
                 chunks: Iterable[bytes]) -> ObjectMeta:
        if not 1 <= number <= MAX_PARTS:
            raise S3Error("InvalidArgument", f"part number must be 1..{MAX_PARTS}")
        d, _ = self._upload_info(upload_id, bucket, key)
        meta = ObjectMeta(key, 0, "", time.time())
        return self._write(chunks, meta, d / f"part-{number:05d}")

    def complete(self, upload_id: str, bucket: str, key: str,
                 parts: list[tuple[int, str]], min_part_size: int) -> ObjectMeta:
        """Concatenate the listed parts (ETags must match) into the object; remove the upload."""
        d, info = self._upload_info(upload_id, bucket, key)
        if not parts:
            raise S3Error("MalformedXML", "no parts given")
        numbers = [n for n, _ in parts]
        if numbers != sorted(set(numbers)):
            raise S3Error("InvalidPartOrder")
        files: list[tuple[BinaryIO, int]] = []
        f: BinaryIO
        digests = b""
        try:
            for i, (number, etag) in enumerate(parts):
                try:
                    f = open(d / f"part-{number:05d}", "rb")  # noqa: SIM115 - closed below
                except (FileNotFoundError, OSError):
                    raise S3Error("InvalidPart", f"part {number} was not uploaded") from None
                files.append((f, 0))
                meta = _read_meta(f)
                if meta.etag != etag.strip('"'):
                    raise S3Error("InvalidPart", f"part {number} has ETag {meta.etag}")
                if i < len(parts) - 1 and meta.size < min_part_size:
                    raise S3Error("EntityTooSmall", f"part {number} is {meta.size} bytes")
                files[-1] = (f, meta.size)
                digests += bytes.fromhex(meta.etag)
            etag = f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"
            result = ObjectMeta(key, 0, etag, time.time(), info.content_type, info.user_meta)
            self._write(_concat(files), result, self._object_path(bucket, key))
        finally:
            for f, _ in files:
                f.close()
        shutil.rmtree(d, ignore_errors=True)
        return result

    def abort(self, upload_id: str, bucket: str, key: str) -> None:
        d, _ = self._upload_info(upload_id, bucket, key)
        shutil.rmtree(d)


def _concat(files: list[tuple[BinaryIO, int]]) -> Iterable[bytes]:
    for f, size in files:
        left = size
        while left > 0:
            data = f.read(min(left, COPY_CHUNK))
            if not data:
                raise S3Error("InternalError", "part file shorter than its metadata")
            left -= len(data)
            yield data

