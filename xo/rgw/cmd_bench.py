"""Benchmark S3 GET throughput in a lab: offload vs the same gateway proxying.

Builds a lab (c0, f0, b0..b2) with an XO agent on f0 and each backend, runs `xo s3-node` on
each backend and two `xo s3-gateway` processes on f0 (same config; one offloads GETs of at
least 1 MiB, one is started with --no-offload), uploads one object per size, then times GETs
from c0 with curl (one keep-alive connection per batch, presigned URLs). Modes, interleaved
round by round in the same lab and run:
  proxy    the gateway reads the object from its node and relays it to the client
  offload  the gateway hands the client connection to the node, which sends the object
           and gives the connection back (XO agents, TCP_REPAIR, eBPF redirect)
  node     curl reads the object from the node holding it, no gateway (reference: the
           node's own serving path without any handoff)
With --tls both gateways serve HTTPS (a dev CA, curl --cacert) and there is no node column:
an offloaded GET moves the connection's kernel TLS state too, which needs kTLS (run it in the
VM tier); without kTLS every HTTPS GET is proxied.

examples:
  xo s3-bench                         1, 8, 64 MiB, 3 rounds
  xo s3-bench --sizes 1,8 --rounds 5
  scripts/kernel-tier.sh --exec .venv/bin/python -m xo.cli s3-bench --tls --backends 1 \
      --sizes 8 --rounds 3 --batch-mib 32
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from urllib.parse import quote

import boto3
from botocore.config import Config

from xo.agent.labkit import LabAgents
from xo.lab import Lab
from xo.rgw.labrun import ACCESS_KEY, NODE_PORT, SECRET_KEY, S3Deployment
from xo.rgw.node import API
from xo.rgw.placement import rank

MIB = 1024 * 1024
BUCKET = "bench"
# GETs per batch: enough bytes per batch that connection set-up does not dominate.
BATCH_MIB = 128
MAX_BATCH = 32
PRESIGN_SECONDS = 3600
PROXY_PORT = 9001
# Agents compile their BCC programs at start: minutes under the VM tier's TCG.
AGENT_START_S = 300.0
THRESHOLD = 1024 * 1024


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="1,8,64", help="object sizes in MiB (default 1,8,64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (default 3)")
    parser.add_argument("--tls", action="store_true", help="HTTPS gateways (kTLS offload)")
    parser.add_argument("--backends", type=int, default=3, choices=range(1, 4),
                        help="storage nodes (default 3; fewer agents start faster in the VM)")
    parser.add_argument("--batch-mib", type=int, default=BATCH_MIB,
                        help=f"bytes per batch of GETs, MiB (default {BATCH_MIB})")


def _curl_batch(dep: S3Deployment, urls: list[str]) -> tuple[int, float]:
    """GET every URL on one connection from c0; (bytes, seconds of transfer)."""
    argv = ["curl", "-s", "--fail", "-w", "%{size_download} %{time_total}\n"]
    if dep.tls:
        argv += ["--cacert", str(dep.ca_path)]
    for url in urls:
        argv += ["-o", "/dev/null", url]
    out = dep.lab.clients[0].run(argv, timeout=600).stdout.split()
    sizes, times = out[0::2], out[1::2]
    return sum(int(s) for s in sizes), sum(float(t) for t in times)


def run(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = ["proxy", "offload"] if args.tls else ["proxy", "offload", "node"]
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="xo-s3-bench-") as tmp, \
            Lab(clients=1, frontends=1, backends=args.backends) as lab, \
            LabAgents(lab, Path(tmp) / "agents", start_timeout=AGENT_START_S) as agents:
        sockets = {h.name: agents.socket_path(h) for h in [*lab.frontends, *lab.backends]}
        dep = S3Deployment(lab, Path(tmp) / "s3", offload=True, threshold=THRESHOLD,
                           replicas=min(2, args.backends), agent_sockets=sockets,
                           verbose=True, tls=args.tls)
        with dep:
            _measure(dep, sizes, modes, args.rounds, args.batch_mib * MIB, results)
    _report(sizes, modes, args.rounds, results)
    return 0


def _measure(dep: S3Deployment, sizes: list[int], modes: list[str], rounds: int,
             batch_bytes: int, results: dict[tuple[str, int], list[float]]) -> None:
    lab = dep.lab
    proxy_url = dep.start_gateway("gateway-proxy", PROXY_PORT, offload=False)
    with lab.clients[0].enter():
        clients = {
            mode: boto3.client("s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY,
                               aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                               verify=str(dep.ca_path) if dep.tls else None,
                               config=Config(signature_version="s3v4",
                                             s3={"addressing_style": "path"}))
            for mode, url in (("offload", dep.url), ("proxy", proxy_url))
        }
        s3 = clients["offload"]
        s3.create_bucket(Bucket=BUCKET)
        urls: dict[tuple[str, int], str] = {}
        names = [f"n{i}" for i in range(len(lab.backends))]
        for size in sizes:
            key = f"obj-{size}MiB"
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"\xa5" * (size * MIB))
            for mode, c in clients.items():
                urls[mode, size] = c.generate_presigned_url(
                    "get_object", Params={"Bucket": BUCKET, "Key": key},
                    ExpiresIn=PRESIGN_SECONDS)
            holder = int(rank(names, BUCKET, key)[0][1:])
            urls["node", size] = (
                f"http://{lab.backends[holder].ip4}:{NODE_PORT}{API}objects/{BUCKET}/"
                f"{quote(key, safe='')}")
    for _ in range(rounds):
        for size in sizes:
            count = max(1, min(MAX_BATCH, batch_bytes // (size * MIB)))
            for mode in modes:
                nbytes, seconds = _curl_batch(dep, [urls[mode, size]] * count)
                results.setdefault((mode, size), []).append(nbytes / seconds / MIB)
    served = dep.log("gateway").count("came back after the node served it")
    print(f"offloading gateway: {served} GETs served by the storage nodes (from its log)")
    if dep.tls:
        dep.stop_gateway()  # its TLS counters (kept local by reason) go to its log
        print("\n".join(line for line in dep.log("gateway").splitlines()
                        if line.startswith("s3-gateway:")))


def _report(sizes: list[int], modes: list[str], rounds: int,
            results: dict[tuple[str, int], list[float]]) -> None:
    print(f"S3 GET throughput, MiB/s (median of {rounds} rounds; c0 -> f0 -> b*)")
    ratios = [m for m in modes if m != "proxy"]
    print(f"{'size':>8} " + " ".join(f"{m:>10}" for m in modes)
          + "".join(f" {m + '/proxy':>14}" for m in ratios))
    for size in sizes:
        med = {m: statistics.median(results[m, size]) for m in modes}
        print(f"{size:>5}MiB " + " ".join(f"{med[m]:>10.0f}" for m in modes)
              + "".join(f" {med[m] / med['proxy']:>13.2f}x" for m in ratios))
