"""Every failure case of the offload protocol, with real agent processes in a lab.

Target unreachable, refusing, timing out, crashing before its reply: the frontend app keeps
its socket (served locally, byte-exact, zero RST). Target crash after taking a connection: the
owner drops the redirect. Owner restart: flows reconciled from the pinned maps and returned.
Client FIN/RST while offloaded: End on both sides, no rule left. Security: strangers refused,
bad targets and malformed messages answered with errors, the agent keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from offload_kit import (
    Client,
    Holder,
    assert_back_home,
    delta,
    lab_with_agents,
    pinned_flows,
    rst_counts,
    wait_settled,
)

import xo.tcp
from xo.agent import framing
from xo.agent.config import dumps, load
from xo.agent.labkit import LabAgents
from xo.app import Connection, Kind, Server
from xo.httpapp import HTTP_PORT, Frontend, body, lab_apps, listener, response
from xo.lab import Host, Lab
from xo.v1 import local_pb2, offload_pb2, offload_pb2_grpc

pytestmark = pytest.mark.net

SMALL = 1000
LARGE = 200_000
HEALTH_DEADLINE_S = 15.0
DEAD_HOST_TABLE = "xo_dead_host"
DEAD_HOST_NFT = (f"table inet {DEAD_HOST_TABLE} {{\n chain input {{\n"
                 "  type filter hook input priority 0; policy drop;\n }\n}\n")


@pytest.fixture(autouse=True)
def no_leaks(env: tuple[Lab, LabAgents]) -> Iterator[None]:
    yield
    lab, agents = env
    for h in [*lab.frontends, *lab.backends]:  # a test that stopped an agent brings it back
        if h.name not in agents.procs:
            agents.start(h)
    assert wait_settled(lab) == {}, "flow entries left behind"


def served_locally_when(lab: Lab, agents: LabAgents, break_b1: object) -> list[str]:
    """Requests LARGE, LARGE: the first goes to b0, the second (b1, broken) stays on f0."""
    c = lab.clients[0]
    with lab_apps(lab, agents, small=SMALL) as apps:
        # The client's counters only: a dead agent's port answers the peer agent's gRPC
        # reconnects with RSTs in the server namespaces, which is not the client's business.
        before = rst_counts(c)
        client = Client(c, str(lab.vip4))
        first = client.get(LARGE)[0]
        if callable(break_b1):
            break_b1(apps)
        second = client.get(LARGE)[0]
        third = client.get(SMALL)[0]
        client.close()
        assert wait_settled(lab) == {}
        after = rst_counts(c)
        refused = apps.frontend.stats.refused
    assert delta(before, after) == {}, "RSTs or aborts counted"
    assert refused == 1
    return [first, second, third]


def test_target_unreachable(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    got = served_locally_when(lab, agents, lambda apps: agents.kill(lab.backends[1],
                                                                    signal.SIGTERM))
    assert got == ["b0", "f0", "f0"]


def test_target_refusing_without_app(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    got = served_locally_when(lab, agents, lambda apps: apps.backends[1].stop())
    assert got == ["b0", "f0", "f0"]


def test_target_timing_out(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    b1 = agents.procs["b1"]

    def freeze(apps: object) -> None:
        b1.send_signal(signal.SIGSTOP)

    try:
        got = served_locally_when(lab, agents, freeze)
    finally:
        b1.send_signal(signal.SIGCONT)
    assert got == ["b0", "f0", "f0"]


def test_target_crashing_before_reply(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    b1 = agents.procs["b1"]

    def crash_during_handoff(apps: object) -> None:
        b1.send_signal(signal.SIGSTOP)  # the Handoff waits on a stopped target ...
        threading.Timer(0.3, b1.send_signal, (signal.SIGKILL,)).start()  # ... that dies

    got = served_locally_when(lab, agents, crash_during_handoff)
    agents.procs.pop("b1").wait()
    assert got == ["b0", "f0", "f0"]


def offload_one(lab: Lab, agents: LabAgents,
                holder: Holder) -> tuple[Frontend, Client, Connection]:
    """The client's first request is offloaded to b0's Holder (not answered yet)."""
    f = lab.frontends[0]
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, ["b0"], small=SMALL).start()
    try:
        client = Client(lab.clients[0], str(lab.vip4))
        client.conn.request("GET", f"/size/{LARGE}")
        conn = holder.take()
    except BaseException:
        fe.stop()
        holder.close()
        raise
    assert conn.kind == Kind.HANDED_IN and conn.sock is not None
    assert conn.preread.startswith(f"GET /size/{LARGE} ".encode())
    return fe, client, conn


def test_target_crash_after_taking_the_connection(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    f, b0 = lab.frontends[0], lab.backends[0]
    holder = Holder(b0, agents)
    fe, client, conn = offload_one(lab, agents, holder)
    try:
        assert pinned_flows(f) == 1 and pinned_flows(b0) == 1
        # The backend host dies: its socket vanishes without a packet, its agent is gone.
        assert conn.sock is not None
        xo.tcp.release(conn.sock)
        agents.kill(b0)
        # A dead host answers nothing (a refused connect would mean "agent restarting").
        b0.run(["nft", "-f", "-"], input=DEAD_HOST_NFT, text=True)
        try:
            deadline = time.monotonic() + HEALTH_DEADLINE_S
            while pinned_flows(f) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            b0.run(["nft", "delete", "table", "inet", DEAD_HOST_TABLE])
        assert pinned_flows(f) == 0, "the owner kept a redirect to a dead target"
        agents.start(b0)  # its restart removes the rewrite whose socket died with it
        assert pinned_flows(b0) == 0
    finally:
        client.close()
        fe.stop()
        holder.close()


def test_owner_restart_reconciles_and_takes_the_flow_back(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
    holder = Holder(b0, agents)
    # The client's counters only: the SIGKILLed agent's own gRPC sockets may close with an
    # RST (unread bytes from b0), which is a crash's business, not the client's.
    before = rst_counts(c)
    fe, client, conn = offload_one(lab, agents, holder)
    try:
        agents.kill(f)  # the owner agent crashes; its redirect stays in the pinned map
        fe.stop()
        agents.start(f)  # ... and comes back, adopting the redirect
        assert pinned_flows(f) == 1
        fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT + 2),
                             agents.socket_path(f), "http"), f.name, [], small=LARGE).start()
        holder.serve_and_give_back(conn, client, LARGE)
        # served by the new frontend app on the same connection, byte-exact
        assert_back_home(lab, client, SMALL, before, c)
    finally:
        fe.stop()
        holder.close()


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_client_closes_while_offloaded(env: tuple[Lab, LabAgents], how: str) -> None:
    lab, agents = env
    f, b0 = lab.frontends[0], lab.backends[0]
    holder = Holder(b0, agents)
    fe, client, conn = offload_one(lab, agents, holder)
    before = rst_counts(f, b0)
    try:
        assert conn.sock is not None
        sock = client.conn.sock
        if how == "rst":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        # The target app sees the close (EOF or reset) and gives the connection back.
        conn.sock.settimeout(5)
        try:
            assert conn.sock.recv(100) == b""
        except ConnectionResetError:
            assert how == "rst"
        holder.server.give_back(conn.sock, conn.handoff_id)
        conn.sock.close()
        assert wait_settled(lab) == {}, "a rule outlived its connection"
        if how == "fin":  # a reset from the client is the client's; we add none
            assert delta(before, rst_counts(f, b0)) == {}
    finally:
        fe.stop()
        holder.close()


def stub_as(agents: LabAgents, identity: str, target: Host) -> offload_pb2_grpc.OffloadStub:
    cert, key = agents.ca.issue(identity)
    creds = grpc.ssl_channel_credentials(agents.ca.cert_pem, key, cert)
    channel = grpc.secure_channel(f"{target.ip4}:7000", creds,
                                  options=[("grpc.ssl_target_name_override", target.name)])
    return offload_pb2_grpc.OffloadStub(channel)


def test_stranger_with_a_valid_certificate_is_refused(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    b0, c = lab.backends[0], lab.clients[0]
    with c.enter():
        stub = stub_as(agents, "mallory", b0)
        with pytest.raises(grpc.RpcError) as e:
            stub.Peer(offload_pb2.PeerInfoRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a configured peer" in (e.value.details() or "")


def test_bad_target_and_malformed_handoffs_get_error_replies(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    b0, c = lab.backends[0], lab.clients[0]
    good_flow = offload_pb2.Flow(
        client=offload_pb2.Endpoint(addr=c.ip4.packed, port=40001),
        vip=offload_pb2.Endpoint(addr=lab.vip4.packed, port=80))
    tcp = offload_pb2.TcpState(version=1, local=good_flow.vip, remote=good_flow.client)
    cases = {
        "not one of our handoff addresses": offload_pb2.HandoffRequest(
            handoff_id="x1", flow=good_flow, tcp=tcp, app="http",
            target=offload_pb2.Endpoint(addr=lab.frontends[0].ip4.packed, port=40000)),
        "bad flow": offload_pb2.HandoffRequest(
            handoff_id="x2", flow=offload_pb2.Flow(client=offload_pb2.Endpoint(addr=b"\1\2")),
            tcp=tcp, target=offload_pb2.Endpoint(addr=b0.ip4.packed, port=40000)),
        "handoff_id": offload_pb2.HandoffRequest(),
        "bad tcp state": offload_pb2.HandoffRequest(
            handoff_id="x3", flow=good_flow, tcp=tcp, app="http",
            target=offload_pb2.Endpoint(addr=b0.ip4.packed, port=40000)),
    }
    holder = Holder(b0, agents)  # an app is there: refusals are about the messages
    try:
        with c.enter():
            stub = stub_as(agents, "f0", b0)  # a configured peer's identity
            for detail, req in cases.items():
                reply = stub.Handoff(req, timeout=5)
                assert not reply.accepted and detail in reply.detail, (detail, reply)
            ready = stub.Ready(offload_pb2.ReadyRequest(handoff_id="nope"), timeout=5)
            assert not ready.ok
            # still serving
            assert stub.Peer(offload_pb2.PeerInfoRequest(), timeout=5).name == "b0"
    finally:
        holder.close()
    assert pinned_flows(b0) == 0


def test_garbage_on_the_local_socket_does_not_hurt_the_agent(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    b0 = lab.backends[0]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agents.socket_path(b0))
    s.sendall(framing.HEADER.pack(5) + b"\xff\xff\xff\xff\xff")
    s.settimeout(5)
    assert s.recv(10) == b""  # the agent closed this connection ...
    s.close()
    # ... and answers the next app normally
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agents.socket_path(b0))
    framing.send(s, local_pb2.LocalMessage(hello=local_pb2.Hello(app="probe")))
    dec = framing.Decoder()
    frames = None
    while not frames:
        frames = framing.recv_into(s, dec)
    assert frames[0].msg.hello_reply.ok and frames[0].msg.hello_reply.agent == "b0"
    s.close()


def test_app_closing_without_give_back_ends_the_flow(env: tuple[Lab, LabAgents]) -> None:
    """The target app closes the handed-in socket itself (as on EOF or when it dies): the
    close completes through the rules, then the target's sweep ends the flow on both sides."""
    lab, agents = env
    c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
    holder = Holder(b0, agents)
    fe, client, conn = offload_one(lab, agents, holder)
    before = rst_counts(c, f, b0)
    try:
        assert conn.sock is not None
        conn.sock.sendall(response(LARGE, "b0", False))
        conn.sock.close()  # no give back
        r = client.conn.getresponse()
        assert r.read() == body(LARGE)
        client.close()  # the client's FIN reaches b0 through the redirect: a clean close
        assert wait_settled(lab) == {}, "rules outlived a connection the app closed"
        assert delta(before, rst_counts(c, f, b0)) == {}
    finally:
        fe.stop()
        holder.close()


def test_full_flow_table_refuses_the_offload_and_the_app_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The frontend's flow table holds one flow: while one connection is offloaded, a second
    offload is refused at block time with a reason, served locally, and nothing is lost."""

    def one_flow_on_f0(agents: LabAgents) -> None:
        path = agents.configs["f0"]
        path.write_text(dumps(dataclasses.replace(load(path), max_flows=1)))

    with lab_with_agents(tmp_path, prepare=one_flow_on_f0) as (lab, agents):
        c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
        holder = Holder(b0, agents)
        fe, first, conn = offload_one(lab, agents, holder)
        before = rst_counts(c, f, b0)
        try:
            assert pinned_flows(f) == 1
            second = Client(c, str(lab.vip4))
            with caplog.at_level(logging.WARNING, logger="xo.httpapp"):
                assert second.get(LARGE)[0] == "f0"  # get() checks every body byte
            second.close()
            assert fe.stats.refused == 1
            assert any("flow table" in r.getMessage() and "full" in r.getMessage()
                       for r in caplog.records), [r.getMessage() for r in caplog.records]
            holder.serve_and_give_back(conn, first, LARGE)
            assert_back_home(lab, first, SMALL, before, c, f, b0)
        finally:
            fe.stop()
            holder.close()
