"""Benchmark kTLS state capture/restore and a TLS handoff's blackout next to plain TCP.

examples:
  xo bench-tls                       codec (anywhere); kernel parts where the kernel has kTLS
  scripts/kernel-tier.sh --exec .venv/bin/xo bench-tls --runs 300     in the VM (kTLS)
  xo bench-tls --json                one JSON object instead of the table

What, all in one run so the ratios hold: (1) TlsState to_bytes/from_bytes next to TcpState;
(2) xo.tls.capture and xo.tls.install on live loopback sockets (seed 003, in C: 3 us / 20 us)
next to xo.tcp.capture; (3) a lab (client, frontend, backend namespaces): one keep-alive
connection moved F -> B -> F -> ... with xo.tls.move (nftables datapath stand-in) after
each request is read and before it is answered, once over kTLS and once plain TCP.
Blackout = freeze to window probe on the server side; quiesce (waiting for ACKs before the
freeze) is shown apart.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xo import tcp
from xo.flow import Endpoint
from xo.lab import Lab
from xo.pki import DevCA
from xo.tls import kernel
from xo.tls.frontend import TlsFrontend
from xo.tls.handshake import ServerTls
from xo.tls.move import FlowPath, MoveTimes, Place, move
from xo.tls.state import TlsCipher, TlsDirection, TlsState, TlsVersion

NS_PER_US = 1000
PORT, BACK_PORT = 8443, 9443
HOST = "xo.test"
PING = b"ping"
IO_TIMEOUT_S = 60.0
TCP_STATE_SAMPLE = "198.18.0.1:443"


def _median_us(fn: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / NS_PER_US)
    return statistics.median(samples)


def _sample_state() -> TlsState:
    c = TlsCipher.AES_GCM_256
    d = TlsDirection(bytearray(c.layout.key), bytearray(c.layout.iv), bytearray(c.layout.salt), 9)
    return TlsState(TlsVersion.TLS_1_3, c, d, TlsDirection(d.key, d.iv, d.salt, 7))


def _sample_tcp_state() -> tcp.TcpState:
    ep = Endpoint.parse(TCP_STATE_SAMPLE)
    return tcp.TcpState(
        local=ep, remote=Endpoint.parse("198.18.0.9:40000"), send_seq=1, recv_seq=2,
        recv_queue=b"", send_unacked=b"", send_unsent=b"", mss_clamp=1460, snd_wscale=7,
        rcv_wscale=7, sack_ok=True, timestamps_ok=True, timestamp=3,
        window=tcp.TcpWindow(1, 2, 3, 4, 5), sndbuf=16384, rcvbuf=131072,
    )


def bench_codec(runs: int) -> dict[str, float]:
    tls, tcp_state = _sample_state(), _sample_tcp_state()
    tls_wire, tcp_wire = tls.to_bytes(), tcp_state.to_bytes()
    return {
        "tls_serialize_us": _median_us(tls.to_bytes, runs),
        "tls_deserialize_us": _median_us(lambda: TlsState.from_bytes(tls_wire), runs),
        "tcp_serialize_us": _median_us(tcp_state.to_bytes, runs),
        "tcp_deserialize_us": _median_us(lambda: tcp.TcpState.from_bytes(tcp_wire), runs),
        "tls_wire_bytes": len(tls_wire),
    }


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        server, _ = lsock.accept()
    return server, client


def bench_syscalls(runs: int) -> dict[str, float]:
    """capture/install on live loopback sockets (needs kTLS and CAP_NET_ADMIN)."""
    state = _sample_state()
    pairs = [_loopback_pair() for _ in range(runs)]
    samples = []
    for server, _ in pairs:
        t0 = time.perf_counter_ns()
        kernel.install(server, state)
        samples.append((time.perf_counter_ns() - t0) / NS_PER_US)
    server = pairs[0][0]

    def tcp_capture() -> None:
        tcp.capture(server)
        tcp.resume(server)

    out = {
        "tls_install_us": statistics.median(samples),
        "tls_capture_us": _median_us(lambda: kernel.capture(server), runs),
        "tcp_capture_resume_us": _median_us(tcp_capture, runs),
    }
    for a, b in pairs:
        a.close()
        b.close()
    return out


def _client(lab: Lab, use_tls: bool, ca: Path, rounds: int, errors: list[BaseException]) -> None:
    try:
        with lab.clients[0].enter():
            raw = socket.create_connection((str(lab.vip4), PORT), timeout=IO_TIMEOUT_S)
        conn: socket.socket = raw
        if use_tls:
            conn = ssl.create_default_context(cafile=str(ca)).wrap_socket(raw, server_hostname=HOST)
        with conn:
            for _ in range(rounds):
                conn.sendall(PING)
                got = b""
                while len(got) < len(PING):
                    chunk = conn.recv(len(PING) - len(got))
                    if not chunk:
                        raise EOFError("server closed")
                    got += chunk
    except BaseException as e:  # reported by the caller
        errors.append(e)


def bench_moves(lab: Lab, use_tls: bool, config: ServerTls, ca: Path,
                moves: int) -> list[MoveTimes]:
    """One connection, `moves` moves alternating F -> B -> F, a ping/pong before each."""
    f, b = lab.frontends[0], lab.backends[0]
    home, away = Place(f, Endpoint(lab.vip4, PORT)), Place(b, Endpoint(b.ip4, BACK_PORT))
    with f.enter():
        lsock = socket.create_server(home.local.sockaddr())
    errors: list[BaseException] = []
    t = threading.Thread(target=_client, args=(lab, use_tls, ca, moves + 1, errors))
    t.start()
    raw, addr = lsock.accept()
    lsock.close()
    conn = TlsFrontend(config).accept(raw) if use_tls else raw
    read = kernel.recv if use_tls else socket.socket.recv
    path = FlowPath(home, Endpoint.parse(f"{addr[0]}:{addr[1]}"))
    out = []
    try:
        for i in range(moves + 1):
            got = b""
            while len(got) < len(PING):
                got += read(conn, len(PING) - len(got))
            # Like an HTTP frontend: the request is read, the answer comes from elsewhere.
            # The client waits for it, so the socket is quiescent (its last pong acked).
            if i < moves:
                conn, times = move(conn, path, away if i % 2 == 0 else home)
                out.append(times)
            conn.sendall(got)
    finally:
        t.join(IO_TIMEOUT_S)
        conn.close()
        path.close()
    if errors:
        raise errors[0]
    return out


def _summary(times: list[MoveTimes]) -> dict[str, float]:
    keys = ("blackout_us", "quiesce_us", "tls_capture_us", "tcp_capture_us", "restore_us",
            "tls_install_us")
    out = {k: statistics.median(getattr(t, k) for t in times) for k in keys}
    out["blackout_min_us"] = min(t.blackout_us for t in times)
    out["moves"] = len(times)
    return out


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=2000, help="codec/syscall repetitions")
    parser.add_argument("--moves", type=int, default=10, help="moves per connection (lab)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="kTLS and plain connections, alternating, each --moves moves")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"codec": bench_codec(args.runs)}
    reason = kernel.unavailable_reason()
    if reason is not None:
        result["kernel"] = f"skipped: {reason}"
    else:
        result["syscalls"] = bench_syscalls(min(args.runs, 200))
        with tempfile.TemporaryDirectory() as d, Lab(clients=1, frontends=1, backends=1) as lab:
            files = DevCA().write(Path(d), HOST)
            config = ServerTls(files.cert, files.key)
            # Alternate kTLS and plain connections so both see the same machine load.
            runs: dict[bool, list[MoveTimes]] = {True: [], False: []}
            for _ in range(args.rounds):
                for use_tls in (True, False):
                    runs[use_tls] += bench_moves(lab, use_tls, config, files.ca, args.moves)
            result["moves_ktls"] = _summary(runs[True])
            result["moves_tcp"] = _summary(runs[False])
    if args.json:
        print(json.dumps(result))
        return 0
    for section, values in result.items():
        print(f"[{section}]")
        if isinstance(values, str):
            print(f"  {values}")
            continue
        for k, v in values.items():
            print(f"  {k:24s} {v:10.1f}")
    return 0
