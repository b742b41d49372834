"""The storage node's durable store: atomic objects, restart, multipart, bad input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from xo.rgw.errors import S3Error
from xo.rgw.store import MAGIC, Store

MIB = 1024 * 1024


def test_put_open_list_delete(tmp_path: Path) -> None:
    s = Store(tmp_path)
    assert s.create_bucket("bkt") and not s.create_bucket("bkt")
    meta = s.put("bkt", "a/b", [b"hello ", b"world"], "text/plain", {"k": "v"})
    assert meta.size == 11 and meta.etag == hashlib.md5(b"hello world").hexdigest()
    got, f = s.open("bkt", "a/b")
    with f:
        assert f.read(got.size) == b"hello world"
    assert got.content_type == "text/plain" and got.user_meta == {"k": "v"}
    s.put("bkt", "a/c", [b""], "", {})
    s.put("bkt", "z", [b"z"], "", {})
    assert [m.key for m in s.list_objects("bkt", prefix="a/")] == ["a/b", "a/c"]
    assert [m.key for m in s.list_objects("bkt", start_after="a/b")] == ["a/c", "z"]
    with pytest.raises(S3Error) as e:
        s.delete_bucket("bkt")
    assert e.value.code == "BucketNotEmpty"
    assert s.delete("bkt", "a/b") and not s.delete("bkt", "a/b")
    with pytest.raises(S3Error) as e:
        s.head("bkt", "a/b")
    assert e.value.code == "NoSuchKey"


def test_overwrite_is_atomic_and_survives_restart(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.create_bucket("bkt")
    s.put("bkt", "k", [b"old"], "", {})
    _, f_old = s.open("bkt", "k")  # a reader of the old version keeps reading it
    s.put("bkt", "k", [b"new version"], "", {})
    with f_old:
        assert f_old.read(3) == b"old"
    # a crash leaves at most a temporary file, which a restart discards
    (tmp_path / "tmp" / "leftover").write_bytes(b"partial")
    s2 = Store(tmp_path)
    assert not any((tmp_path / "tmp").iterdir())
    meta, f = s2.open("bkt", "k")
    with f:
        assert f.read(meta.size) == b"new version"


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.create_bucket("bkt")

    def broken():
        yield b"first part"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        s.put("bkt", "k", broken(), "", {})
    assert s.list_objects("bkt") == []
    assert not any((tmp_path / "tmp").iterdir())


def test_corrupt_object_file_is_a_clean_error(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.create_bucket("bkt")
    s.put("bkt", "k", [b"data"], "", {})
    (path,) = (tmp_path / "buckets" / "bkt").iterdir()
    raw = path.read_bytes()
    assert raw.endswith(MAGIC)
    path.write_bytes(raw[:-1])
    with pytest.raises(S3Error) as e:
        s.head("bkt", "k")
    assert e.value.code == "InternalError"
    assert s.list_objects("bkt") == []  # listing skips what it cannot read


def test_bad_names(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for bad in ("A", "ab", "-abc", "a..b", "x" * 64, "../etc"):
        with pytest.raises(S3Error) as e:
            s.create_bucket(bad)
        assert e.value.code == "InvalidBucketName"
    s.create_bucket("bkt")
    with pytest.raises(S3Error) as e:
        s.put("bkt", "k" * 1025, [b""], "", {})
    assert e.value.code == "KeyTooLongError"
    with pytest.raises(S3Error) as e:
        s.put("nobucket", "k", [b""], "", {})
    assert e.value.code == "NoSuchBucket"


def test_multipart(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.create_bucket("bkt")
    uid = os.urandom(16).hex()
    s.create_upload(uid, "bkt", "big", "application/x-test", {"m": "1"})
    p1, p2 = os.urandom(5 * MIB), os.urandom(1000)
    e1 = s.put_part(uid, "bkt", "big", 1, [p1]).etag
    e2 = s.put_part(uid, "bkt", "big", 2, [p2]).etag
    with pytest.raises(S3Error) as e:
        s.complete(uid, "bkt", "big", [(2, e2), (1, e1)], 5 * MIB)
    assert e.value.code == "InvalidPartOrder"
    with pytest.raises(S3Error) as e:
        s.complete(uid, "bkt", "big", [(1, e2), (2, e2)], 5 * MIB)
    assert e.value.code == "InvalidPart"
    with pytest.raises(S3Error) as e:
        s.complete(uid, "bkt", "big", [(1, e1), (3, e2)], 5 * MIB)
    assert e.value.code == "InvalidPart"
    meta = s.complete(uid, "bkt", "big", [(1, e1), (2, e2)], 5 * MIB)
    expected = hashlib.md5(bytes.fromhex(e1) + bytes.fromhex(e2)).hexdigest() + "-2"
    assert meta.etag == expected and meta.size == len(p1) + len(p2)
    got, f = s.open("bkt", "big")
    with f:
        assert f.read(got.size) == p1 + p2
    assert got.content_type == "application/x-test" and got.user_meta == {"m": "1"}
    with pytest.raises(S3Error) as e:  # the upload is gone once completed
        s.put_part(uid, "bkt", "big", 3, [b"x"])
    assert e.value.code == "NoSuchUpload"


def test_multipart_small_part_and_abort(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.create_bucket("bkt")
    uid = os.urandom(16).hex()
    s.create_upload(uid, "bkt", "k", "", {})
    e1 = s.put_part(uid, "bkt", "k", 1, [b"small"]).etag
    e2 = s.put_part(uid, "bkt", "k", 2, [b"last"]).etag
    with pytest.raises(S3Error) as e:
        s.complete(uid, "bkt", "k", [(1, e1), (2, e2)], 5 * MIB)
    assert e.value.code == "EntityTooSmall"
    with pytest.raises(S3Error) as e:  # an upload belongs to its bucket and key
        s.abort(uid, "bkt", "other")
    assert e.value.code == "NoSuchUpload"
    s.abort(uid, "bkt", "k")
    with pytest.raises(S3Error) as e:
        s.abort(uid, "bkt", "k")
    assert e.value.code == "NoSuchUpload"
    with pytest.raises(S3Error) as e:
        s.put_part("../../etc", "bkt", "k", 1, [b""])
    assert e.value.code == "NoSuchUpload"
