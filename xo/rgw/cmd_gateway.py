"""Run the S3 gateway: S3 REST API with SigV4 in front of the storage nodes of the config.

GETs of at least [offload].threshold bytes are offloaded to the node holding the object when
[offload].enabled is set and the local XO agent is reachable; otherwise the gateway proxies.
With a [tls] table it serves HTTPS only; HTTPS GETs are offloaded where the kernel has kTLS
(else proxied, the reason counted and printed at exit).

examples:
  xo s3-gateway -c integrations/rgw/s3.toml
  xo s3-gateway -c s3.toml --listen 0.0.0.0:9000 --no-offload
  aws --endpoint-url http://127.0.0.1:9000 s3 ls     # keys from [gateway].keys
  aws --endpoint-url https://10.0.0.1:9000 --ca-bundle ca.pem s3 ls   # with [tls]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import threading

from xo.rgw.config import ConfigError, load, parse_listen
from xo.rgw.gateway import Gateway
from xo.rgw.offload import AgentOffloader, Offloader


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="TOML configuration file")
    parser.add_argument("--listen", help="ADDR:PORT, overrides [gateway].listen")
    parser.add_argument("--no-offload", action="store_true", help="always proxy GETs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        config = load(args.config)
        if args.listen:
            config = dataclasses.replace(config, listen=parse_listen(args.listen))
    except ConfigError as e:
        print(f"xo s3-gateway: {e}", file=sys.stderr)
        return 2
    offloader: Offloader | None = None
    if config.offload.enabled and not args.no_offload:
        offloader = AgentOffloader(config.offload.agent_socket, config.offload.agent_timeout)
    try:
        gw = Gateway(config, offloader)
    except ConfigError as e:  # [tls] certificate or key unusable
        print(f"xo s3-gateway: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"xo s3-gateway: cannot listen on {config.listen}: {e.strerror}", file=sys.stderr)
        return 1
    with gw:
        host, port = gw.address[:2]
        mode = "offload" if offloader else "proxy"
        print(f"s3-gateway listening on {gw.scheme}://{host}:{port} ({mode}, "
              f"{len(config.nodes)} nodes)", flush=True)
        wait_for_signal()
        s = gw.stats
        print(f"s3-gateway: {s.proxied} GETs proxied, {s.offloaded} offloaded, "
              f"{s.offload_refused} offloads refused", flush=True)
        if gw.tls is not None:
            kept = ", ".join(f"{k} {v}" for k, v in sorted(s.kept_local.items())) or "none"
            print(f"s3-gateway: TLS: {dict(gw.tls.stats)} connections, {s.tls_failed} "
                  f"handshakes failed; large GETs kept local by reason: {kept}", flush=True)
    return 0
