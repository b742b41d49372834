"""Apps survive an agent restart: the frontend's agent, then a backend's, is stopped and started
again (as an upgrade does, datapath kept) while the same app processes keep running. Meanwhile
fresh clients are served, an offload the frontend app tries is served locally with the reason
(AgentUnavailable), a connection handed in to the backend app stays offloaded and its give_back
waits for the agent. Afterwards the same apps offload and take connections back, byte-exact, on
the client's unmodified keep-alive connections, with zero RST counted by the client; each app
logs the drop once and the reconnection once."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from offload_kit import (
    Client,
    Holder,
    agent_warnings,
    delta,
    pinned_flows,
    rst_counts,
    wait_settled,
)

from xo.agent.labkit import LabAgents
from xo.app import GIVE_BACK_WAIT_S, Connection, Kind, Server
from xo.httpapp import HTTP_PORT, Frontend, body, listener, response, wait_acked
from xo.lab import Host, Lab

pytestmark = pytest.mark.net

SMALL = 1000
LARGE = 200_000  # > SMALL: the frontend offloads it
WAIT_S = 20.0  # an agent start compiles BCC programs: seconds on a loaded box


AGENT_BACKENDS = 1  # the shared `env` fixture (tests/net/conftest.py)


def prepare_agents(agents: LabAgents) -> None:
    agents.detach_on_exit = False  # a SIGTERM'd agent keeps its pinned flows, as in production


@pytest.fixture(autouse=True)
def no_leaks(env: tuple[Lab, LabAgents]) -> Iterator[None]:
    yield
    lab, agents = env
    left = {h.name: pinned_flows(h) for h in [*lab.frontends, *lab.backends]}
    assert not any(left.values()), f"flow entries left behind: {left}\n{agent_warnings(agents)}"


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def serve_handed_in(holder: Holder, b: Host, client: Client) -> Connection:
    """The client asks for LARGE; the frontend offloads it; the backend app answers."""
    client.conn.request("GET", f"/size/{LARGE}")
    conn = holder.take()
    assert conn.kind == Kind.HANDED_IN and conn.sock is not None
    conn.sock.sendall(response(LARGE, b.name, True))
    r = client.conn.getresponse()
    data = r.read()
    assert r.getheader("X-Served-By") == b.name
    assert data == body(LARGE), "the offloaded response changed"
    assert wait_acked(conn.sock)
    return conn


def give_back(holder: Holder, conn: Connection) -> None:
    assert conn.sock is not None
    holder.server.give_back(conn.sock, conn.handoff_id)
    conn.sock.close()


def link_logs(caplog: pytest.LogCaptureFixture, path: str) -> dict[str, int]:
    lines = [m for m in (r.getMessage() for r in caplog.records if r.name == "xo.app")
             if path in m]
    return {"down": sum("went away" in m for m in lines),
            "up": sum("reconnected" in m for m in lines)}


def stop_agent(agents: LabAgents, h: Host, app: Server) -> None:
    agents.kill(h, signal.SIGTERM)  # graceful, datapath kept: an upgrade
    wait_until(lambda: not app.agent.connected, f"the app to see {h.name}'s agent go")


def test_frontend_agent_restart_keeps_the_frontend_app(env: tuple[Lab, LabAgents],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xo.app")
    lab, agents = env
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    before = rst_counts(c)
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, [b.name], small=SMALL).start()
    holder = Holder(b, agents)
    one = Client(c, str(lab.vip4))
    two: Client | None = None
    try:
        # A connection is offloaded to b0 when f0's agent goes away.
        conn = serve_handed_in(holder, b, one)
        stop_agent(agents, f, fe.server)

        # While it is away: a fresh client is served, an offload is served locally.
        two = Client(c, str(lab.vip4))
        assert two.get(SMALL)[0] == f.name
        assert two.get(LARGE)[0] == f.name
        assert fe.stats.refused == 1
        assert any("refused (not connected to the agent" in r.getMessage()
                   for r in caplog.records if r.name == "xo.httpapp")

        # Back: the give-back reaches the same frontend app (it may still be reconnecting: the
        # agent keeps the socket for it), and the same app offloads again.
        agents.start(f)
        give_back(holder, conn)
        assert one.get(SMALL)[0] == f.name  # back home on the same connection
        wait_until(lambda: fe.server.agent.connected, "the frontend app to reconnect")
        again = serve_handed_in(holder, b, two)
        give_back(holder, again)
        assert two.get(SMALL)[0] == f.name
        one.close()
        two.close()
        assert wait_settled(lab) == {}, "flow entries left behind"
        assert delta(before, rst_counts(c)) == {}, "the client counted RSTs or aborts"
    finally:
        one.close()
        if two is not None:
            two.close()
        holder.close()
        fe.stop()
    assert link_logs(caplog, agents.socket_path(f)) == {"down": 1, "up": 1}


def test_backend_agent_restart_keeps_the_backend_app(env: tuple[Lab, LabAgents],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="xo.app")
    lab, agents = env
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    before = rst_counts(c)
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, [b.name], small=SMALL).start()
    holder = Holder(b, agents)
    one = Client(c, str(lab.vip4))
    two: Client | None = None
    try:
        # b0 holds a handed-in connection when its agent goes away ...
        conn = serve_handed_in(holder, b, one)
        stop_agent(agents, b, holder.server)
        # ... and the app gives it back meanwhile: the call waits for the agent.
        done: dict[str, BaseException | None] = {}

        def run() -> None:
            try:
                assert conn.sock is not None
                holder.server.give_back(conn.sock, conn.handoff_id)  # waits up to 60 s
                done["error"] = None
            except BaseException as e:  # reported to the test thread below
                done["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        # An offload to b0 now is refused by f0's agent (b0 unreachable): served by f0.
        two = Client(c, str(lab.vip4))
        assert two.get(LARGE)[0] == f.name
        assert "error" not in done, "give_back returned while the agent was away"

        agents.start(b)
        t.join(GIVE_BACK_WAIT_S)
        assert done.get("error") is None, done
        assert conn.sock is not None
        conn.sock.close()
        assert one.get(SMALL)[0] == f.name  # back home on the same connection
        # The same backend app takes new offloads from the restarted agent.
        again = serve_handed_in(holder, b, two)
        give_back(holder, again)
        assert two.get(SMALL)[0] == f.name
        one.close()
        two.close()
        assert wait_settled(lab) == {}, "flow entries left behind"
        assert delta(before, rst_counts(c)) == {}, "the client counted RSTs or aborts"
    finally:
        one.close()
        if two is not None:
            two.close()
        holder.close()
        fe.stop()
    assert link_logs(caplog, agents.socket_path(b)) == {"down": 1, "up": 1}
