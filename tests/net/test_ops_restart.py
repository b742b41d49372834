"""Zero-disruption agent restart: both agents of an offloaded connection are restarted (a
graceful SIGTERM restart as an upgrade does, or a crash) in the middle of a long transfer that
the backend sends straight to the client. The transfer loses no byte, every segment the client
sent meanwhile went through the frontend's redirect, no RST touches the client's connection
(capture) and the client counts none, and afterwards the connection still goes back to the
frontend and serves the next request: the owner adopted its redirect from the pinned map, the
target its source rewrite."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time

import pytest
from offload_kit import TCP_RST, Client, Sniffer, agent_status, delta, rst_counts, wait_settled

from xo.agent.labkit import LabAgents
from xo.app import AgentClient, Kind, Server
from xo.httpapp import HTTP_PORT, Frontend, body, listener, response
from xo.lab import Host, Lab

pytestmark = pytest.mark.net

AGENT_BACKENDS = 1
SMALL = 1000
LENGTH = 24 * 1024 * 1024  # the long transfer
TRICKLE_CHUNK = 4 * 1024  # ~200 KB/s: 24 MiB would take two minutes at this pace
# Until both restarts are done the backend trickles (it must still be sending while the
# agents are away); then it sends the rest at full speed.
TRICKLE_S = 0.02
HOLDER_PORT = HTTP_PORT + 1
FRONT_PORT2 = HTTP_PORT + 2
TRANSFER_TIMEOUT_S = 120
QUIET_S = 0.3  # > the client's delayed ACK (40 ms) and the lab's RTT, many times over
# The servers' own RST counters are not the flow's: while an agent is down its host refuses
# connects to the agent port (gRPC reconnects, the owner's liveness probe), and a killed agent's
# gRPC sockets close with unread data. So the client's counters are checked by nstat, and RSTs
# of the client's flow on either side by a capture at the client.


def prepare_agents(agents: LabAgents) -> None:
    agents.detach_on_exit = False  # SIGTERM must keep the datapath, as in production


def restart(agents: LabAgents, h: Host, how: str) -> None:
    agents.kill(h, signal.SIGTERM if how == "graceful" else signal.SIGKILL)
    agents.start(h)


class RstCapture(Sniffer):
    """Counts TCP RST segments of one client port on the client's eth0 (both directions)."""

    def __init__(self, h: Host, port: int) -> None:
        self.port, self.rsts, self.segments = port, 0, 0
        super().__init__(h)

    def frame(self, host: str, ip: bytes, tcp: bytes) -> None:
        if self.port in struct.unpack("!HH", tcp[:4]):
            self.segments += 1
            self.rsts += bool(tcp[13] & TCP_RST)

    def stop(self) -> int:
        self.stop_sniffing()
        return self.rsts


def quiet_counts(agents: LabAgents, lab: Lab, sender: Sender) -> dict[str, int]:
    """Segment counts of the flow with the sender paused and the client's ACKs settled: the
    client's own counters and the packets the two agents' map entries matched."""
    c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
    sender.go.clear()
    time.sleep(QUIET_S)
    try:
        st = c.nstat()
        (own,), (hosted,) = agent_status(agents, f)["flows"], agent_status(agents, b0)["flows"]
        return {"c0_sent": st.get("TcpOutSegs", 0) + st.get("TcpRetransSegs", 0),
                "f0_redirected": own["packets"], "b0_sent": hosted["packets"]}
    finally:
        sender.go.set()


def client_resets(lab: Lab) -> dict[str, int]:
    return rst_counts(lab.clients[0])


