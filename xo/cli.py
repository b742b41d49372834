"""The `xo` command: one subcommand per module, imported only when chosen.

Each subcommand module exposes `configure(parser)` (add its arguments) and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Keep the public names of ARCHITECTURE.md stable.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("xo.demo", "run the live migration demo in a lab of network namespaces"),
    "bench-protocol": ("xo.agent.bench", "benchmark handoffs: phases, blackout, handoffs/s"),
    "agent": ("xo.agent.command", "run this host's agent (offload protocol + local app API)"),
    "status": ("xo.status", "show a running agent's flows, rules, peers and counters"),
    "bench": ("xo.bench.command", "run the benchmarks in a lab, write a report with plots"),
    "lab": ("xo.lab", "build or remove a lab of network namespaces (lab up|down|list)"),
    "bench-tcp": ("xo.bench_tcp", "benchmark TCP capture/restore and the client's blackout"),
    "bench-datapath": ("xo.datapath.bench", "benchmark the eBPF flow table and a move's blackout"),
    "bench-hwrules": ("xo.hwrules.bench", "eBPF vs flower rule insert/remove (in the kernel VM)"),
    "s3-gateway": ("xo.rgw.cmd_gateway", "run the S3 gateway (offloads large GETs to nodes)"),
    "s3-node": ("xo.rgw.cmd_node", "run an S3 storage node"),
    "s3-bench": ("xo.rgw.cmd_bench", "S3 GET throughput in a lab: proxy vs offload"),
    "bench-nginx": ("xo.nginx_bench", "nginx: handoff module vs proxy_pass, throughput and CPU"),
    "bench-tls": ("xo.tls.bench", "benchmark kTLS capture/install and a TLS handoff's blackout"),
}

EPILOG = """examples:
  xo demo                     live migration of a TCP connection, with a summary
  xo <command> --help         usage and examples of one command
"""


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Build the parser; only the selected command's module is imported (BCC is slow)."""
    parser = argparse.ArgumentParser(
        prog="xo",
        description="Offload live TCP (and kernel TLS) connections between hosts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if name != selected:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
