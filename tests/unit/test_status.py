"""`xo status` client side: the request/answer over a real unix socket, the JSON shape, the
table, and clear errors when the agent is missing, silent or talks nonsense."""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xo import status
from xo.agent import framing
from xo.flow import Endpoint, FlowKey
from xo.v1 import local_pb2

CLIENT = Endpoint(ipaddress.ip_address("198.18.0.100"), 53356)
VIP = Endpoint(ipaddress.ip_address("198.18.0.1"), 80)
TARGET = Endpoint(ipaddress.ip_address("198.18.0.50"), 40003)


def sample() -> local_pb2.StatusReply:
    st = local_pb2.StatusReply(agent="f0", interface="eth0", uptime_s=12.5, reattached=True,
                               hw_queue_depth=2)
    st.flows.add(role="owner", handoff_id="f0-ab12cd-7", flow=FlowKey(CLIENT, VIP).to_proto(),
                 target=TARGET.to_proto(), peer="b0", app="http", state="offloaded",
                 ebpf_rule="redirect", hw_rule="queued", age_s=3.25, packets=10,
                 bytes=3 * 1024 * 1024)
    v6 = Endpoint(ipaddress.ip_address("fd00:78:6f::64"), 1234)
    st.flows.add(role="rule", flow=FlowKey(v6, Endpoint(ipaddress.ip_address("fd00::1"), 80))
                 .to_proto(), state="unknown", ebpf_rule="snat", hw_rule="none")
    st.peers.add(name="b0", address="198.18.0.50:7000", healthy=True, flows=1, rtt_ms=0.8)
    st.peers.add(name="b1", address="198.18.0.51:7000", healthy=False, failed_checks=4,
                 detail="UNAVAILABLE: connection refused")
    st.refusals["offload/TIMEOUT"] = 3
    st.datapath.update({"redirected": 5, "errors": 0})
    st.apps["http"] = 2
    return st


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Callable[[Callable[[socket.socket], Any]], str]]:
    """A stand-in agent on a real unix socket; the test says how it answers one client."""
    path = str(tmp_path / "agent.sock")
    threads = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def serve(answer: Callable[[socket.socket], Any]) -> str:
        def one() -> None:
            conn, _ = srv.accept()
            with conn:
                answer(conn)
        t = threading.Thread(target=one, daemon=True)
        t.start()
        threads.append(t)
        return path

    yield serve
    srv.close()
    for t in threads:
        t.join(5)


Serve = Callable[[Callable[[socket.socket], Any]], str]


def test_query_sends_a_status_request_and_returns_the_reply(agent: Serve) -> None:
    seen: list[str | None] = []

    def answer(conn: socket.socket) -> None:
        frames = framing.recv_into(conn, framing.Decoder()) or []
        seen.append(frames[0].msg.WhichOneof("body"))
        framing.send(conn, local_pb2.LocalMessage(status_reply=sample()))

    assert status.query(agent(answer)) == sample()
    assert seen == ["status"]


def test_json_shape_uses_text_addresses() -> None:
    d = status.to_dict(sample())
    f = d["flows"][0]
    assert (f["client"], f["vip"], f["target"]) == (str(CLIENT), str(VIP), str(TARGET))
    assert d["flows"][1]["client"] == "[fd00:78:6f::64]:1234" and d["flows"][1]["target"] == "-"
    assert d["refusals"] == {"offload/TIMEOUT": 3} and d["apps"] == {"http": 2}
    assert d["peers"][1]["healthy"] is False and d["hw_queue_depth"] == 2


def test_table_shows_every_column() -> None:
    text = status.render(sample())
    assert "agent f0 on eth0, up 12s (restarted: datapath reattached)" in text
    row = next(line for line in text.splitlines() if "f0-ab12cd-7" in line).split()
    assert row == ["owner", str(CLIENT), str(VIP), str(TARGET), "b0", "offloaded",
                   "redirect", "queued", "3.2s", "10", "3.0M", "f0-ab12cd-7"]
    assert "DOWN UNAVAILABLE: connection refused" in text
    assert "hardware queue depth: 2" in text and "refusals: offload/TIMEOUT=3" in text


def test_missing_agent_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(status.StatusError, match="cannot reach the agent at .*nosuch.sock"):
        status.query(tmp_path / "nosuch.sock")


def test_agent_closing_or_silent_or_garbage(agent: Serve) -> None:
    with pytest.raises(status.StatusError, match="closed the connection"):
        status.query(agent(lambda conn: conn.recv(100)))
    done = threading.Event()
    with pytest.raises(status.StatusError, match="did not answer in 0.2s"):
        status.query(agent(lambda conn: done.wait(5)), timeout=0.2)
    done.set()
    with pytest.raises(status.StatusError, match="bad answer"):
        status.query(agent(lambda conn: conn.sendall(b"\xff\xff\xff\xff" + b"x" * 64)))


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xo.cli import main

    assert main(["status", "-s", str(tmp_path / "nosuch.sock")]) == 1
    assert "xo status: cannot reach the agent" in capsys.readouterr().err
    assert main(["status", "-c", str(tmp_path / "missing.toml")]) == 1
    assert "cannot read" in capsys.readouterr().err
