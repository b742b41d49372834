"""The S3 gateway with three storage nodes on loopback, driven by unmodified boto3 and AWS CLI.

Real sockets, real clients; objects from 0 bytes to 64 MiB (multipart), ranges, conditionals,
listing, deletes, every error case, presigned URLs, keep-alive, node failure and restart.
Offload is exercised in test_s3_lab.py (it needs the XO agents in network namespaces).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from xo.rgw.config import S3Config, parse
from xo.rgw.gateway import Gateway
from xo.rgw.node import StorageNode
from xo.rgw.store import Store

pytestmark = pytest.mark.net

AK, SK = "XOTESTKEY", "xo-test-secret"
MIB = 1024 * 1024
AWS = str(Path(sys.executable).parent / "aws")


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether `check` holds within `timeout` seconds (for counters bumped after a reply)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@dataclass
class Cluster:
    root: Path
    nodes: list[StorageNode]
    ports: list[int]
    gateway: Gateway
    config: S3Config

    @property
    def url(self) -> str:
        host, port = self.gateway.address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop_node(self, i: int) -> None:
        self.nodes[i].close()

    def start_node(self, i: int) -> None:
        host = self.config.nodes[i].address.sockaddr()[0]
        self.nodes[i] = StorageNode(Store(self.root / f"n{i}"), (host, self.ports[i]))
        self.nodes[i].start()


def make_cluster(root: Path, host: str = "127.0.0.1", **gateway: object) -> Cluster:
    nodes = [StorageNode(Store(root / f"n{i}"), (host, 0)).start() for i in range(3)]
    ports = [n.address[1] for n in nodes]
    bracketed = f"[{host}]" if ":" in host else host
    config = parse({
        "gateway": {"listen": f"{bracketed}:0", "keys": {AK: SK}, "connect_timeout": 0.5,
                    "io_timeout": 5.0, **gateway},
        "nodes": [{"name": f"n{i}", "address": f"{bracketed}:{p}"} for i, p in enumerate(ports)],
    })
    return Cluster(root, nodes, ports, Gateway(config).start(), config)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = make_cluster(tmp_path)
    yield c
    c.gateway.close()
    for n in c.nodes:
        n.close()


def client(c: Cluster, secret: str = SK, key: str = AK, retries: int = 1, **cfg: object):
    return boto3.client(
        "s3", endpoint_url=c.url, aws_access_key_id=key, aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(signature_version=cfg.pop("signature_version", "s3v4"),
                      retries={"max_attempts": retries, "mode": "standard"},
                      s3={"addressing_style": "path"}, **cfg),
    )


def code(err: pytest.ExceptionInfo[ClientError]) -> str:
    return err.value.response["Error"]["Code"]


def aws(c: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "AWS_ACCESS_KEY_ID": AK,
           "AWS_SECRET_ACCESS_KEY": SK, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "HOME": str(c.root)}
    return subprocess.run([AWS, "--endpoint-url", c.url, *args], env=env, check=check,
                          capture_output=True, text=True, timeout=300)


def multipart_etag(data: bytes, part: int) -> str:
    digests = b"".join(hashlib.md5(data[i:i + part]).digest() for i in range(0, len(data), part))
    return f'"{hashlib.md5(digests).hexdigest()}-{(len(data) + part - 1) // part}"'


@pytest.mark.parametrize("size", [0, 1, MIB - 1, 5 * MIB + 3])
def test_put_get_sizes(cluster: Cluster, size: int) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="sizes")
    data = os.urandom(size)
    put = s3.put_object(Bucket="sizes", Key=f"obj-{size}", Body=data,
                        Metadata={"origin": "test"}, ContentType="application/x-xo")
    assert put["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3.get_object(Bucket="sizes", Key=f"obj-{size}")
    assert got["Body"].read() == data
    assert got["ETag"] == put["ETag"] and got["ContentLength"] == size
    assert got["Metadata"] == {"origin": "test"} and got["ContentType"] == "application/x-xo"
    head = s3.head_object(Bucket="sizes", Key=f"obj-{size}")
    assert head["ContentLength"] == size and head["ETag"] == put["ETag"]


def test_multipart_boto3_etag(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="mpu")
    data = os.urandom(13 * MIB)
    s3.upload_fileobj(io.BytesIO(data), "mpu", "thirteen",
                      Config=TransferConfig(multipart_threshold=5 * MIB,
                                            multipart_chunksize=5 * MIB))
    head = s3.head_object(Bucket="mpu", Key="thirteen")
    assert head["ETag"] == multipart_etag(data, 5 * MIB)
    assert head["ContentLength"] == len(data)
    out = io.BytesIO()
    s3.download_fileobj("mpu", "thirteen", out)
    assert out.getvalue() == data


def test_aws_cli_64mib_multipart_roundtrip(cluster: Cluster, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    data = os.urandom(64 * MIB)
    src.write_bytes(data)
    aws(cluster, "s3", "mb", "s3://cli")
    aws(cluster, "s3", "cp", str(src), "s3://cli/dir/big.bin")
    aws(cluster, "s3", "cp", "s3://cli/dir/big.bin", str(dst))
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()
    head = client(cluster).head_object(Bucket="cli", Key="dir/big.bin")
    assert head["ETag"] == multipart_etag(data, 8 * MIB)  # the CLI's default part size
    listing = aws(cluster, "s3", "ls", "s3://cli/dir/").stdout
    assert "big.bin" in listing and str(64 * MIB) in listing
    aws(cluster, "s3", "rm", "s3://cli/dir/big.bin")
    aws(cluster, "s3", "rb", "s3://cli")
    assert "cli" not in aws(cluster, "s3", "ls").stdout


def test_aws_cli_errors(cluster: Cluster) -> None:
    r = aws(cluster, "s3api", "head-bucket", "--bucket", "nope", check=False)
    assert r.returncode != 0 and "404" in r.stderr
    r = aws(cluster, "s3", "cp", "s3://nope/k", "-", check=False)
    assert r.returncode != 0 and ("404" in r.stderr or "NoSuchBucket" in r.stderr)
    aws(cluster, "s3", "mb", "s3://full")
    aws(cluster, "s3api", "put-object", "--bucket", "full", "--key", "k")
    r = aws(cluster, "s3", "rb", "s3://full", check=False)
    assert r.returncode != 0 and "BucketNotEmpty" in r.stderr
    aws(cluster, "s3", "rb", "--force", "s3://full")


def test_ranges(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="rng")
    data = os.urandom(1000)
    s3.put_object(Bucket="rng", Key="k", Body=data)
    for header, expected, content_range in [
        ("bytes=0-9", data[:10], "bytes 0-9/1000"),
        ("bytes=990-", data[990:], "bytes 990-999/1000"),
        ("bytes=-5", data[-5:], "bytes 995-999/1000"),
        ("bytes=500-5000", data[500:], "bytes 500-999/1000"),
    ]:
        got = s3.get_object(Bucket="rng", Key="k", Range=header)
        assert got["Body"].read() == expected
        assert got["ContentRange"] == content_range
        assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    # no agent: every GET is proxied (counted after its last byte is sent, so the client
    # may read the body a moment before the gateway's thread counts it)
    assert eventually(lambda: cluster.gateway.stats.proxied == 4), cluster.gateway.stats
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="rng", Key="k", Range="bytes=1000-")
    assert code(e) == "InvalidRange"
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 416


def test_conditionals(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="cond")
    etag = s3.put_object(Bucket="cond", Key="k", Body=b"v1")["ETag"]
    assert s3.get_object(Bucket="cond", Key="k", IfMatch=etag)["Body"].read() == b"v1"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="cond", Key="k", IfMatch='"0000"')
    assert code(e) == "PreconditionFailed"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="cond", Key="k", IfNoneMatch=etag)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    future = time.time() + 3600
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="cond", Key="k", IfModifiedSince=future)
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    past = time.time() - 3600
    assert s3.get_object(Bucket="cond", Key="k", IfModifiedSince=past)["Body"].read() == b"v1"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="cond", Key="k", IfUnmodifiedSince=past)
    assert code(e) == "PreconditionFailed"


def test_listing(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="lst")
    keys = ["a", "b/1", "b/2", "b/c/3", "c d/é", "d"]
    for k in keys:
        s3.put_object(Bucket="lst", Key=k, Body=k.encode())
    every = s3.list_objects_v2(Bucket="lst")
    assert [o["Key"] for o in every["Contents"]] == keys and every["KeyCount"] == 6
    top = s3.list_objects_v2(Bucket="lst", Delimiter="/")
    assert [o["Key"] for o in top["Contents"]] == ["a", "d"]
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["b/", "c d/"]
    sub = s3.list_objects_v2(Bucket="lst", Prefix="b/", Delimiter="/")
    assert [o["Key"] for o in sub["Contents"]] == ["b/1", "b/2"]
    assert [p["Prefix"] for p in sub["CommonPrefixes"]] == ["b/c/"]
    pages = list(s3.get_paginator("list_objects_v2").paginate(
        Bucket="lst", PaginationConfig={"PageSize": 2}))
    assert len(pages) == 3
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == keys
    pages = list(s3.get_paginator("list_objects_v2").paginate(
        Bucket="lst", Delimiter="/", PaginationConfig={"PageSize": 1}))
    seen = [o["Key"] for p in pages for o in p.get("Contents", [])]
    seen += [c["Prefix"] for p in pages for c in p.get("CommonPrefixes", [])]
    assert sorted(seen) == ["a", "b/", "c d/", "d"]
    after = s3.list_objects_v2(Bucket="lst", StartAfter="b/2")
    assert [o["Key"] for o in after["Contents"]] == keys[3:]
    v1 = s3.list_objects(Bucket="lst", Prefix="b/", MaxKeys=2)
    assert [o["Key"] for o in v1["Contents"]] == ["b/1", "b/2"] and v1["IsTruncated"]
    assert "lst" in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_deletes(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="del")
    for i in range(5):
        s3.put_object(Bucket="del", Key=f"k{i}", Body=b"x")
    s3.delete_object(Bucket="del", Key="k0")
    s3.delete_object(Bucket="del", Key="never-existed")  # S3: 204 all the same
    res = s3.delete_objects(Bucket="del", Delete={"Objects": [{"Key": f"k{i}"} for i in
                                                              range(1, 4)]})
    assert sorted(d["Key"] for d in res["Deleted"]) == ["k1", "k2", "k3"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="del")["Contents"]] == ["k4"]
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="del")
    assert code(e) == "BucketNotEmpty"
    s3.delete_object(Bucket="del", Key="k4")
    s3.delete_bucket(Bucket="del")
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket="del")
    assert e.value.response["Error"]["Code"] == "404"
    for n in cluster.nodes:  # nothing left behind on any node
        assert not (n.store.root / "buckets" / "del").exists()


def test_error_cases(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="err")
    s3.put_object(Bucket="err", Key="k", Body=b"secret")
    cases = [
        (lambda: s3.get_object(Bucket="nobucket", Key="k"), "NoSuchBucket"),
        (lambda: s3.get_object(Bucket="err", Key="missing"), "NoSuchKey"),
        (lambda: s3.list_objects_v2(Bucket="nobucket"), "NoSuchBucket"),
        (lambda: s3.create_bucket(Bucket="err"), "BucketAlreadyOwnedByYou"),
        (lambda: s3.create_bucket(Bucket="Bad_Name"), "InvalidBucketName"),
        (lambda: s3.put_object(Bucket="nobucket", Key="k", Body=b"x"), "NoSuchBucket"),
        (lambda: s3.abort_multipart_upload(Bucket="err", Key="k", UploadId="0" * 32),
         "NoSuchUpload"),
        (lambda: s3.get_object_acl(Bucket="err", Key="k"), "NotImplemented"),
        (lambda: client(cluster, secret="wrong").get_object(Bucket="err", Key="k"),
         "SignatureDoesNotMatch"),
        (lambda: client(cluster, key="NOBODY").get_object(Bucket="err", Key="k"),
         "InvalidAccessKeyId"),
        (lambda: client(cluster, signature_version=UNSIGNED).get_object(Bucket="err", Key="k"),
         "AccessDenied"),
    ]
    for call, expected in cases:
        with pytest.raises(ClientError) as e:
            call()
        assert code(e) == expected, (expected, e.value.response)


def test_multipart_errors(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="mperr")
    up = s3.create_multipart_upload(Bucket="mperr", Key="k")["UploadId"]
    e1 = s3.upload_part(Bucket="mperr", Key="k", UploadId=up, PartNumber=1, Body=b"a" * 100)
    e2 = s3.upload_part(Bucket="mperr", Key="k", UploadId=up, PartNumber=2, Body=b"b")
    with pytest.raises(ClientError) as e:
        s3.upload_part_copy(Bucket="mperr", Key="k", UploadId=up, PartNumber=3,
                            CopySource="mperr/other")
    assert code(e) == "NotImplemented"
    parts = [{"PartNumber": 1, "ETag": e1["ETag"]}, {"PartNumber": 2, "ETag": e2["ETag"]}]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket="mperr", Key="k", UploadId=up, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]})
    assert code(e) == "InvalidPart"
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket="mperr", Key="k", UploadId=up,
                                     MultipartUpload={"Parts": parts})
    assert code(e) == "EntityTooSmall"
    s3.abort_multipart_upload(Bucket="mperr", Key="k", UploadId=up)
    with pytest.raises(ClientError) as e:
        s3.upload_part(Bucket="mperr", Key="k", UploadId=up, PartNumber=3, Body=b"c")
    assert code(e) == "NoSuchUpload"
    with pytest.raises(ClientError) as e:
        s3.head_object(Bucket="mperr", Key="k")
    assert e.value.response["Error"]["Code"] == "404"


def test_bad_signature_stores_nothing(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="sig")
    bad = client(cluster, secret="wrong")
    with pytest.raises(ClientError) as e:
        bad.put_object(Bucket="sig", Key="evil", Body=os.urandom(2 * MIB))
    assert code(e) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as e:
        bad.create_multipart_upload(Bucket="sig", Key="evil")
    assert code(e) == "SignatureDoesNotMatch"
    assert s3.list_objects_v2(Bucket="sig")["KeyCount"] == 0
    for n in cluster.nodes:
        assert not any((n.store.root / "uploads").iterdir())


def test_presigned_urls_and_keep_alive(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="pre")
    put_url = s3.generate_presigned_url("put_object", Params={"Bucket": "pre", "Key": "p"})
    get_url = s3.generate_presigned_url("get_object", Params={"Bucket": "pre", "Key": "p"})
    host, port = cluster.gateway.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    target = urllib.parse.urlsplit(put_url)
    conn.request("PUT", f"{target.path}?{target.query}", body=b"presigned body")
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    resp.read()
    sock = conn.sock
    for _ in range(3):  # the same TCP connection serves every request (HTTP/1.1 keep-alive)
        target = urllib.parse.urlsplit(get_url)
        conn.request("GET", f"{target.path}?{target.query}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"presigned body"
        assert conn.sock is sock
    # tampering with the signed URL is refused; nothing is served
    conn.request("GET", f"{target.path.replace('/p', '/q')}?{target.query}")
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 403 and b"SignatureDoesNotMatch" in body
    assert conn.sock is sock
    conn.close()
    expired = s3.generate_presigned_url("get_object", Params={"Bucket": "pre", "Key": "p"},
                                        ExpiresIn=1)
    time.sleep(2)
    target = urllib.parse.urlsplit(expired)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", f"{target.path}?{target.query}")
    resp = conn.getresponse()
    assert resp.status == 403 and b"expired" in resp.read()
    conn.close()


def test_node_down_served_from_replica_then_clean_error(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="hav")
    objects = {f"k{i}": os.urandom(1000 + i) for i in range(12)}
    for k, v in objects.items():
        s3.put_object(Bucket="hav", Key=k, Body=v)
    cluster.stop_node(0)
    for k, v in objects.items():  # replication factor 2: every object has a live copy
        assert s3.get_object(Bucket="hav", Key=k)["Body"].read() == v
    s3.put_object(Bucket="hav", Key="while-down", Body=b"still two copies")
    for call, expected in [(lambda: s3.get_object(Bucket="hav", Key="nope"), "NoSuchKey"),
                           (lambda: s3.get_object(Bucket="nobucket", Key="k"), "NoSuchBucket")]:
        with pytest.raises(ClientError) as e:  # one node down: the answer is still exact
            call()
        assert code(e) == expected
    cluster.stop_node(1)
    lost = 0
    for k in objects:
        start = time.monotonic()
        try:
            s3.get_object(Bucket="hav", Key=k)["Body"].read()
        except ClientError as e:
            assert e.response["Error"]["Code"] == "ServiceUnavailable"
            lost += 1
        assert time.monotonic() - start < 3 * cluster.config.connect_timeout + 1  # no hang
    assert lost > 0  # with two of three nodes down some objects have no live copy
    with pytest.raises(ClientError) as e:  # quorum 2 cannot be met with one node
        s3.put_object(Bucket="hav", Key="new", Body=b"x")
    assert code(e) == "ServiceUnavailable"
    cluster.start_node(0)
    cluster.start_node(1)
    for n in cluster.gateway.clients:
        n.down_until = 0.0  # do not wait for the down-marking to expire
    for k, v in objects.items():
        assert s3.get_object(Bucket="hav", Key=k)["Body"].read() == v
    assert s3.get_object(Bucket="hav", Key="while-down")["Body"].read() == b"still two copies"


def test_restart_loses_nothing_acknowledged(tmp_path: Path) -> None:
    c = make_cluster(tmp_path)
    s3 = client(c)
    s3.create_bucket(Bucket="dur")
    data = {f"k{i}": os.urandom(i * 1000) for i in range(6)}
    for k, v in data.items():
        s3.put_object(Bucket="dur", Key=k, Body=v)
    c.gateway.close()
    for i in range(3):
        c.stop_node(i)
        c.start_node(i)
    c.gateway = Gateway(c.config).start()
    try:
        s3 = client(c)
        for k, v in data.items():
            assert s3.get_object(Bucket="dur", Key=k)["Body"].read() == v
    finally:
        c.gateway.close()
        for n in c.nodes:
            n.close()


def _raw_exchange(c: Cluster, request: bytes) -> tuple[bytes, bool]:
    """Send raw bytes; (everything received, whether the gateway closed within 5 s)."""
    host, port = c.gateway.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except TimeoutError:
            return data, False
    return data, True


def test_rejected_requests_on_raw_sockets(cluster: Cluster) -> None:
    # an unsigned PUT with a large unread body: 403, then the gateway closes (no hang)
    body = b"x" * (2 * MIB)
    data, closed = _raw_exchange(cluster, b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\n\r\n" + body[:1000])
    assert data.startswith(b"HTTP/1.1 403") and b"AccessDenied" in data and closed
    # Connection: close is honoured after an error
    data, closed = _raw_exchange(cluster, b"GET /nobucket/k HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 403") and closed
    # not HTTP at all: the connection is dropped, the gateway keeps serving
    data, closed = _raw_exchange(cluster, b"\x16\x03\x01 garbage\r\n\r\n")
    assert data == b"" and closed
    # a small unread body is drained and the connection stays usable
    data, closed = _raw_exchange(cluster, b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 3"
                                 b"\r\n\r\nabcGET / HTTP/1.1\r\nHost: x\r\n"
                                 b"Connection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 403") == 2 and closed
    assert client(cluster).list_buckets()["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_copy_object(cluster: Cluster) -> None:
    s3 = client(cluster)
    s3.create_bucket(Bucket="src")
    s3.create_bucket(Bucket="dst")
    data = os.urandom(3 * MIB + 5)
    etag = s3.put_object(Bucket="src", Key="a", Body=data, Metadata={"m": "1"},
                         ContentType="text/x-a")["ETag"]
    res = s3.copy_object(Bucket="dst", Key="b", CopySource={"Bucket": "src", "Key": "a"})
    assert res["CopyObjectResult"]["ETag"] == etag
    got = s3.get_object(Bucket="dst", Key="b")
    assert got["Body"].read() == data
    assert got["Metadata"] == {"m": "1"} and got["ContentType"] == "text/x-a"
    s3.copy_object(Bucket="dst", Key="b", CopySource="src/a", MetadataDirective="REPLACE",
                   Metadata={"m": "2"}, ContentType="text/x-b")
    head = s3.head_object(Bucket="dst", Key="b")
    assert head["Metadata"] == {"m": "2"} and head["ContentType"] == "text/x-b"
    for call, expected in [
        (lambda: s3.copy_object(Bucket="src", Key="a", CopySource="src/a"), "InvalidRequest"),
        (lambda: s3.copy_object(Bucket="dst", Key="c", CopySource="src/none"), "NoSuchKey"),
        (lambda: s3.copy_object(Bucket="dst", Key="c", CopySource="nobucket/a"),
         "NoSuchBucket"),
        (lambda: s3.copy_object(Bucket="dst", Key="c", CopySource="src/a",
                                CopySourceIfMatch='"0000"'), "PreconditionFailed"),
        (lambda: s3.copy_object(Bucket="dst", Key="c", CopySource="src/a",
                                CopySourceIfNoneMatch=etag), "PreconditionFailed"),
    ]:
        with pytest.raises(ClientError) as e:
            call()
        assert code(e) == expected
    # the AWS CLI's move between buckets is CopyObject + DeleteObject
    aws(cluster, "s3", "mv", "s3://src/a", "s3://dst/moved")
    assert s3.get_object(Bucket="dst", Key="moved")["Body"].read() == data
    assert s3.list_objects_v2(Bucket="src")["KeyCount"] == 0


def test_ipv6_everywhere(tmp_path: Path) -> None:
    c = make_cluster(tmp_path, host="::1")
    try:
        s3 = client(c)
        s3.create_bucket(Bucket="six")
        data = os.urandom(100_000)
        s3.put_object(Bucket="six", Key="k", Body=data)
        assert s3.get_object(Bucket="six", Key="k", Range="bytes=10-19")["Body"].read() == \
            data[10:20]
        url = s3.generate_presigned_url("get_object", Params={"Bucket": "six", "Key": "k"})
        assert url.startswith("http://[::1]:")
        assert aws(c, "s3", "ls", "s3://six").stdout.count(" k") == 1
    finally:
        c.gateway.close()
        for n in c.nodes:
            n.close()
