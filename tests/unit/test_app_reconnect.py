"""xo.app outlives its agent (no root): the real LocalServer (test_agent_local's FakeAgent) is
stopped and started again on the same path while the app keeps running. The app keeps
accepting fresh clients, fails offloads at once with AgentUnavailable, lets give_back wait for
the agent, reconnects with the same Hello and takes handed-in sockets again, logging the drop
and the reconnection once each. The agent side keeps a returned socket for an app that is not
connected yet."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent_local import FLOW, FakeAgent

from xo.agent import framing, local
from xo.agent.local import AppConn
from xo.app import AgentClient, AgentError, AgentUnavailable, Kind, Server
from xo.v1 import local_pb2

WAIT_S = 5.0
DOWN_S = 0.6  # long enough for several reconnect attempts (50, 100, 200, 250 ms)
FAIL_FAST_S = 0.5  # well below DEFAULT_TIMEOUT (5 s): no call waits for an absent agent


class GivingBackAgent(FakeAgent):
    """Also answers GiveBack (ok) and keeps what it got; an offload to "vanish" makes the
    agent drop the app's connection instead of answering (a crash mid-call)."""

    def __init__(self, path: Path) -> None:
        self.given_back: list[tuple[str, bytes]] = []
        super().__init__(path, 0o600)

    async def on_frame(self, conn: AppConn, frame: framing.Frame) -> None:
        body = frame.msg.WhichOneof("body")
        if body == "give_back":
            fd = frame.take_fd()
            assert fd is not None
            with socket.socket(fileno=fd) as s:
                self.given_back.append((frame.msg.give_back.handoff_id, s.recv(100)))
            await conn.send(local_pb2.LocalMessage(give_back_result=local_pb2.GiveBackResult(
                handoff_id=frame.msg.give_back.handoff_id, ok=True)))
        elif body == "offload" and frame.msg.offload.target == "vanish":
            conn.sock.shutdown(socket.SHUT_RDWR)
        else:
            await super().on_frame(conn, frame)

    def close(self) -> None:
        """Stop this agent; the tests stop it themselves, the fixture again at the end."""
        if not self.loop.is_closed():
            super().close()

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT_S)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


@pytest.fixture
def agent(path: Path) -> Iterator[GivingBackAgent]:
    a = GivingBackAgent(path)
    yield a
    a.close()


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_app_serves_locally_while_away_and_resumes_after_restart(
        agent: GivingBackAgent, path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xo.app")
    listener = socket.create_server(("127.0.0.1", 0))
    srv = Server(listener, str(path), "http")
    second: GivingBackAgent | None = None
    socks: list[socket.socket] = []
    try:
        agent.close()
        wait_until(lambda: not srv.agent.connected, "the app to notice the agent left")

        # A fresh client is accepted while the agent is away.
        client = socket.create_connection(listener.getsockname())
        socks.append(client)
        conn = srv.accept(timeout=WAIT_S)
        assert conn is not None and conn.kind == Kind.FRESH and conn.sock is not None
        socks.append(conn.sock)
        # An offload fails at once, with the reason, and the socket is untouched.
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable, match="nothing was sent, the socket is still yours"):
            srv.offload(conn.sock, "b0", preread=b"GET /")
        assert time.monotonic() - t0 < FAIL_FAST_S
        conn.sock.sendall(b"served here")
        assert client.recv(100) == b"served here"

        time.sleep(DOWN_S)
        second = GivingBackAgent(path)
        wait_until(lambda: srv.agent.connected, "the app to reconnect")
        # The same Hello: the agent routes a handed-in socket of app "http" to it.
        a, b = socket.socketpair()
        socks += [a, b]
        second.hand_in("http", a)
        got = srv.accept(timeout=WAIT_S)
        assert got is not None and got.kind == Kind.HANDED_IN and got.sock is not None
        socks.append(got.sock)
        got.sock.sendall(b"handed in after the restart")
        assert b.recv(100) == b"handed in after the restart"
        b.sendall(b"offloaded again")
        assert srv.offload(got.sock, "b0").accepted
        assert second.offloaded_peer == b"offloaded again"
    finally:
        srv.close()
        if second is not None:
            second.close()
        for s in socks:
            s.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "xo.app"]
    assert len([m for m in lines if "went away" in m]) == 1, lines
    assert len([m for m in lines if "reconnected" in m]) == 1, lines


