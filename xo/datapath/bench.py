"""Benchmark the datapath: flow table insert/delete latency from Python, and the blackout of a
live TCP connection moved frontend -> backend with the eBPF BLOCK vs an nftables block.

The blackout is the time the flow's inbound packets are dropped: freeze, capture, release,
source rewrite + restore on the backend, redirect, thaw. Both freezers run in the same lab,
alternating move by move, so the comparison holds on a noisy machine.

examples:
  xo bench-datapath                       defaults: 20000 map operations, 30 moves per freezer
  xo bench-datapath --ops 5000 --moves 10 quicker, noisier
"""

from __future__ import annotations

import argparse
import ctypes
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from xo.datapath.datapath import Datapath
from xo.datapath.freezer import BlockFreezer
from xo.datapath.layout import Redirect
from xo.flow import Endpoint, FlowKey
from xo.freeze import Freezer, NftFreezer
from xo.lab import Host, Lab

NS_PER_US = 1000
NS_PER_MS = 1_000_000
P99 = 0.99
FIRST_CLIENT_PORT = 20000
VPORT = 8080
HANDOFF_PORT = 47000
PING = b"ping"
CONNECT_TIMEOUT_S = 5.0
CLOSE_GRACE_S = 0.01
PORTS_PER_ADDR = 60000  # synthetic client flows: this many ports per client address


@dataclass
class Summary:
    median: float
    p99: float
    n: int


def summarize(samples_ns: list[int], unit_ns: int) -> Summary:
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * P99))]
    return Summary(statistics.median(ordered) / unit_ns, p99 / unit_ns, len(ordered))


def timed(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def bench_map_ops(dp: Datapath, host: Host, ops: int) -> dict[str, Summary]:
    """API-level block()/remove() and the bare map syscalls, each over `ops` distinct flows."""
    vip = Endpoint(host.ip4, VPORT)
    flows = [
        FlowKey(Endpoint(host.ip4 + 1 + i // PORTS_PER_ADDR, 1 + i % PORTS_PER_ADDR), vip)
        for i in range(ops)
    ]
    insert = [timed(partial(dp.block, f)) for f in flows]
    delete = [timed(partial(dp.remove, f)) for f in flows]
    # One bpf_map_update_elem / delete_elem through ctypes, without the API's bookkeeping.
    from bcc.libbcc import lib  # type: ignore[import-untyped]

    from xo.datapath.layout import Action, Direction, make_action, make_key

    fd = dp._live().flows.map_fd
    keys = [make_key(f, Direction.INGRESS) for f in flows]
    value = make_action(Action.BLOCK)
    vref = ctypes.byref(value)
    raw_insert = [timed(partial(lib.bpf_update_elem, fd, ctypes.byref(k), vref, 0)) for k in keys]
    raw_delete = [timed(partial(lib.bpf_delete_elem, fd, ctypes.byref(k))) for k in keys]
    return {
        "block() insert": summarize(insert, NS_PER_US),
        "remove() delete": summarize(delete, NS_PER_US),
        "raw map update": summarize(raw_insert, NS_PER_US),
        "raw map delete": summarize(raw_delete, NS_PER_US),
    }


def _connect(c: Host, local: Endpoint, vip: Endpoint) -> socket.socket:
    with c.enter():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(local.sockaddr())
        s.settimeout(CONNECT_TIMEOUT_S)
        s.connect(vip.sockaddr())
    return s


def _round_trip(client: socket.socket, server: socket.socket) -> None:
    client.sendall(PING)
    server.sendall(server.recv(len(PING)))
    if client.recv(len(PING)) != PING:
        raise RuntimeError("echo mismatch after the move")


def move_once(
    lab: Lab,
    dp_f: Datapath,
    dp_b: Datapath,
    freezer: Freezer,
    srv: socket.socket,
    client_port: int,
) -> tuple[int, int, int]:
    """Move one fresh connection; returns (blackout, freeze, thaw) in ns."""
    from xo import tcp

    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    vip = Endpoint(lab.vip4, VPORT)
    handoff = Endpoint(b.ip4, HANDOFF_PORT + client_port - FIRST_CLIENT_PORT)
    client = _connect(c, Endpoint(c.ip4, client_port), vip)
    conn, _ = srv.accept()
    _round_trip(client, conn)
    flow = FlowKey(Endpoint(c.ip4, client_port), vip)
    with f.enter():
        t0 = time.perf_counter_ns()
        freezer.freeze(flow)
        t1 = time.perf_counter_ns()
        state = tcp.capture(conn)
        tcp.release(conn)
        dp_b.snat(FlowKey(flow.client, handoff), vip)
        with b.enter():
            # As the agent does: no window probe into a path that is still frozen.
            moved = tcp.restore(state, local=handoff, probe=False)
        dp_f.redirect(flow, Redirect(handoff, mac=b.mac))
        t2 = time.perf_counter_ns()
        freezer.thaw(flow)
        tcp.nudge(moved)
        t3 = time.perf_counter_ns()
    moved.settimeout(CONNECT_TIMEOUT_S)
    _round_trip(client, moved)
    client.close()
    moved.close()
    time.sleep(CLOSE_GRACE_S)  # let FIN/ACK cross before the rules go
    dp_f.remove(flow)
    dp_b.remove(FlowKey(flow.client, handoff))
    return t3 - t0, t1 - t0, t3 - t2


def bench_moves(lab: Lab, dp_f: Datapath, dp_b: Datapath, moves: int) -> dict[str, Summary]:
    f = lab.frontends[0]
    with f.enter():
        srv = socket.create_server((str(lab.vip4), VPORT))
        nft = NftFreezer(table="xo_bench")
    srv.settimeout(CONNECT_TIMEOUT_S)
    freezers: dict[str, Freezer] = {"ebpf": BlockFreezer(dp_f), "nftables": nft}
    samples: dict[str, list[tuple[int, int, int]]] = {name: [] for name in freezers}
    try:
        port = FIRST_CLIENT_PORT
        for _ in range(moves):
            for name, freezer in freezers.items():
                samples[name].append(move_once(lab, dp_f, dp_b, freezer, srv, port))
                port += 1
    finally:
        with f.enter():
            nft.close()
        srv.close()
    out = {}
    for name, rows in samples.items():
        out[f"{name}: blackout"] = summarize([r[0] for r in rows], NS_PER_MS)
        out[f"{name}: freeze"] = summarize([r[1] for r in rows], NS_PER_MS)
        out[f"{name}: thaw"] = summarize([r[2] for r in rows], NS_PER_MS)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=int, default=20000, help="map operations to time")
    parser.add_argument("--moves", type=int, default=30, help="connection moves per freezer")


def run(args: argparse.Namespace) -> int:
    with Lab(clients=1, frontends=1, backends=1) as lab:
        dp_f = Datapath.attach("eth0", netns=lab.frontends[0].netns, max_flows=args.ops + 16)
        dp_b = Datapath.attach("eth0", netns=lab.backends[0].netns)
        try:
            ops = bench_map_ops(dp_f, lab.frontends[0], args.ops)
            moves = bench_moves(lab, dp_f, dp_b, args.moves)
        finally:
            dp_f.detach()
            dp_b.detach()
    print("| operation | median | p99 | n |")
    print("|---|---|---|---|")
    for name, s in ops.items():
        print(f"| {name} | {s.median:.2f} µs | {s.p99:.2f} µs | {s.n} |")
    for name, s in moves.items():
        print(f"| move, {name} | {s.median:.3f} ms | {s.p99:.3f} ms | {s.n} |")
    return 0
