"""Rule insert/remove latency, eBPF map vs flower (software) vs flower on netdevsim, same run.

Runs inside the kernel-tier VM (this host has no cls_flower), in a network namespace of its
own, and prints markdown tables for BENCHMARKS.md:

examples:
  scripts/kernel-tier.sh --exec bash -c \\
    '.venv/bin/xo bench-hwrules --rules 100 --netdevsim $XO_NETDEVSIM_DIR/flower/netdevsim.ko'
  scripts/kernel-tier.sh --exec .venv/bin/xo bench-hwrules      (no netdevsim rows)

Per rule: eBPF = Datapath.redirect()/remove() (a map update from Python); flower = one
NetlinkTransport.add()/delete() round trip (NLM_F_ECHO add, so the latency includes the
confirmation of where the rule landed). Queue throughput = N rules submitted at once until the
worker drained them, then N ends.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from pyroute2 import IPRoute

from xo.datapath.layout import Redirect
from xo.flow import Endpoint, FlowKey
from xo.hwrules.netdevsim import Netdevsim
from xo.hwrules.policy import SizePolicy
from xo.hwrules.queue import HwRuleQueue
from xo.hwrules.rules import FlowerRule, Placement, redirect_rule
from xo.hwrules.transport import NetlinkTransport

NS_PER_US = 1000
NETDEVSIM_ID = 11
VETH, PEER = "xob0", "xob1"
MAC, BACKEND_MAC = "02:00:00:00:00:01", "02:00:00:00:00:21"
EVERY_FLOW = SizePolicy(threshold=0)
WAIT_S = 600.0
P90 = 0.9


def flows(n: int) -> list[FlowKey]:
    client = ipaddress.ip_address("198.18.0.10")
    vip = Endpoint(ipaddress.ip_address("198.18.0.100"), 80)
    return [FlowKey(Endpoint(client + i // 60000, 1024 + i % 60000), vip) for i in range(n)]


def target(i: int) -> Redirect:
    return Redirect(Endpoint(ipaddress.ip_address("198.18.0.21"), 10000 + i % 50000),
                    mac=BACKEND_MAC)


def timed(op: Callable[[], object]) -> int:
    start = time.perf_counter_ns()
    op()
    return time.perf_counter_ns() - start


def summary(name: str, samples: list[int]) -> str:
    us = sorted(s / NS_PER_US for s in samples)
    p90 = us[int(len(us) * P90)]
    return f"| {name} | {len(us)} | {statistics.median(us):.1f} | {p90:.1f} |"


@contextmanager
def bench_netns(name: str) -> Iterator[None]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True)


def ifindex(netns: str | None, ifname: str) -> int:
    with IPRoute(**({"netns": netns} if netns else {})) as ipr:
        return int(ipr.link_lookup(ifname=ifname)[0])


def bench_ebpf(netns: str, fl: list[FlowKey]) -> list[str]:
    from xo.datapath import Datapath

    with Datapath.attach(VETH, netns=netns) as dp:
        add = [timed(partial(dp.redirect, f, target(i))) for i, f in enumerate(fl)]
        rm = [timed(partial(dp.remove, f)) for f in fl]
    return [summary("eBPF map: insert (redirect)", add), summary("eBPF map: remove", rm)]


def rules_for(fl: list[FlowKey], idx: int, placement: Placement) -> list[FlowerRule]:
    return [redirect_rule(f, target(i), idx, MAC, placement).with_handle(i + 1)
            for i, f in enumerate(fl)]


def bench_flower(label: str, netns: str | None, rules: list[FlowerRule]) -> list[str]:
    transport = NetlinkTransport(netns)
    try:
        add = [timed(partial(transport.add, r)) for r in rules]
        rm = [timed(partial(transport.delete, r)) for r in rules]
    finally:
        transport.close()
    return [summary(f"flower {label}: insert", add), summary(f"flower {label}: remove", rm)]


def bench_queue(label: str, netns: str | None, rules: list[FlowerRule]) -> str:
    queue = HwRuleQueue(NetlinkTransport(netns), policy=EVERY_FLOW)
    try:
        start = time.perf_counter()
        for r in rules:
            queue.submit(r, size=0)
        queue.drain(WAIT_S)
        added = time.perf_counter() - start
        states = {queue.state(r.flow) for r in rules}
        start = time.perf_counter()
        for r in rules:
            queue.end(r.flow)
        queue.drain(WAIT_S)
        removed = time.perf_counter() - start
    finally:
        queue.close(timeout=WAIT_S)
    landed = ",".join(sorted(s.value for s in states if s))
    return (f"| queue, flower {label} | {len(rules)} | {len(rules) / added:.0f} rules/s in "
            f"({landed}) | {len(rules) / removed:.0f} rules/s out |")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", type=int, default=200, help="rules per measurement")
    parser.add_argument("--netdevsim", type=Path, help="patched netdevsim.ko (flower accepted)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xo.hwrules.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.rules <= 0:
        print("xo bench-hwrules: --rules must be positive", file=sys.stderr)
        return 2
    if os.environ.get("XO_KERNEL_TIER") != "1":
        print("xo bench-hwrules: run it in the kernel-tier VM (scripts/kernel-tier.sh --exec)",
              file=sys.stderr)
        return 2
    fl = flows(args.rules)
    netns = f"xobench{os.getpid()}"
    rows = ["| what | rules | median µs | p90 µs |", "| --- | --- | --- | --- |"]
    queue_rows = ["| queue | rules | insert | remove |", "| --- | --- | --- | --- |"]
    with bench_netns(netns):
        ip(netns, "link", "add", VETH, "type", "veth", "peer", "name", PEER)
        ip(netns, "link", "set", VETH, "up")
        ip(netns, "link", "set", PEER, "up")
        rows += bench_ebpf(netns, fl)
        subprocess.run(["tc", "-n", netns, "qdisc", "add", "dev", VETH, "clsact"], check=True)
        sw = rules_for(fl, ifindex(netns, VETH), Placement.SW_ONLY)
        rows += bench_flower("software (veth, skip_hw)", netns, sw)
        queue_rows.append(bench_queue("software", netns, sw))
    if args.netdevsim:
        with Netdevsim(args.netdevsim, NETDEVSIM_ID) as dev:
            subprocess.run(["tc", "qdisc", "add", "dev", dev.ifname, "clsact"], check=True)
            hw = rules_for(fl, ifindex(None, dev.ifname), Placement.HW_ONLY)
            rows += bench_flower("netdevsim (skip_sw, in_hw)", None, hw)
            queue_rows.append(bench_queue("netdevsim", None, hw))
    print(f"kernel {os.uname().release}, {os.cpu_count()} vCPU")
    print("\n".join(rows))
    print()
    print("\n".join(queue_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
