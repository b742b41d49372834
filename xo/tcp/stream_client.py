"""An ordinary TCP client that streams both ways: the "unmodified client" of the migration
tests and the demo. It uses only the standard library (no xo import), knows nothing about
migration, and reports what it sent and received so the other side can be checked byte-exact.

usage: python stream_client.py HOST PORT SEED SEND_BYTES RECV_BYTES [--chunk N]
                               [--send-gap S] [--recv-gap S] [--progress]
Sends SEND_BYTES of random.Random(SEED).randbytes() while reading RECV_BYTES; then shuts down
its write side and reads until the server's EOF (a request/response client: it stays
ESTABLISHED until it has everything); prints one JSON line: sent, sent_sha256, received,
recv_sha256, max_recv_gap_ms.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import threading
import time

TIMEOUT_S = 60.0
RECV_SIZE = 65536
PROGRESS_EVERY_S = 0.2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("seed", type=int)
    p.add_argument("send_bytes", type=int)
    p.add_argument("recv_bytes", type=int)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--send-gap", type=float, default=0.0, help="seconds between chunks")
    p.add_argument("--recv-gap", type=float, default=0.0, help="seconds between reads")
    p.add_argument("--progress", action="store_true", help="JSON progress lines on stderr")
    a = p.parse_args()

    payload = random.Random(a.seed).randbytes(a.send_bytes)
    sock = socket.create_connection((a.host, a.port), timeout=TIMEOUT_S)
    print(json.dumps({"event": "connected", "local": sock.getsockname()[:2]}), flush=True)
    sent = [0]

    def send() -> None:
        view = memoryview(payload)
        while view:
            n = sock.send(view[: a.chunk])
            view = view[n:]
            sent[0] += n
            if a.send_gap:
                time.sleep(a.send_gap)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    digest = hashlib.sha256()
    received = 0
    last = time.monotonic()
    next_report = last + PROGRESS_EVERY_S
    max_gap = 0.0
    shut = False
    while True:
        if received >= a.recv_bytes and not shut:
            sender.join(TIMEOUT_S)
            sock.shutdown(socket.SHUT_WR)
            shut = True
        data = sock.recv(RECV_SIZE)
        now = time.monotonic()
        if received:  # gaps between data, not the wait for the server's first byte
            max_gap = max(max_gap, now - last)
        last = now
        if not data:
            break
        digest.update(data)
        received += len(data)
        if a.progress and now >= next_report:
            next_report = now + PROGRESS_EVERY_S
            sys.stderr.write(json.dumps({"sent": sent[0], "received": received}) + "\n")
            sys.stderr.flush()
        if a.recv_gap:
            time.sleep(a.recv_gap)
    sender.join(TIMEOUT_S)
    sock.close()
    print(
        json.dumps(
            {
                "event": "done",
                "sent": sent[0],
                "sent_sha256": hashlib.sha256(payload[: sent[0]]).hexdigest(),
                "received": received,
                "recv_sha256": digest.hexdigest(),
                "max_recv_gap_ms": round(max_gap * 1000, 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
