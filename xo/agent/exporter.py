"""The agent's Prometheus endpoint: a minimal HTTP/1.1 server answering GET /metrics.

Why not http.server: the agent is one asyncio loop; a scrape must not block handoffs, and a
thread would read agent state while the loop mutates it. Each scrape renders inside the loop.
Off by default (config key `metrics`); bind it to loopback or a management network only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from xo.agent.metrics import CONTENT_TYPE
from xo.flow import Endpoint

log = logging.getLogger("xo.agent.metrics")
MAX_REQUEST = 8 * 1024
READ_TIMEOUT_S = 5.0
PATH = "/metrics"


class MetricsServer:
    """Serves `render()` at GET /metrics on `listen` (ADDR:PORT)."""

    def __init__(self, listen: str, render: Callable[[], Awaitable[str]]) -> None:
        self.endpoint = Endpoint.parse(listen)
        self._render = render
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, str(self.endpoint.ip), self.endpoint.port, limit=MAX_REQUEST)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
                status, body = "405 Method Not Allowed", "only GET /metrics\n"
            elif parts[1].split(b"?", 1)[0] != PATH.encode():
                status, body = "404 Not Found", "try GET /metrics\n"
            else:
                status, body = "200 OK", await self._render()
            data = body.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode())
            if parts[0] != b"HEAD":
                writer.write(data)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError) as e:
            log.debug("metrics request dropped: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
