"""Run one S3 storage node of the config: durable object store plus the internal HTTP API.

With an agent socket (nodes[].agent_socket or --agent-socket) the node also serves the GETs
whose client connections the gateway offloads to it, and gives the connections back.

examples:
  xo s3-node -c integrations/rgw/s3.toml --name n0
  xo s3-node -c s3.toml --name n1 --data-dir /srv/s3/n1 --listen 0.0.0.0:9101
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from xo.rgw.cmd_gateway import wait_for_signal
from xo.rgw.config import ConfigError, load, parse_listen
from xo.rgw.node import StorageNode
from xo.rgw.offload import NodeAgentLink
from xo.rgw.store import Store


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="TOML configuration file")
    parser.add_argument("--name", required=True, help="which [[nodes]] entry this is")
    parser.add_argument("--data-dir", type=Path, help="overrides nodes[].data_dir")
    parser.add_argument("--listen", help="ADDR:PORT, overrides nodes[].address")
    parser.add_argument("--agent-socket", help="overrides nodes[].agent_socket")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        config = load(args.config)
        spec = config.node(args.name)
        data_dir = args.data_dir or spec.data_dir
        if data_dir is None:
            raise ConfigError(f"node {spec.name}: no data_dir in the config and no --data-dir")
        listen = parse_listen(args.listen) if args.listen else spec.address.sockaddr()
    except ConfigError as e:
        print(f"xo s3-node: {e}", file=sys.stderr)
        return 2
    agent_socket = args.agent_socket or spec.agent_socket
    try:
        node = StorageNode(Store(data_dir), listen)
    except OSError as e:
        print(f"xo s3-node {spec.name}: {e}", file=sys.stderr)
        return 1
    with node:
        link = NodeAgentLink(node, agent_socket, config.offload.agent_timeout) \
            if agent_socket else None
        host, port = node.address[:2]
        print(f"s3-node {spec.name} listening on {host}:{port}, data in {data_dir}"
              f"{', offload on' if link else ''}", flush=True)
        try:
            wait_for_signal()
        finally:
            if link is not None:
                link.close()
    return 0