class Sender(threading.Thread):
    """The backend app's side of the transfer: trickle until told, then the rest at once."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock, self.data = sock, data
        self.hurry = threading.Event()
        self.go = threading.Event()  # cleared: pause (the test reads counters)
        self.go.set()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            view = memoryview(self.data)
            sent = 0
            while sent < len(view) and not self.hurry.is_set():
                self.go.wait()
                sent += self.sock.send(view[sent : sent + TRICKLE_CHUNK])
                time.sleep(TRICKLE_S)
            self.sock.sendall(view[sent:])
        except OSError as e:
            self.error = e


@pytest.mark.parametrize("how", ["graceful", "crash"])
def test_restarting_both_agents_mid_transfer_loses_nothing(env: tuple[Lab, LabAgents],
                                                           how: str) -> None:
    lab, agents = env
    c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
    before = client_resets(lab)
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, [b0.name], small=SMALL).start()
    holder = Server(listener(b0, str(b0.ip4), HOLDER_PORT), agents.socket_path(b0), "http")
    client = Client(c, str(lab.vip4), timeout=TRANSFER_TIMEOUT_S)
    fe2: Frontend | None = None
    cap: RstCapture | None = None
    b0_app: AgentClient | None = None
    fe_old: Frontend | None = fe
    holder_old: Server | None = holder
    try:
        cap = RstCapture(c, client.conn.sock.getsockname()[1])
        client.conn.request("GET", f"/size/{LENGTH}")
        conn = holder.agent.get(timeout=10)
        assert conn is not None and conn.kind == Kind.HANDED_IN and conn.sock is not None
        sender = Sender(conn.sock, response(LENGTH, b0.name, True))
        sender.start()
        got: dict[str, bytes] = {}
        reader = threading.Thread(
            target=lambda: got.setdefault("body", client.conn.getresponse().read()),
            daemon=True)
        reader.start()

        before_counts = quiet_counts(agents, lab, sender)
        restart(agents, f, how)  # the owner: its redirect carries the client's ACKs
        restart(agents, b0, how)  # the target: its source rewrite carries the response
        after_counts = quiet_counts(agents, lab, sender)
        # Seed 001's bar, no packet dropped because of a restart: every segment the client
        # sent meanwhile was matched by f0's redirect entry (none reached f0's own stack, which
        # would answer it with an RST, or vanished in a filter swap), and b0's rewrite entry
        # kept matching the response (a segment leaving b0 unrewritten draws an RST from the
        # client: the capture below counts none). Segment counts of b0 -> c0 cannot be compared
        # one to one: b0's entry sees GSO super-packets, the client single segments.
        moved = {k: after_counts[k] - before_counts[k] for k in before_counts}
        assert moved["c0_sent"] > 0 and moved["b0_sent"] > 0, moved
        assert moved["c0_sent"] == moved["f0_redirected"], moved
        assert sender.error is None, sender.error
        assert sender.is_alive(), "the transfer ended before the restarts: not mid-transfer"
        # Both agents came back holding the flow, read from the pinned maps.
        fs, bs = agent_status(agents, f), agent_status(agents, b0)
        assert fs["reattached"] and bs["reattached"]
        assert [(x["role"], x["ebpf_rule"], x["state"]) for x in fs["flows"]] == [
            ("owner", "redirect", "offloaded")]
        assert [x["ebpf_rule"] for x in bs["flows"]] == ["snat"]
        assert fs["flows"][0]["client"] == bs["flows"][0]["client"]

        sender.hurry.set()
        sender.join(TRANSFER_TIMEOUT_S)
        reader.join(TRANSFER_TIMEOUT_S)
        assert sender.error is None, sender.error
        assert got.get("body") == body(LENGTH), "the transfer lost or changed bytes"

        # The apps reconnect to the new agents; the connection goes back to the frontend.
        holder.close()
        fe.stop()
        holder_old = fe_old = None
        fe2 = Frontend(Server(listener(f, str(lab.vip4), FRONT_PORT2), agents.socket_path(f),
                              "http"), f.name, [], small=LENGTH).start()
        b0_app = AgentClient(agents.socket_path(b0), "http")
        b0_app.give_back(conn.sock, conn.handoff_id)
        conn.sock.close()
        assert client.get(SMALL)[0] == f.name  # served by f0 on the same connection
        client.close()
        assert wait_settled(lab) == {}, "flow entries left behind"
        assert delta(before, client_resets(lab)) == {}, "the client counted RSTs or aborts"
        assert cap.stop() == 0 and cap.segments > 0, "RST on the client's connection"
        cap = None
    finally:
        client.close()
        if cap is not None:
            cap.stop()
        if b0_app is not None:
            b0_app.close()
        if fe2 is not None:
            fe2.stop()
        if holder_old is not None:
            holder_old.close()
        if fe_old is not None:
            fe_old.stop()
