"""The S3 gateway over HTTPS ([tls]) on this host, whose kernel has no kTLS: unmodified boto3
and AWS CLI verify the gateway against a dev CA; every GET is proxied (a user-space TLS
connection never moves), and the gateway counts why, per GET, while the reason is logged once.
Clients that speak plain HTTP, distrust the certificate, send garbage or stay silent get a
clean close (a FIN, never a reset) and the gateway keeps serving. The offload of HTTPS GETs
over kTLS runs in the VM: tests/kernel/test_s3_https.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

from xo.pki import DevCA, TlsFiles
from xo.rgw.config import S3Config, parse
from xo.rgw.gateway import Gateway
from xo.rgw.node import StorageNode
from xo.rgw.offload import AgentOffloader
from xo.rgw.store import Store
from xo.tls import TlsRefusedError

pytestmark = pytest.mark.net

AK, SK = "XOTLSKEY", "xo-tls-secret"
MIB = 1024 * 1024
THRESHOLD = MIB
AWS = str(Path(sys.executable).parent / "aws")
HOST = "127.0.0.1"
HANDSHAKE_TIMEOUT_S = 1.0
CLIENT_TIMEOUT_S = 10.0
NO_KTLS_LOG = "served locally and never offloaded"


@dataclass
class Cluster:
    root: Path
    pki: TlsFiles
    nodes: list[StorageNode]
    gateway: Gateway
    config: S3Config

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.gateway.address[1]}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Three nodes and a gateway with [tls] and offload enabled (every node has a target):
    each large GET would be offloaded if its connection could move. The agent socket leads
    nowhere; the gateway must not even ask (user-space TLS stays here), which
    `offload_refused == 0` checks."""
    pki = DevCA().write(tmp_path / "pki", HOST)
    nodes = [StorageNode(Store(tmp_path / f"n{i}"), (HOST, 0)).start() for i in range(3)]
    config = parse({
        "gateway": {"listen": f"{HOST}:0", "keys": {AK: SK}, "connect_timeout": 0.5,
                    "io_timeout": 5.0},
        "offload": {"enabled": True, "threshold": THRESHOLD,
                    "agent_socket": str(tmp_path / "no-agent.sock"), "agent_timeout": 1.0},
        "tls": {"cert": str(pki.cert), "key": str(pki.key),
                "handshake_timeout": HANDSHAKE_TIMEOUT_S},
        "nodes": [{"name": f"n{i}", "address": f"{HOST}:{n.address[1]}", "target": f"b{i}"}
                  for i, n in enumerate(nodes)],
    })
    offloader = AgentOffloader(config.offload.agent_socket, config.offload.agent_timeout)
    gw = Gateway(config, offloader).start()
    yield Cluster(tmp_path, pki, nodes, gw, config)
    gw.close()
    for n in nodes:
        n.close()


def client(c: Cluster, secret: str = SK):
    return boto3.client(
        "s3", endpoint_url=c.url, aws_access_key_id=AK, aws_secret_access_key=secret,
        region_name="us-east-1", verify=str(c.pki.ca),
        config=Config(signature_version="s3v4", retries={"max_attempts": 1, "mode": "standard"},
                      s3={"addressing_style": "path"}),
    )


def aws(c: Cluster, *args: str) -> str:
    env = {"PATH": os.environ.get("PATH", ""), "AWS_ACCESS_KEY_ID": AK,
           "AWS_SECRET_ACCESS_KEY": SK, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "HOME": str(c.root)}
    return subprocess.run([AWS, "--endpoint-url", c.url, "--ca-bundle", str(c.pki.ca), *args],
                          env=env, check=True, capture_output=True, text=True,
                          timeout=300).stdout


