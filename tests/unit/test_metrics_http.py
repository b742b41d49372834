"""The agent's /metrics endpoint over real loopback TCP: 200 with the rendered text, 404 for
other paths, 405 for other methods, and a half-sent request does not hang the server."""

from __future__ import annotations

import asyncio
import socket

from xo.agent.exporter import MetricsServer
from xo.agent.metrics import CONTENT_TYPE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


def test_endpoint_answers_get_metrics_only() -> None:
    async def scenario() -> list[bytes]:
        calls = []

        async def render() -> str:
            calls.append(1)
            return "xo_up 1\n"

        port = _free_port()
        server = MetricsServer(f"127.0.0.1:{port}", render)
        await server.start()
        try:
            ok = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            missing = await _get(port, b"GET / HTTP/1.1\r\n\r\n")
            post = await _get(port, b"POST /metrics HTTP/1.1\r\n\r\n")
            # a client that never finishes its request is dropped, the server keeps serving
            _, stuck = await asyncio.open_connection("127.0.0.1", port)
            stuck.write(b"GET /met")
            again = await _get(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            stuck.close()
        finally:
            await server.close()
        assert len(calls) == 2
        return [ok, missing, post, again]

    ok, missing, post, again = asyncio.run(scenario())
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and ok.endswith(b"\r\n\r\nxo_up 1\n")
    assert f"Content-Type: {CONTENT_TYPE}".encode() in ok
    assert b"Content-Length: 8\r\n" in ok
    assert missing.startswith(b"HTTP/1.1 404 ")
    assert post.startswith(b"HTTP/1.1 405 ")
    assert again.startswith(b"HTTP/1.1 200 OK")
