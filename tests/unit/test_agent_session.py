"""The agents' transport (xo.agent.rpc.Channels, PeerSession) against a real grpc.aio server
with mutual TLS on 127.0.0.1 (no root needed). The peer is a stand-in servicer whose answers
each test controls: the real target needs a datapath (net tier, tests/net/test_offload*.py,
where every handoff after the first of a keep-alive connection rides a session)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import grpc.aio
import pytest

from xo.agent import rpc
from xo.agent.config import AgentConfig, HandoffRange, LocalApi, Peer
from xo.pki import DevCA
from xo.v1 import offload_pb2, offload_pb2_grpc

Handler = Callable[[offload_pb2.PeerMessage, grpc.aio.ServicerContext],
                   Awaitable[offload_pb2.PeerMessage | None]]


class StandIn(offload_pb2_grpc.OffloadServicer):
    """Answers unary Handoffs and session messages through `on_message`; counts both."""

    def __init__(self, on_message: Handler | None) -> None:
        self.on_message = on_message
        self.unary = 0
        self.sessions_opened = 0
        self.sessions_ended = 0
        self.messages = 0

    async def Handoff(self, request: offload_pb2.HandoffRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> offload_pb2.HandoffReply:
        self.unary += 1
        return offload_pb2.HandoffReply(accepted=True, detail=f"unary {request.handoff_id}")

    async def Session(self, request_iterator: AsyncIterator[offload_pb2.PeerMessage],  # noqa: N802
                      context: grpc.aio.ServicerContext) -> None:
        if self.on_message is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no sessions here")
        self.sessions_opened += 1
        try:
            async for msg in request_iterator:
                self.messages += 1
                asyncio.get_running_loop().create_task(self._answer(msg, context))
        finally:
            self.sessions_ended += 1

    async def _answer(self, msg: offload_pb2.PeerMessage,
                      context: grpc.aio.ServicerContext) -> None:
        assert self.on_message is not None
        reply = await self.on_message(msg, context)
        if reply is not None:
            await context.write(reply)


def echo_reply(msg: offload_pb2.PeerMessage) -> offload_pb2.PeerMessage:
    return offload_pb2.PeerMessage(id=msg.id, handoff_reply=offload_pb2.HandoffReply(
        accepted=True, detail=f"session {msg.handoff.handoff_id}"))


async def echo(msg: offload_pb2.PeerMessage,
               context: grpc.aio.ServicerContext) -> offload_pb2.PeerMessage | None:
    return echo_reply(msg)


def request(hid: str) -> offload_pb2.HandoffRequest:
    return offload_pb2.HandoffRequest(handoff_id=hid)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[DevCA, Path]:
    return DevCA(), tmp_path_factory.mktemp("pki")


def run(pki: tuple[DevCA, Path], on_message: Handler | None,
        body: Callable[[rpc.Channels, Peer, StandIn], Awaitable[None]]) -> StandIn:
    """Serve a StandIn as "peer" and run `body` with our Channels to it."""
    ca, folder = pki

    async def main() -> StandIn:
        standin = StandIn(on_message)
        server = grpc.aio.server(options=rpc.SERVER_OPTIONS)
        offload_pb2_grpc.add_OffloadServicer_to_server(standin, server)
        port = server.add_secure_port("127.0.0.1:0", rpc.server_credentials(
            ca.write(folder, "peer")))
        await server.start()
        peer = Peer("peer", f"127.0.0.1:{port}", "peer")
        cfg = AgentConfig(name="me", interface="lo", listen="127.0.0.1:0",
                          handoff=HandoffRange((), 40000, 40001), tls=ca.write(folder, "me"),
                          local=LocalApi(folder / "me.sock", 0o600), peers=(peer,))
        channels = rpc.Channels(cfg)
        try:
            await body(channels, peer, standin)
        finally:
            await channels.close()
            await server.stop(None)
        return standin

    return asyncio.run(main())


def test_cold_exchange_is_unary_then_a_session_while_warm_then_closed_when_idle(
        pki: tuple[DevCA, Path]) -> None:
    async def body(ch: rpc.Channels, peer: Peer, s: StandIn) -> None:
        first = await ch.handoff(peer, request("h-1"), timeout=5)
        assert first.detail == "unary h-1" and s.sessions_opened == 0
        second = await ch.handoff(peer, request("h-2"), timeout=5)
        third = await ch.handoff(peer, request("h-3"), timeout=5)
        assert (second.detail, third.detail) == ("session h-2", "session h-3")
        assert (s.unary, s.sessions_opened, s.messages) == (1, 1, 2)
        await asyncio.sleep(rpc.SESSION_IDLE_S * 3)
        assert s.sessions_ended == 1, "an idle session stays open"
        fourth = await ch.handoff(peer, request("h-4"), timeout=5)
        assert fourth.detail == "unary h-4"

    run(pki, echo, body)


async def warm(ch: rpc.Channels, peer: Peer) -> None:
    """Two exchanges in a row: the session is open from the second on."""
    await ch.handoff(peer, request("warm-1"), timeout=5)
    await ch.handoff(peer, request("warm-2"), timeout=5)


def test_a_late_reply_is_not_taken_for_the_next_request(pki: tuple[DevCA, Path]) -> None:
    held: list[offload_pb2.PeerMessage] = []

    async def late(msg: offload_pb2.PeerMessage,
                   context: grpc.aio.ServicerContext) -> offload_pb2.PeerMessage | None:
        if msg.handoff.handoff_id == "late":
            held.append(msg)
            return None  # answered with the next request's reply, first
        if held:
            await context.write(echo_reply(held.pop()))
        return echo_reply(msg)

    async def body(ch: rpc.Channels, peer: Peer, s: StandIn) -> None:
        await warm(ch, peer)
        with pytest.raises(rpc.RpcFailed):
            await ch.handoff(peer, request("late"), timeout=0.1)
        nxt = await ch.handoff(peer, request("next"), timeout=5)
        assert nxt.detail == "session next" and s.sessions_opened == 1 and not held

    run(pki, late, body)


def test_a_broken_session_fails_the_waiting_request_and_the_next_opens_anew(
        pki: tuple[DevCA, Path]) -> None:
    async def break_on_x(msg: offload_pb2.PeerMessage,
                         context: grpc.aio.ServicerContext) -> offload_pb2.PeerMessage | None:
        if msg.handoff.handoff_id == "x":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "peer going away")
        return echo_reply(msg)

    async def body(ch: rpc.Channels, peer: Peer, s: StandIn) -> None:
        await warm(ch, peer)
        with pytest.raises(rpc.RpcFailed) as e:
            await ch.handoff(peer, request("x"), timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        again = await ch.handoff(peer, request("y"), timeout=5)
        assert again.detail == "session y" and s.sessions_opened == 2

    run(pki, break_on_x, body)


def test_no_reply_within_the_timeout_is_deadline_exceeded(pki: tuple[DevCA, Path]) -> None:
    waits: list[int] = []

    async def silent(msg: offload_pb2.PeerMessage,
                     context: grpc.aio.ServicerContext) -> offload_pb2.PeerMessage | None:
        if msg.handoff.handoff_id == "slow":
            waits.append(msg.timeout_ms)  # the receiver applies the requester's wait
            return None
        return echo_reply(msg)

    async def body(ch: rpc.Channels, peer: Peer, s: StandIn) -> None:
        await warm(ch, peer)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(rpc.RpcFailed) as e:
            await ch.handoff(peer, request("slow"), timeout=0.1)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - t0 < 1.0 and waits == [100]
        ok = await ch.handoff(peer, request("next"), timeout=5)  # the session still works
        assert ok.detail == "session next" and s.sessions_opened == 1

    run(pki, silent, body)


def test_a_peer_without_sessions_gets_unary_calls(pki: tuple[DevCA, Path]) -> None:
    async def body(ch: rpc.Channels, peer: Peer, s: StandIn) -> None:
        replies = [await ch.handoff(peer, request(f"u-{i}"), timeout=5) for i in range(3)]
        assert [r.detail for r in replies] == ["unary u-0", "unary u-1", "unary u-2"]
        assert s.unary == 3

    run(pki, None, body)


def test_a_reply_of_the_wrong_kind_is_an_error(pki: tuple[DevCA, Path]) -> None:
    async def wrong(msg: offload_pb2.PeerMessage,
                    context: grpc.aio.ServicerContext) -> offload_pb2.PeerMessage | None:
        if msg.handoff.handoff_id == "w":
            return offload_pb2.PeerMessage(id=msg.id, end_reply=offload_pb2.EndReply(ok=True))
        return echo_reply(msg)

    async def body(ch: rpc.Channels, peer: Peer, s: StandIn) -> None:
        await warm(ch, peer)
        with pytest.raises(rpc.RpcFailed, match="expected handoff_reply, got end_reply"):
            await ch.handoff(peer, request("w"), timeout=5)

    run(pki, wrong, body)


def test_a_busy_session_sends_further_exchanges_as_unary_calls(pki: tuple[DevCA, Path]) -> None:
    release = asyncio.Event()
    extra = 2

    async def hold(msg: offload_pb2.PeerMessage,
                   context: grpc.aio.ServicerContext) -> offload_pb2.PeerMessage | None:
        if not msg.handoff.handoff_id.startswith("warm"):
            await release.wait()
        return echo_reply(msg)

    async def body(ch: rpc.Channels, peer: Peer, s: StandIn) -> None:
        await warm(ch, peer)
        n = rpc.SESSION_MAX_WAITING + extra
        calls = [asyncio.ensure_future(ch.handoff(peer, request(f"p-{i}"), timeout=5))
                 for i in range(n)]
        done: set[asyncio.Future[offload_pb2.HandoffReply]] = set()
        async with asyncio.timeout(5):
            while len(done) < extra:  # the unary ones are answered at once
                done, _ = await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
        assert sorted(f.result().detail for f in done) == [f"unary p-{i}" for i in
                                                           range(n - extra, n)]
        release.set()
        replies = await asyncio.gather(*calls)
        assert [r.detail for r in replies[: n - extra]] == [f"session p-{i}" for i in
                                                             range(n - extra)]
        assert s.messages == 1 + rpc.SESSION_MAX_WAITING  # warm-2, then the capped ones

    run(pki, hold, body)