def test_boto3_over_https_everything_proxied(cluster: Cluster,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="xo.tls")
    s3 = client(cluster)
    s3.create_bucket(Bucket="tls")
    objects = {"empty": b"", "one": b"x", "small": os.urandom(10_000),
               "big": os.urandom(3 * MIB + 5)}
    etags = {k: s3.put_object(Bucket="tls", Key=k, Body=v)["ETag"] for k, v in objects.items()}
    multi = os.urandom(12 * MIB + 1)
    s3.upload_fileobj(_Reader(multi), "tls", "multi",
                      Config=TransferConfig(multipart_threshold=5 * MIB,
                                            multipart_chunksize=5 * MIB, max_concurrency=2))
    objects["multi"] = multi
    for k, v in objects.items():
        assert s3.get_object(Bucket="tls", Key=k)["Body"].read() == v, k
    large_gets = 2  # big and multi: at least THRESHOLD bytes each
    got = s3.get_object(Bucket="tls", Key="multi", Range=f"bytes=100-{100 + 2 * MIB - 1}")
    assert got["Body"].read() == multi[100:100 + 2 * MIB]
    large_gets += 1
    assert s3.get_object(Bucket="tls", Key="big", Range="bytes=-7")["Body"].read() == \
        objects["big"][-7:]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="tls", Key="big", IfNoneMatch=etags["big"])
    assert e.value.response["Error"]["Code"] == "304"
    assert s3.head_object(Bucket="tls", Key="big")["ContentLength"] == len(objects["big"])
    listed = s3.list_objects_v2(Bucket="tls", MaxKeys=2)
    assert listed["IsTruncated"] and [o["Key"] for o in listed["Contents"]] == ["big", "empty"]
    rest = s3.list_objects_v2(Bucket="tls", ContinuationToken=listed["NextContinuationToken"])
    assert [o["Key"] for o in rest["Contents"]] == ["multi", "one", "small"]
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="tls", Key="missing")
    assert e.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        client(cluster, secret="wrong").get_object(Bucket="tls", Key="big")
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    # a presigned URL, fetched by the standard library verifying the same CA
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "tls", "Key": "big"})
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca))
    with urllib.request.urlopen(url, context=ctx, timeout=CLIENT_TIMEOUT_S) as r:
        assert r.read() == objects["big"]
    large_gets += 1
    s3.delete_object(Bucket="tls", Key="one")
    with pytest.raises(ClientError):
        s3.head_object(Bucket="tls", Key="one")

    stats, front = cluster.gateway.stats, cluster.gateway.tls
    assert front is not None and not front.ktls
    # every large GET stayed here for the one reason, and the agent was never asked
    assert dict(stats.kept_local) == {TlsRefusedError.NO_KTLS: large_gets}
    assert stats.offloaded == stats.offload_refused == 0
    assert front.stats["local-no-ktls"] >= 1 and front.stats["ktls"] == 0
    assert stats.tls_failed == 0
    logged = [r for r in caplog.records if NO_KTLS_LOG in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    # keep-alive survives boto3's HTTPS uploads (aws-chunked inside Transfer-Encoding: chunked)
    one = boto3.client("s3", endpoint_url=cluster.url, aws_access_key_id=AK,
                       aws_secret_access_key=SK, region_name="us-east-1",
                       verify=str(cluster.pki.ca),
                       config=Config(s3={"addressing_style": "path"}, max_pool_connections=1))
    connections = front.stats["local-no-ktls"]
    for i in range(3):
        one.put_object(Bucket="tls", Key=f"again{i}", Body=objects["small"])
        assert one.get_object(Bucket="tls", Key=f"again{i}")["Body"].read() == objects["small"]
    assert front.stats["local-no-ktls"] == connections + 1


class _Reader:
    """A file-like object over bytes (boto3's upload_fileobj reads it in parts)."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos:end]
        self._pos += len(out)
        return out


def test_aws_cli_over_https(cluster: Cluster) -> None:
    """0 B, 1 B and 20 MiB (multipart up, parallel ranged GETs down) with --ca-bundle."""
    aws(cluster, "s3", "mb", "s3://cli")
    for name, size in (("empty", 0), ("one", 1), ("big", 20 * MIB)):
        src, dst = cluster.root / f"{name}.src", cluster.root / f"{name}.dst"
        data = os.urandom(size)
        src.write_bytes(data)
        aws(cluster, "s3", "cp", str(src), f"s3://cli/{name}.bin")
        aws(cluster, "s3", "cp", f"s3://cli/{name}.bin", str(dst))
        assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest(), name
    listing = aws(cluster, "s3", "ls", "s3://cli")
    assert all(f"{n}.bin" in listing for n in ("empty", "one", "big"))
    aws(cluster, "s3", "rm", "s3://cli/big.bin")
    assert "big.bin" not in aws(cluster, "s3", "ls", "s3://cli")
    stats = cluster.gateway.stats
    assert set(stats.kept_local) == {TlsRefusedError.NO_KTLS}
    assert stats.kept_local[TlsRefusedError.NO_KTLS] >= 1  # the CLI's 8 MiB ranged GETs
    assert stats.offloaded == stats.offload_refused == 0


def _closed_cleanly(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes; a reset fails the test."""
    sock.settimeout(CLIENT_TIMEOUT_S)
    received = b""
    while data := sock.recv(65536):  # ConnectionResetError here would be a reset
        received += data
    return received


def test_bad_clients_get_a_clean_close(cluster: Cluster) -> None:
    addr = (HOST, cluster.gateway.address[1])
    s3 = client(cluster)
    s3.create_bucket(Bucket="bad")
    s3.put_object(Bucket="bad", Key="k", Body=b"still served")
    silent = socket.create_connection(addr)  # says nothing: closed after the handshake timeout
    # plain HTTP to the HTTPS port: no HTTP answer, a FIN
    with socket.create_connection(addr) as plain:
        plain.sendall(b"GET /bad/k HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"HTTP/1." not in _closed_cleanly(plain)
    # garbage that looks like a TLS record header
    with socket.create_connection(addr) as junk:
        junk.sendall(b"\x16\x03\x01\x00\x05hello" + os.urandom(64))
        _closed_cleanly(junk)
    # a client that does not trust the gateway's certificate aborts its handshake
    with socket.create_connection(addr) as raw, pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context().wrap_socket(raw, server_hostname=HOST)
    # the gateway serves on, over the same kind of connection, while the silent one waits
    assert s3.get_object(Bucket="bad", Key="k")["Body"].read() == b"still served"
    with silent:
        assert _closed_cleanly(silent) == b""
    assert cluster.gateway.stats.tls_failed == 4
    assert client(cluster).get_object(Bucket="bad", Key="k")["Body"].read() == b"still served"
