"""The agent's local API server with the real xo.app client over a unix socket (no root):
file mode from the config, Hello, an fd passed both ways, a handed-in connection delivered to
the app's accept(), and a misbehaving app dropped without hurting the server."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xo.agent import framing
from xo.agent.config import LocalApi
from xo.agent.local import AppConn, LocalServer
from xo.app import AgentClient, Kind, Server
from xo.flow import Endpoint, FlowKey
from xo.v1 import local_pb2

FLOW = FlowKey(Endpoint.parse("198.18.0.100:40000"), Endpoint.parse("198.18.0.1:80"))


class FakeAgent:
    """A LocalServer on its own loop thread, answering like the agent's dispatcher does."""

    def __init__(self, path: Path, mode: int) -> None:
        self.server = LocalServer(LocalApi(path, mode), self.on_frame)
        self.loop = asyncio.new_event_loop()
        self.offloaded_peer: bytes = b""
        started = threading.Event()

        def start() -> None:  # inside the running loop, as in the agent
            self.server.start()
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(start)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(5)

    async def on_frame(self, conn: AppConn, frame: framing.Frame) -> None:
        body = frame.msg.WhichOneof("body")
        if body == "hello":
            conn.app, conn.accepts = frame.msg.hello.app, frame.msg.hello.accept_connections
            await conn.send(local_pb2.LocalMessage(
                hello_reply=local_pb2.HelloReply(ok=True, agent="test")))
        elif body == "offload":
            fd = frame.take_fd()
            assert fd is not None
            with socket.socket(fileno=fd) as s:  # our copy of the app's socket
                self.offloaded_peer = s.recv(100)
            await conn.send(local_pb2.LocalMessage(offload_result=local_pb2.OffloadResult(
                request_id=frame.msg.offload.request_id, accepted=True, handoff_id="h1")))

    def hand_in(self, app: str, sock: socket.socket) -> None:
        msg = local_pb2.LocalMessage(handed_in=local_pb2.HandedIn(
            handoff_id="h2", flow=FLOW.to_proto(), preread=b"GET /"))

        async def send() -> None:
            await self.server.pick(app).send(msg, sock.fileno())

        asyncio.run_coroutine_threadsafe(send(), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    a = FakeAgent(tmp_path / "agent.sock", 0o640)
    yield a
    a.close()


def test_socket_file_has_the_configured_mode(agent: FakeAgent, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(tmp_path / "agent.sock").st_mode) == 0o640


def test_offload_passes_the_socket_to_the_agent(agent: FakeAgent, tmp_path: Path) -> None:
    client = AgentClient(str(tmp_path / "agent.sock"), "http")
    assert client.agent_name == "test"
    a, b = socket.socketpair()
    b.sendall(b"hello through the fd")
    res = client.offload(a, "b0", preread=b"req")
    assert res.accepted and res.handoff_id == "h1"
    assert agent.offloaded_peer == b"hello through the fd"
    a.close()
    b.close()
    client.close()


def test_handed_in_connection_comes_out_of_accept(agent: FakeAgent, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    srv = Server(listener, str(tmp_path / "agent.sock"), "http")
    a, b = socket.socketpair()
    agent.hand_in("http", a)
    conn = srv.accept(timeout=5)
    assert conn is not None and conn.kind == Kind.HANDED_IN
    assert conn.handoff_id == "h2" and conn.flow == FLOW and conn.preread == b"GET /"
    assert conn.sock is not None
    conn.sock.sendall(b"served")  # the handed-in fd is the same socket
    assert b.recv(10) == b"served"
    for s in (a, b, conn.sock):
        s.close()
    srv.close()


def test_garbage_drops_that_app_only(agent: FakeAgent, tmp_path: Path) -> None:
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.connect(str(tmp_path / "agent.sock"))
    bad.sendall(framing.HEADER.pack(framing.MAX_FRAME + 1))
    bad.settimeout(5)
    assert bad.recv(10) == b""
    bad.close()
    client = AgentClient(str(tmp_path / "agent.sock"), "http")
    assert client.agent_name == "test"
    client.close()