def test_give_back_waits_for_the_agent_to_return(agent: GivingBackAgent, path: Path) -> None:
    app = AgentClient(str(path), "http")
    a, b = socket.socketpair()
    second: GivingBackAgent | None = None
    try:
        agent.close()
        wait_until(lambda: not app.connected, "the app to notice the agent left")
        b.sendall(b"next request")
        done: dict[str, BaseException | None] = {}

        def give_back() -> None:
            try:
                app.give_back(a, "h2", wait=WAIT_S)
                done["error"] = None
            except BaseException as e:  # reported to the test thread below
                done["error"] = e

        t = threading.Thread(target=give_back)
        t.start()
        time.sleep(DOWN_S)
        assert "error" not in done, "give_back returned while the agent was away"
        second = GivingBackAgent(path)
        t.join(WAIT_S)
        assert done.get("error") is None
        assert second.given_back == [("h2", b"next request")]
    finally:
        app.close()
        if second is not None:
            second.close()
        a.close()
        b.close()


def test_give_back_gives_up_at_its_deadline(agent: GivingBackAgent, path: Path) -> None:
    app = AgentClient(str(path), "http")
    a, b = socket.socketpair()
    try:
        agent.close()
        wait_until(lambda: not app.connected, "the app to notice the agent left")
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable, match="the socket is still yours"):
            app.give_back(a, "h2", wait=0.2)
        assert 0.2 <= time.monotonic() - t0 < 0.2 + FAIL_FAST_S
        a.sendall(b"still mine")  # the caller keeps a working socket
        assert b.recv(100) == b"still mine"
    finally:
        app.close()
        a.close()
        b.close()


def test_call_in_flight_fails_at_once_when_the_agent_goes(agent: GivingBackAgent,
                                                          path: Path) -> None:
    app = AgentClient(str(path), "http")
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentError, match="before answering the offload: its outcome "
                                             "is unknown") as e:
            app.offload(a, "vanish")
        assert not isinstance(e.value, AgentUnavailable)  # it was sent: outcome unknown
        assert time.monotonic() - t0 < FAIL_FAST_S
        wait_until(lambda: app.connected, "the app to reconnect to the same agent")
    finally:
        app.close()
        a.close()
        b.close()


def test_first_connect_still_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="cannot reach the agent at"):
        AgentClient(str(tmp_path / "none.sock"), "http")


def returned_msg(hid: str) -> local_pb2.LocalMessage:
    return local_pb2.LocalMessage(returned=local_pb2.Returned(handoff_id=hid,
                                                              flow=FLOW.to_proto()))


def test_agent_keeps_a_returned_socket_until_its_app_reconnects(agent: GivingBackAgent,
                                                                 path: Path) -> None:
    a, b = socket.socketpair()
    srv: Server | None = None
    try:
        # No app connected: deliver() returns at once (the End reply is not held up) ...
        t0 = time.monotonic()
        agent.run(agent.server.deliver("http", returned_msg("h3"), a))
        assert time.monotonic() - t0 < FAIL_FAST_S
        time.sleep(DOWN_S)
        # ... and the socket reaches the app that connects within APP_WAIT_S.
        srv = Server(socket.create_server(("127.0.0.1", 0)), str(path), "http")
        conn = srv.accept(timeout=WAIT_S)
        assert conn is not None and conn.kind == Kind.RETURNED and conn.sock is not None
        assert conn.handoff_id == "h3"
        conn.sock.sendall(b"back home")
        assert b.recv(100) == b"back home"
        conn.sock.close()
    finally:
        if srv is not None:
            srv.close()
        b.close()


def test_agent_closes_a_returned_socket_nobody_takes(agent: GivingBackAgent, path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "APP_WAIT_S", 0.2)
    a, b = socket.socketpair()
    try:
        agent.run(agent.server.deliver("http", returned_msg("h4"), a))
        b.settimeout(WAIT_S)
        assert b.recv(100) == b""  # closed after the wait: the agent keeps no fd forever
    finally:
        b.close()
