"""The transport floor of the offload protocol: what one agent-to-agent exchange costs in
Python gRPC (grpc.aio, mutual TLS) with nothing else in the processes.

A server process in one lab namespace answers at once (a unary `Handoff` with an empty
reply, a `Session` that echoes each message as its reply); a client process in another
measures round trips of a handoff-sized request: as unary calls, and as messages on one open
session. `xo bench-protocol --floor N` runs it; the gap between these numbers and the
agents' `handoff_rpc` is what the agents themselves add.

    python -m xo.agent.floor serve PKI_DIR NAME ADDR:PORT
    python -m xo.agent.floor measure PKI_DIR NAME PEER ADDR:PORT N   (prints JSON)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio

from xo.agent import rpc
from xo.pki import TlsFiles
from xo.v1 import offload_pb2, offload_pb2_grpc

WARMUP = 20
# A handoff request's size in the protocol benchmark: a 100-byte HTTP request as preread and
# a TCP state with small queues.
PREREAD = b"G" * 100
NS_PER_US = 1000
PERCENTILE = 99
CALL_TIMEOUT_S = 5.0


def _files(folder: Path, name: str) -> TlsFiles:
    return TlsFiles(folder / "ca.pem", folder / f"{name}.pem", folder / f"{name}.key")


class _Echo(offload_pb2_grpc.OffloadServicer):
    async def Handoff(self, request: offload_pb2.HandoffRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> offload_pb2.HandoffReply:
        return offload_pb2.HandoffReply(accepted=True)

    async def Session(self, request_iterator: AsyncIterator[offload_pb2.PeerMessage],  # noqa: N802
                      context: grpc.aio.ServicerContext) -> None:
        async for msg in request_iterator:
            await context.write(offload_pb2.PeerMessage(
                id=msg.id, handoff_reply=offload_pb2.HandoffReply(accepted=True)))


async def serve(folder: Path, name: str, listen: str) -> None:
    server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
    offload_pb2_grpc.add_OffloadServicer_to_server(_Echo(), server)
    server.add_secure_port(listen, rpc.server_credentials(_files(folder, name)))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def _summary(samples_ns: list[int]) -> dict[str, float]:
    us = sorted(s / NS_PER_US for s in samples_ns[WARMUP:])
    p99 = us[min(len(us) - 1, round(PERCENTILE / 100 * (len(us) - 1)))]
    return {"median_us": statistics.median(us), "p99_us": p99}


async def measure(folder: Path, name: str, peer: str, address: str,
                  n: int) -> dict[str, dict[str, float]]:
    options = [*rpc.CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", peer)]
    channel = grpc.aio.secure_channel(address, rpc.channel_credentials(_files(folder, name)),
                                      options=options)
    stub = offload_pb2_grpc.OffloadStub(channel)
    request = offload_pb2.HandoffRequest(handoff_id="floor-1", preread=PREREAD,
                                         tcp=offload_pb2.TcpState(version=1))
    unary, session = [], []
    for _ in range(n + WARMUP):
        t0 = time.perf_counter_ns()
        await stub.Handoff(request, timeout=CALL_TIMEOUT_S)
        unary.append(time.perf_counter_ns() - t0)
    call = stub.Session()
    for i in range(n + WARMUP):
        t0 = time.perf_counter_ns()
        await call.write(offload_pb2.PeerMessage(id=i, handoff=request))
        await call.read()
        session.append(time.perf_counter_ns() - t0)
    call.cancel()
    await channel.close()
    return {"unary": _summary(unary), "session": _summary(session)}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "serve":
        asyncio.run(serve(Path(argv[1]), argv[2], argv[3]))
        return 0
    if len(argv) == 6 and argv[0] == "measure":
        out = asyncio.run(measure(Path(argv[1]), argv[2], argv[3], argv[4], int(argv[5])))
        print(json.dumps(out))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
