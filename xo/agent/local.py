"""The agent's local app API server: a unix stream socket speaking proto/xo/v1/local.proto.

Apps (nginx workers, the S3 gateway, Python apps through xo.app) connect, say Hello, and then
offload sockets, give them back, and receive handed-in or returned sockets. Sockets travel with
SCM_RIGHTS (xo.agent.framing). The socket file's mode and group come from the config, since
nginx workers run as an unprivileged user.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from xo.agent import framing
from xo.agent.config import LocalApi
from xo.v1 import local_pb2

log = logging.getLogger("xo.agent.local")
BACKLOG = 128
# A socket that comes back to an app which is not connected waits this long for it: after an
# agent restart the apps reconnect within a second (xo.app retries every 250 ms at most, nginx
# every handoff_agent_retry, 1 s), so this covers a few of their retries before it is closed.
APP_WAIT_S = 3.0
APP_POLL_S = 0.01


class NoApp(LookupError):
    """No connection of the named app accepts handed-in sockets."""


@dataclass(eq=False)
class AppConn:
    """One app connection; `app` is empty until its Hello."""

    sock: socket.socket
    app: str = ""
    accepts: bool = False
    decoder: framing.Decoder = field(default_factory=framing.Decoder)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, msg: local_pb2.LocalMessage, fd: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        async with self.send_lock:
            data = framing.encode(msg)
            anc = []
            if fd is not None:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))]
            while data:
                try:
                    n = self.sock.sendmsg([data], anc)
                except BlockingIOError:
                    await _writable(loop, self.sock)
                    continue
                data, anc = data[n:], []


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(sock.fileno(), wake)
    try:
        await fut
    finally:
        loop.remove_writer(sock.fileno())


def expected_bytes(req: local_pb2.OffloadRequest) -> int | None:
    """The transfer size the app announced for an offload; None when it did not say
    (proto3 `optional`: a sent 0 is a known empty transfer, not "unknown")."""
    return req.expected_bytes if req.HasField("expected_bytes") else None


# handler(conn, frame): acts on one frame; it may take frame.fd (take_fd), else it is closed.
Handler = Callable[[AppConn, framing.Frame], Awaitable[None]]


class LocalServer:
    """Accepts app connections and dispatches their frames to `handler`."""

    def __init__(self, api: LocalApi, handler: Handler) -> None:
        self._api = api
        self._handler = handler
        self._listener: socket.socket | None = None
        self.conns: set[AppConn] = set()
        self._rr = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        path = self._api.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        os.chmod(path, self._api.mode)
        if self._api.group:
            os.chown(path, -1, grp.getgrnam(self._api.group).gr_gid)
        s.listen(BACKLOG)
        s.setblocking(False)
        self._listener = s
        asyncio.get_running_loop().add_reader(s.fileno(), self._accept)

    def _accept(self) -> None:
        listener = self._listener
        if listener is None:
            return
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = AppConn(sock)
        self.conns.add(conn)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, conn)

    def _readable(self, conn: AppConn) -> None:
        try:
            frames = framing.recv_into(conn.sock, conn.decoder)
        except BlockingIOError:
            return
        except (OSError, framing.FrameError) as e:
            log.warning("app %r: closing connection: %s", conn.app or "?", e)
            self._drop(conn)
            return
        if frames is None:
            self._drop(conn)
            return
        for frame in frames:
            task = asyncio.get_running_loop().create_task(self._handle(conn, frame))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: AppConn, frame: framing.Frame) -> None:
        try:
            await self._handler(conn, frame)
        except Exception:
            log.exception("app %r: handler failed", conn.app or "?")
        finally:
            frame.close()

    def _drop(self, conn: AppConn) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        asyncio.get_running_loop().remove_reader(conn.sock.fileno())
        conn.decoder.close()
        conn.sock.close()

    def pick(self, app: str) -> AppConn:
        """An accepting connection of `app`, round robin over its workers."""
        ready = [c for c in self.conns if c.app == app and c.accepts]
        if not ready:
            raise NoApp(f"no app {app!r} accepts connections on this agent")
        return ready[next(self._rr) % len(ready)]

    def _accepting(self, app: str) -> AppConn:
        """pick(app); "" (a flow adopted after a restart, its app unknown): any app."""
        if app:
            return self.pick(app)
        for c in self.conns:
            if c.accepts:
                return c
        raise NoApp("no app accepts connections on this agent")

    async def deliver(self, app: str, msg: local_pb2.LocalMessage,
                      sock: socket.socket | None) -> None:
        """Send `msg` (with `sock`, which this call takes and closes) to `app`.

        With no such app connected (it is reconnecting after this agent restarted, or itself
        restarting) the socket waits for it in a background task, up to APP_WAIT_S, instead of
        being closed at once; the caller is not held up meanwhile.
        """
        try:
            await self._accepting(app).send(msg, sock.fileno() if sock else None)
        except (NoApp, OSError) as e:
            log.info("%s: %s; waiting up to %.0f s for it", _what(msg), e, APP_WAIT_S)
            task = asyncio.get_running_loop().create_task(self._deliver_later(app, msg, sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if sock is not None:
            sock.close()

    async def _deliver_later(self, app: str, msg: local_pb2.LocalMessage,
                             sock: socket.socket | None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APP_WAIT_S
        try:
            while True:
                await asyncio.sleep(APP_POLL_S)
                try:
                    await self._accepting(app).send(msg, sock.fileno() if sock else None)
                    log.info("%s: delivered to app %r after it reconnected", _what(msg),
                             app or "(any)")
                    return
                except (NoApp, OSError) as e:
                    if loop.time() > deadline:
                        log.error("%s: no app took it within %.0f s (%s): closing it",
                                  _what(msg), APP_WAIT_S, e)
                        return
        except asyncio.CancelledError:
            log.error("%s: the agent stops before its app came back: closing it", _what(msg))
            raise
        finally:
            if sock is not None:
                sock.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.conns):
            self._drop(conn)
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self._api.path.unlink()


def _what(msg: local_pb2.LocalMessage) -> str:
    """'returned flow HID' / 'handed-in flow HID', for the logs."""
    body = msg.WhichOneof("body")
    inner = getattr(msg, body) if body else None
    return f"{body or 'message'} flow {getattr(inner, 'handoff_id', '?')}"
