"""Operations against real agents in a lab: `xo status --json` matches what the lab really
holds (client socket, target socket, pinned rules, bytes sent), and a metrics scrape shows the
counters and histograms moving with real handoffs and a real refusal."""

from __future__ import annotations

import dataclasses
import re
import threading
import urllib.request
from collections.abc import Iterator

import pytest
from offload_kit import (
    Client,
    Holder,
    agent_status,
    delta,
    pinned_flows,
    rst_counts,
    wait_settled,
)

from xo.agent.config import dumps, load
from xo.agent.labkit import HANDOFF_PORTS, LabAgents
from xo.app import Kind, Server
from xo.httpapp import HTTP_PORT, Frontend, body, lab_apps, listener, response
from xo.lab import Host, Lab

pytestmark = pytest.mark.net

AGENT_BACKENDS = 1
SMALL = 1000
LARGE = 400_000
METRICS = "127.0.0.1:9464"  # loopback inside each agent's own namespace
ROUNDS = 3


def prepare_agents(agents: LabAgents) -> None:
    for path in agents.configs.values():
        path.write_text(dumps(dataclasses.replace(load(path), metrics=METRICS)))


@pytest.fixture(autouse=True)
def no_leaks(env: tuple[Lab, LabAgents]) -> Iterator[None]:
    yield
    assert wait_settled(env[0]) == {}, "flow entries left behind"


def scrape(h: Host) -> dict[str, float]:
    """GET /metrics from inside the host's namespace: {'name{labels}': value}."""
    with h.enter():
        text = urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_status_json_matches_the_lab(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
    before = rst_counts(c, f, b0)
    holder = Holder(b0, agents)
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, [b0.name], small=SMALL).start()
    client = Client(c, str(lab.vip4))
    try:
        client.conn.request("GET", f"/size/{LARGE}")
        conn = holder.take()
        assert conn.kind == Kind.HANDED_IN and conn.sock is not None
        client_ep = "{}:{}".format(*client.conn.sock.getsockname())
        target_ep = "{}:{}".format(*conn.sock.getsockname())

        fs, bs = agent_status(agents, f), agent_status(agents, b0)
        assert [x["role"] for x in fs["flows"]] == ["owner"]
        assert [x["role"] for x in bs["flows"]] == ["target"]
        own, tgt = fs["flows"][0], bs["flows"][0]
        for view in (own, tgt):
            assert view["client"] == client_ep
            assert view["vip"] == f"{lab.vip4}:{HTTP_PORT}"
            assert view["target"] == target_ep
            assert view["handoff_id"] == conn.handoff_id
            assert view["app"] == "http"
            assert view["hw_rule"] == "none"  # no hardware tier on this kernel
        assert str(b0.ip4) == target_ep.split(":")[0]
        assert HANDOFF_PORTS[0] <= int(target_ep.split(":")[1]) <= HANDOFF_PORTS[1]
        assert (own["peer"], own["state"], own["ebpf_rule"]) == ("b0", "offloaded", "redirect")
        assert (tgt["peer"], tgt["state"], tgt["ebpf_rule"]) == ("f0", "serving", "snat")
        assert pinned_flows(f) == 1 and pinned_flows(b0) == 1  # the maps hold what it says
        assert fs["peers"] == [{**fs["peers"][0], "name": "b0", "healthy": True, "flows": 1}]
        assert fs["peers"][0]["rtt_ms"] > 0
        assert fs["apps"] == {"http": 1} and bs["apps"] == {"http": 1}
        assert fs["refusals"] == {} and fs["hw_queue_depth"] == 0

        # b0 answers the client directly: its source rewrite counts every response byte.
        sender = threading.Thread(target=conn.sock.sendall, args=(response(LARGE, b0.name,
                                                                           True),))
        sender.start()
        r = client.conn.getresponse()
        assert r.read() == body(LARGE)
        sender.join()
        bs2, fs2 = agent_status(agents, b0), agent_status(agents, f)
        sent = bs2["flows"][0]["bytes"] - tgt["bytes"]
        assert LARGE < sent < 2 * LARGE, f"SNAT entry counted {sent} bytes for a {LARGE} body"
        assert fs2["flows"][0]["packets"] > own["packets"]  # the client's ACKs, redirected
        assert fs2["flows"][0]["age_s"] >= own["age_s"]

        holder.server.give_back(conn.sock, conn.handoff_id)
        conn.sock.close()
        assert client.get(SMALL)[0] == f.name  # back on f0, same connection
        assert wait_settled(lab) == {}
        assert agent_status(agents, f)["flows"] == [] and agent_status(agents, b0)["flows"] == []
        assert delta(before, rst_counts(c, f, b0)) == {}
    finally:
        client.close()
        fe.stop()
        holder.close()


def _get(m: dict[str, float], key: str) -> float:
    return m.get(key, 0.0)


def test_metrics_scrape_shows_counters_moving(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
    f_before, b_before = scrape(f), scrape(b0)
    with lab_apps(lab, agents, small=SMALL):
        client = Client(c, str(lab.vip4))
        for _ in range(ROUNDS):
            assert client.get(LARGE)[0] == b0.name
        client.close()
    # One refusal: a frontend that offloads to a peer nobody configured.
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, ["nosuch"], small=SMALL).start()
    try:
        client = Client(c, str(lab.vip4))
        assert client.get(LARGE)[0] == f.name  # served locally after the refusal
        client.close()
    finally:
        fe.stop()
    assert wait_settled(lab) == {}
    fm, bm = scrape(f), scrape(b0)

    ok = 'xo_operations_total{op="%s",result="ok"}'
    assert _get(fm, ok % "offload") - _get(f_before, ok % "offload") == ROUNDS
    assert _get(fm, ok % "end") - _get(f_before, ok % "end") == ROUNDS
    assert _get(bm, ok % "handoff") - _get(b_before, ok % "handoff") == ROUNDS
    assert _get(bm, ok % "give_back") - _get(b_before, ok % "give_back") == ROUNDS
    refused = 'xo_operations_total{op="offload",result="REFUSED"}'
    assert _get(fm, refused) - _get(f_before, refused) == 1
    assert agent_status(agents, f)["refusals"]["offload/REFUSED"] >= 1

    # Histograms: every phase of each offload observed once, buckets cumulative.
    for phase in ("block", "capture", "handoff_rpc", "redirect", "release", "ready"):
        key = f'xo_handoff_phase_seconds_count{{kind="offload",phase="{phase}"}}'
        assert _get(fm, key) - _get(f_before, key) == ROUNDS, phase
    tot = 'xo_handoff_duration_seconds_{}{{kind="offload"}}'
    assert _get(fm, tot.format("sum")) > _get(f_before, tot.format("sum"))
    buckets = sorted(((float(m.group(1)) if m.group(1) != "+Inf" else float("inf")), v)
                     for k, v in fm.items()
                     if (m := re.match(r'xo_handoff_duration_seconds_bucket\{kind="offload",'
                                       r'le="([^"]+)"\}', k)))
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and counts[-1] == _get(fm, tot.format("count"))

    verdict = 'xo_datapath_packets_total{verdict="%s"}'
    assert _get(fm, verdict % "redirected") > _get(f_before, verdict % "redirected")
    assert _get(bm, verdict % "snatted") > _get(b_before, verdict % "snatted")
    assert _get(fm, 'xo_peer_healthy{peer="b0"}') == 1
    assert not any(k.startswith("xo_flows{") for k in fm)  # settled: no flow gauges left
    assert _get(fm, "xo_agent_uptime_seconds") > 0
