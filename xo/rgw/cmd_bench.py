"""Benchmark S3 GET throughput in a lab: gateway proxying vs bytes served by the node.

Builds a lab (c0, f0, b0..b2), runs `xo s3-node` on each backend and `xo s3-gateway` on f0,
uploads one object per size, then times GETs from c0 with curl (one keep-alive connection
per batch, presigned URLs). Modes, interleaved round by round in the same lab and run:
  proxy    the gateway reads the object from its node and relays it to the client
  offload  the gateway hands the client connection to the node (needs the XO agents)
  node     curl reads the object from the node holding it, no gateway (the upper bound
           offload approaches: the node's own serving path)

examples:
  xo s3-bench                         1, 8, 64 MiB, 3 rounds
  xo s3-bench --sizes 1,8 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from urllib.parse import quote

import boto3
from botocore.config import Config

from xo.lab import Lab
from xo.rgw.labrun import ACCESS_KEY, NODE_PORT, SECRET_KEY, S3Deployment
from xo.rgw.node import API
from xo.rgw.placement import rank

MIB = 1024 * 1024
BUCKET = "bench"
# GETs per batch: enough bytes per batch that connection set-up does not dominate.
BATCH_BYTES = 128 * MIB
MAX_BATCH = 32
PRESIGN_SECONDS = 3600


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1,8,64", help="object sizes in MiB (default 1,8,64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")


def _curl_batch(dep: S3Deployment, urls: list[str]) -> tuple[int, float]:
    """GET every URL on one connection from c0; (bytes, seconds of transfer)."""
    argv = ["curl", "-s", "--fail", "-w", "%{size_download} %{time_total}\n"]
    for url in urls:
        argv += ["-o", "/dev/null", url]
    out = dep.lab.clients[0].run(argv, timeout=600).stdout.split()
    sizes, times = out[0::2], out[1::2]
    return sum(int(s) for s in sizes), sum(float(t) for t in times)


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = ["proxy", "node"]
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="xo-s3-bench-") as tmp, \
            Lab(clients=1, frontends=1, backends=3) as lab, \
            S3Deployment(lab, Path(tmp)) as dep:
        with lab.clients[0].enter():
            s3 = boto3.client("s3", endpoint_url=dep.url, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                              config=Config(signature_version="s3v4",
                                            s3={"addressing_style": "path"}))
            s3.create_bucket(Bucket=BUCKET)
            urls: dict[tuple[str, int], str] = {}
            names = [f"n{i}" for i in range(len(lab.backends))]
            for size in sizes:
                key = f"obj-{size}MiB"
                s3.put_object(Bucket=BUCKET, Key=key, Body=b"\xa5" * (size * MIB))
                urls["proxy", size] = s3.generate_presigned_url(
                    "get_object", Params={"Bucket": BUCKET, "Key": key},
                    ExpiresIn=PRESIGN_SECONDS)
                holder = int(rank(names, BUCKET, key)[0][1:])
                urls["node", size] = (
                    f"http://{lab.backends[holder].ip4}:{NODE_PORT}{API}objects/{BUCKET}/"
                    f"{quote(key, safe='')}")
        for _ in range(args.rounds):
            for size in sizes:
                count = max(1, min(MAX_BATCH, BATCH_BYTES // (size * MIB)))
                for mode in modes:
                    nbytes, seconds = _curl_batch(dep, [urls[mode, size]] * count)
                    results.setdefault((mode, size), []).append(nbytes / seconds / MIB)
    print(f"S3 GET throughput, MiB/s (median of {args.rounds} rounds; c0 -> f0 -> b*)")
    print(f"{'size':>8} " + " ".join(f"{m:>10}" for m in modes) + f" {'node/proxy':>11}")
    for size in sizes:
        med = {m: statistics.median(results[m, size]) for m in modes}
        print(f"{size:>5}MiB " + " ".join(f"{med[m]:>10.0f}" for m in modes)
              + f" {med['node'] / med['proxy']:>10.2f}x")
    print("offload: not measured (the XO agent is not wired into the S3 servers yet)")
    return 0
