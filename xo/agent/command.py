"""Run the XO agent of this host: offload protocol (gRPC, mutual TLS) + local app API.

One agent per host. It attaches the TC datapath to the configured interface, serves the
xo.v1.Offload service to its configured peers only, and the unix-socket app API
(proto/xo/v1/local.proto) to local apps. See xo/agent/config.py for the config file.

examples:
  xo agent -c /etc/xo/agent.toml                 run until SIGTERM / Ctrl-C
  xo agent -c agent.toml -v                      log every handoff (never state bytes)
  xo agent -c agent.toml --timings phases.jsonl  append per-handoff phase times (benchmarks)
  xo agent -c agent.toml --detach-on-exit        remove the TC programs and flows at exit
  xo agent -c agent.toml --log-format json       JSON lines (no key or state bytes, ever)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from xo.agent.config import ConfigError, load
from xo.agent.jsonlog import JsonFormatter
from xo.lab import LabError, netns_entered


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, type=Path, help="agent TOML file")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: info, -vv: debug")
    parser.add_argument("--timings", type=Path, help="append phase timings as JSON lines")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per line (xo.agent.jsonlog)")
    parser.add_argument("--detach-on-exit", action="store_true",
                        help="remove the datapath (programs, pinned flows) when stopping")


def run(args: argparse.Namespace) -> int:
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        cfg = load(args.config)
    except ConfigError as e:
        print(f"xo agent: {e}", file=sys.stderr)
        return 2
    # BCC and gRPC load only once the config is good.
    from xo.agent.daemon import serve
    from xo.datapath import Datapath, DatapathError

    try:
        # Before any thread exists: gRPC's threads and every socket we create inherit it.
        with netns_entered(cfg.netns) if cfg.netns else contextlib.nullcontext():
            dp = Datapath.attach(cfg.interface, netns=cfg.netns, pin_dir=cfg.pin_dir,
                                 max_flows=cfg.max_flows)
            try:
                asyncio.run(serve(cfg, dp, args.timings))
            finally:
                dp.detach() if args.detach_on_exit else dp.close()
    except (DatapathError, LabError, OSError) as e:
        print(f"xo agent {cfg.name}: {e}", file=sys.stderr)
        return 1
    return 0
