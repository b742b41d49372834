"""The two server processes of a live TCP handover: `origin` serves a client, freezes the
flow, captures and releases the socket; `target` (another process, another namespace, another
address) restores it and serves the client to the end. Used by the net tests and `xo demo`.

The driver talks to both over stdin/stdout, one JSON object per line:
  origin -> {"event": "listening"} ... {"event": "captured", "state": b64, "app": {...}}
  driver -> origin "thaw"   (once the redirect to the target is in place)
  driver -> target {"state": b64, "app": {...}} ; target -> {"event": "restored"}
  driver -> target "ready"  ; target -> {"event": "done", ...}

Both serve the same protocol: send random.Random(SEED).randbytes(SEND_TOTAL) to the client
while reading and hashing whatever the client sends, until the client's EOF.

usage: python -m xo.tcp.handover origin --listen ADDR:PORT --seed N --send-total N [...]
       python -m xo.tcp.handover target --local ADDR:PORT --seed N --send-total N
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import random
import selectors
import socket
import struct
import sys
import time
from typing import Any

from xo import tcp, uapi
from xo.flow import Endpoint
from xo.freeze import NftFreezer, inbound_flow

RECV_SIZE = 65536
SEND_SIZE = 65536
POLL_S = 0.0005
QUEUE_WAIT_S = 5.0
IO_TIMEOUT_S = 60.0
NS_PER_US = 1000


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def expect_line(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise SystemExit(f"expected {word!r} on stdin, got {line!r}")


class Server:
    """One side of the stream: what is left to send, and a hash of what was received."""

    def __init__(self, sock: socket.socket, payload: bytes, sent: int = 0) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.payload = payload
        self.sent = sent
        self.received = 0
        self.digest = hashlib.sha256()
        self.eof = False

    def read_some(self, limit: int = RECV_SIZE) -> None:
        try:
            data = self.sock.recv(min(limit, RECV_SIZE))
        except BlockingIOError:
            return
        if not data:
            self.eof = True
        self.digest.update(data)
        self.received += len(data)

    def write_some(self, until: int) -> None:
        try:
            self.sent += self.sock.send(self.payload[self.sent : min(until, self.sent + SEND_SIZE)])
        except BlockingIOError:
            return

    def pump(self, read_until: int | None, write_until: int) -> None:
        """Read (up to read_until bytes in total, None = to EOF) and write until both done."""
        sel = selectors.DefaultSelector()
        deadline = time.monotonic() + IO_TIMEOUT_S
        try:
            while True:
                want_read = not self.eof and (read_until is None or self.received < read_until)
                want_write = self.sent < write_until
                if not (want_read or want_write):
                    return
                mask = (selectors.EVENT_READ if want_read else 0) | (
                    selectors.EVENT_WRITE if want_write else 0
                )
                sel.register(self.sock, mask)
                ready = sel.select(1.0)
                sel.unregister(self.sock)
                if time.monotonic() > deadline:
                    raise SystemExit(f"stream stalled: sent {self.sent} received {self.received}")
                for _, events in ready:
                    if events & selectors.EVENT_READ:
                        left = RECV_SIZE if read_until is None else read_until - self.received
                        self.read_some(left)
                    if events & selectors.EVENT_WRITE:
                        self.write_some(write_until)
        finally:
            sel.close()


def unread_bytes(sock: socket.socket) -> int:
    """SIOCINQ: bytes in the receive queue that the application has not read yet."""
    raw = fcntl.ioctl(sock.fileno(), uapi.SIOCINQ, bytes(4))
    return int(struct.unpack("=i", raw)[0])


def run_origin(a: argparse.Namespace) -> int:
    listen = Endpoint.parse(a.listen)
    family = socket.AF_INET if listen.family == 4 else socket.AF_INET6
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for opt, val in ((socket.SO_SNDBUF, a.sndbuf), (socket.SO_RCVBUF, a.rcvbuf)):
        if val:
            lsock.setsockopt(socket.SOL_SOCKET, opt, val)
    lsock.bind(listen.sockaddr())
    lsock.listen(1)
    freezer = NftFreezer()
    emit(event="listening")
    conn, _ = lsock.accept()
    lsock.close()
    srv = Server(conn, random.Random(a.seed).randbytes(a.send_total))
    srv.pump(a.read_before, a.write_before)
    # Stop reading; let the client's bytes pile up in the receive queue.
    deadline = time.monotonic() + QUEUE_WAIT_S
    while unread_bytes(conn) < a.min_recv_queue and time.monotonic() < deadline:
        time.sleep(POLL_S)
    flow = inbound_flow(conn)
    t0 = time.perf_counter_ns()
    freezer.freeze(flow)
    t1 = time.perf_counter_ns()
    # Written while the peer's ACKs are dropped: part goes out unacked, the rest stays unsent.
    frozen_until = min(a.send_total, srv.sent + a.write_frozen)
    before = -1
    while srv.sent < frozen_until and srv.sent != before:
        before = srv.sent
        srv.write_some(frozen_until)
    t2 = time.perf_counter_ns()
    state = tcp.capture(conn)
    t3 = time.perf_counter_ns()
    tcp.release(conn)
    emit(
        event="captured",
        state=base64.b64encode(state.to_bytes()).decode(),
        app={"sent": srv.sent, "received": srv.received},
        received=srv.received,
        recv_sha256=srv.digest.hexdigest(),
        queues={
            "recv": len(state.recv_queue),
            "unacked": len(state.send_unacked),
            "unsent": len(state.send_unsent),
        },
        freeze_us=(t1 - t0) / NS_PER_US,
        capture_us=(t3 - t2) / NS_PER_US,
    )
    expect_line("thaw")
    freezer.thaw(flow)
    freezer.close()
    emit(event="thawed")
    return 0


def run_target(a: argparse.Namespace) -> int:
    handoff = json.loads(sys.stdin.readline())
    state = tcp.TcpState.from_bytes(base64.b64decode(handoff["state"]))
    t0 = time.perf_counter_ns()
    sock = tcp.restore(state, local=Endpoint.parse(a.local), probe=False)
    t1 = time.perf_counter_ns()
    emit(event="restored", restore_us=(t1 - t0) / NS_PER_US)
    expect_line("ready")
    tcp.nudge(sock)
    payload = random.Random(a.seed).randbytes(a.send_total)
    srv = Server(sock, payload, sent=handoff["app"]["sent"])
    srv.pump(None, a.send_total)
    sock.close()
    emit(event="done", received=srv.received, recv_sha256=srv.digest.hexdigest(), sent=srv.sent)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xo.tcp.handover", description=__doc__)
    sub = p.add_subparsers(dest="role", required=True)
    o = sub.add_parser("origin")
    o.add_argument("--listen", required=True)
    o.add_argument("--read-before", type=int, default=0, help="client bytes read, then stop")
    o.add_argument("--write-before", type=int, default=0, help="bytes sent before the freeze")
    o.add_argument("--min-recv-queue", type=int, default=1, help="wait for this many unread")
    o.add_argument("--write-frozen", type=int, default=0, help="bytes written after the freeze")
    o.add_argument("--sndbuf", type=int, default=0)
    o.add_argument("--rcvbuf", type=int, default=0)
    t = sub.add_parser("target")
    t.add_argument("--local", required=True)
    for q in (o, t):
        q.add_argument("--seed", type=int, required=True)
        q.add_argument("--send-total", type=int, required=True)
    a = p.parse_args(argv)
    return run_origin(a) if a.role == "origin" else run_target(a)


if __name__ == "__main__":
    sys.exit(main())
