"""The seam between the S3 servers and XO's offload machinery (the local agent).

The gateway calls `Offloader.offload(sock, target, preread, app_state, expected_bytes)` (the
object range length, for the agent's hardware rule policy): when the agent
accepts, the client's connection lives on the storage node until it comes back through
`wait_return`. The node side, `NodeAgentLink`, receives handed-in connections and passes them
to `StorageNode.serve_handed_in`, which gives them back when the response is sent. Proxy mode
needs none of this: without an agent the gateway serves every GET itself.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from xo import uapi
from xo.rgw.http import is_ktls
from xo.rgw.node import GiveBackRefused

if TYPE_CHECKING:
    from xo.app import AgentClient
    from xo.rgw.node import StorageNode

log = logging.getLogger(__name__)

APP_NAME = "s3"
POLL_SECONDS = 0.5
RECONNECT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Returned:
    """A connection back from the target: `sock` is None when the client closed meanwhile."""

    sock: socket.socket | None
    preread: bytes
    app_state: bytes


class OffloadUnknown(Exception):
    """The agent took the socket but never answered: the caller must not touch it again."""


class Offloader(Protocol):
    def offload(self, sock: socket.socket, target: str, preread: bytes,
                app_state: bytes, expected_bytes: int | None = None) -> str | None:
        """Hand `sock` to `target`, which will send about `expected_bytes` (None: unknown):
        the handoff id, or None if refused (`sock` unchanged).

        Raises OffloadUnknown when the outcome cannot be known.
        """

    def wait_return(self, handoff_id: str, timeout: float) -> Returned | None:
        """The connection back from the target, or None after `timeout` seconds."""

    def close(self) -> None: ...


class AgentOffloader:
    """Offloads through the local XO agent (xo.app) and collects the returned connections.

    Without a reachable agent it refuses every offload (the gateway proxies) and retries the
    agent at most every RECONNECT_SECONDS, so an agent restart costs offloads, not clients.
    """

    def __init__(self, agent_socket: str, timeout: float) -> None:
        self._path = agent_socket
        self._timeout = timeout
        self._lock = threading.Lock()
        self._agent: AgentClient | None = None
        self._next_try = 0.0
        self._boxes: dict[str, queue.Queue[Returned]] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connect()

    def _connect(self) -> AgentClient | None:
        """The live agent client, connecting first if the last attempt is old enough."""
        from xo.app import AgentClient, AgentError

        with self._lock:
            if self._agent is not None or time.monotonic() < self._next_try:
                return self._agent
            self._next_try = time.monotonic() + RECONNECT_SECONDS
            try:
                agent = AgentClient(self._path, APP_NAME, accept_connections=True,
                                    timeout=self._timeout)
            except (AgentError, OSError) as e:
                log.warning("no XO agent at %s (GETs are proxied): %s", self._path, e)
                return None
            self._agent = agent
            t = threading.Thread(target=self._collect, args=(agent,), name="s3-returns",
                                 daemon=True)
            self._threads.append(t)
            t.start()
            return agent

    def _drop(self, agent: AgentClient) -> None:
        with self._lock:
            if self._agent is agent:
                self._agent = None
        agent.close()

    def _box(self, handoff_id: str) -> queue.Queue[Returned]:
        with self._lock:
            return self._boxes.setdefault(handoff_id, queue.Queue(maxsize=1))

    def _collect(self, agent: AgentClient) -> None:
        from xo.app import Kind

        while not self._stop.is_set() and self._agent is agent:
            conn = agent.get(timeout=POLL_SECONDS)
            if conn is None:
                continue
            if conn.kind not in (Kind.RETURNED, Kind.CLOSED):
                log.warning("gateway got a %s connection; closing it", conn.kind.value)
                if conn.sock is not None:
                    conn.sock.close()
                continue
            self._box(conn.handoff_id).put(Returned(conn.sock, conn.preread, conn.app_state))

    def offload(self, sock: socket.socket, target: str, preread: bytes,
                app_state: bytes, expected_bytes: int | None = None) -> str | None:
        from xo.app import AgentError, AgentUnavailable

        agent = self._connect()
        if agent is None:
            return None
        try:
            outcome = agent.offload(sock, target, preread, app_state, APP_NAME, expected_bytes)
        except AgentUnavailable as e:  # the request (and the fd) never reached the agent
            log.warning("offload to %s not sent (the client reconnects): %s", target, e)
            return None
        except AgentError as e:  # sent, but no answer: the agent may be moving the socket
            self._drop(agent)
            raise OffloadUnknown(f"offload to {target}: {e}") from None
        if not outcome.accepted:
            log.info("offload to %s refused: %s", target, outcome.detail)
            return None
        self._box(outcome.handoff_id)
        return outcome.handoff_id

    def wait_return(self, handoff_id: str, timeout: float) -> Returned | None:
        box = self._box(handoff_id)
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            return None
        finally:
            with self._lock:
                self._boxes.pop(handoff_id, None)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * POLL_SECONDS)
        with self._lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()


def still_ours(sock: socket.socket) -> bool:
    """After a failed give-back: whether the agent left this kTLS socket live with us (it
    refused before capturing) rather than taking it (captured and closed in repair mode)."""
    try:
        if not is_ktls(sock):
            return False
        info = sock.getsockopt(uapi.SOL_TCP, uapi.TCP_INFO, uapi.TCP_INFO_HEAD.size)
    except OSError:
        return False
    return bool(uapi.TCP_INFO_HEAD.unpack(info)[0] == uapi.TCP_ESTABLISHED)


class NodeAgentLink:
    """A storage node's link to its agent: serves every handed-in connection, gives it back.

    The node starts without waiting for its agent: the link connects (and reconnects after a
    failed give-back) every RECONNECT_SECONDS in the background.
    """

    def __init__(self, node: StorageNode, agent_socket: str, timeout: float) -> None:
        self._node = node
        self._path = agent_socket
        self._timeout = timeout
        self._agent: AgentClient | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="s3-handed-in", daemon=True)
        self._thread.start()

    def _connect(self) -> AgentClient | None:
        from xo.app import AgentClient, AgentError

        try:
            return AgentClient(self._path, APP_NAME, accept_connections=True,
                               timeout=self._timeout)
        except (AgentError, OSError) as e:
            log.warning("no XO agent at %s (retrying): %s", self._path, e)
            return None

    def _loop(self) -> None:
        from xo.app import Kind

        while not self._stop.is_set():
            agent = self._agent
            if agent is None:
                self._agent = agent = self._connect()
                if agent is None:
                    self._stop.wait(RECONNECT_SECONDS)
                    continue
            conn = agent.get(timeout=POLL_SECONDS)
            if conn is None:
                continue
            if conn.kind is not Kind.HANDED_IN or conn.sock is None:
                log.warning("node got a %s connection; closing it", conn.kind.value)
                if conn.sock is not None:
                    conn.sock.close()
                continue
            threading.Thread(target=self._serve, args=(agent, conn.sock, conn.handoff_id,
                             conn.preread, conn.app_state), daemon=True).start()

    def _serve(self, agent: AgentClient, sock: socket.socket, handoff_id: str,
               preread: bytes, app_state: bytes) -> None:
        from xo.app import AgentError, AgentUnavailable

        def give_back(s: socket.socket, rest: bytes, state: bytes) -> None:
            try:
                agent.give_back(s, handoff_id, rest, state)
            except AgentUnavailable:
                raise
            except AgentError as e:
                if still_ours(s):  # refused before the capture: e.g. a kTLS socket not quiescent
                    raise GiveBackRefused(str(e)) from None
                raise

        try:
            self._node.serve_handed_in(sock, preread, app_state, give_back)
        except (AgentError, OSError) as e:
            log.error("give-back of %s failed, the connection is lost: %s", handoff_id, e)
            if self._agent is agent:
                self._agent = None
                agent.close()
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=RECONNECT_SECONDS + POLL_SECONDS)
        if self._agent is not None:
            self._agent.close()
