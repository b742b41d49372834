"""The hardware rule tier through real agents (hw_rules = true, the default size policy: a rule
for transfers of 2 MiB and more, as in seed 003). The HTTP frontend announces each response's
size with its offload; offloads below the threshold get no rule (`skipped` in `xo status`,
counted), larger ones are queued. On this host (no cls_flower) the queue finds flower missing,
says so once, counts one failure per queued rule, and every flow keeps working on its eBPF
redirect: byte-exact, zero RST, no rule left behind. On a kernel with flower (the VM tier) the
same run installs and removes one rule per large flow."""

from __future__ import annotations

import ast
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from offload_kit import Client, Holder, delta, rst_counts, wait_settled

import xo.status
from xo.agent.labkit import LabAgents
from xo.app import Kind, Server
from xo.httpapp import HTTP_PORT, Frontend, body, lab_apps, listener, response, wait_acked
from xo.hwrules import DEFAULT_THRESHOLD
from xo.lab import Lab

pytestmark = pytest.mark.net

SMALL = 1000  # served by the frontend itself
MID = 200_000  # offloaded, below the hardware rule threshold
LARGE = DEFAULT_THRESHOLD + 1_000_000  # offloaded with a hardware rule
REQUESTS = (SMALL, MID, LARGE, SMALL, MID, LARGE)
UNSUPPORTED = "hardware rules disabled, flows stay on eBPF"
CLOSED = re.compile(r"hardware rule queue closed: (\{[^}]*\})")
PENDING = ("queued", "issuing")  # the queue's worker has not answered yet
STATUS_WAIT_S = 10.0
S3_OFFLOAD = 1 << 20  # the gateway offloads GETs of at least this many bytes
S3_RANGE = S3_OFFLOAD + 100_000  # a range GET offloaded, below the hardware rule threshold


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Lab, LabAgents]]:
    with Lab(clients=1, frontends=1, backends=2) as lab:
        agents = LabAgents(lab, tmp_path, verbose=True, hw_rules=True)
        agents.start()
        try:
            yield lab, agents
        finally:
            agents.stop()


def queue_counts(lab: Lab, agents: LabAgents) -> tuple[dict[str, int], str]:
    """Stop the agents; the frontend's queue counts (logged at close) and its log."""
    agents.stop()
    log = agents.log_path(lab.frontends[0]).read_text(errors="replace")
    found = CLOSED.findall(log)
    assert len(found) == 1, log[-3000:]
    return ast.literal_eval(found[0]), log


def test_only_large_offloads_get_a_rule_and_flows_stay_on_ebpf(
        env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    c, f = lab.clients[0], lab.frontends[0]
    with lab_apps(lab, agents, small=SMALL) as apps:
        before = rst_counts(c, f, *lab.backends)
        client = Client(c, str(lab.vip4))
        served = [client.get(size)[0] for size in REQUESTS]  # get() checks every body byte
        client.close()
        assert wait_settled(lab) == {}
        after = rst_counts(c, f, *lab.backends)
    assert served == ["f0", "b0", "b1", "f0", "b0", "b1"]
    assert apps.frontend.stats.offloaded == REQUESTS.count(MID) + REQUESTS.count(LARGE)
    assert delta(before, after) == {}
    counts, log = queue_counts(lab, agents)
    large = REQUESTS.count(LARGE)
    assert counts["skipped"] == REQUESTS.count(MID)  # by policy: no rule, no netlink request
    assert counts["queued"] == large
    if UNSUPPORTED in log:  # this host: one report, then every rule fails without a syscall
        assert log.count(UNSUPPORTED) == 1
        assert counts["failed"] == large
        assert "TC classifier not found" in log
    else:  # flower present: each large flow's rule went in (software) and came out at its End
        assert counts.get("in_sw", 0) + counts.get("in_hw", 0) == large
        assert counts["removed"] == large


def hw_state(lab: Lab, agents: LabAgents, handoff_id: str) -> str:
    """The owner's hardware rule state of a flow once the queue has decided it (`xo status`)."""
    deadline = time.monotonic() + STATUS_WAIT_S
    while True:
        st = xo.status.query(agents.socket_path(lab.frontends[0]))
        (flow,) = [fl for fl in st.flows if fl.handoff_id == handoff_id]
        assert (flow.role, flow.ebpf_rule) == ("owner", "redirect")
        if flow.hw_rule not in PENDING or time.monotonic() > deadline:
            return flow.hw_rule
        time.sleep(0.05)


def test_status_shows_which_flows_got_no_rule_by_policy(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    c, f, b0 = lab.clients[0], lab.frontends[0], lab.backends[0]
    holder = Holder(b0, agents)
    fe = Frontend(Server(listener(f, str(lab.vip4), HTTP_PORT), agents.socket_path(f), "http"),
                  f.name, ["b0"], small=SMALL).start()
    states = {}
    try:
        before = rst_counts(c, f, b0)
        client = Client(c, str(lab.vip4))
        for size in (MID, LARGE):
            client.conn.request("GET", f"/size/{size}")
            conn = holder.take()  # the flow is offloaded and held: its rules are in place
            assert conn.kind == Kind.HANDED_IN and conn.sock is not None
            assert conn.preread.startswith(f"GET /size/{size} ".encode())
            states[size] = hw_state(lab, agents, conn.handoff_id)
            # more than the socket buffers hold: the client reads while the backend sends
            sender = threading.Thread(target=conn.sock.sendall,
                                      args=(response(size, b0.name, True),))
            sender.start()
            r = client.conn.getresponse()
            assert r.getheader("X-Served-By") == b0.name and r.read() == body(size)
            sender.join(STATUS_WAIT_S)
            assert wait_acked(conn.sock)
            holder.server.give_back(conn.sock, conn.handoff_id)
            conn.sock.close()
        assert client.get(SMALL)[0] == f.name  # back on the frontend, same connection
        client.close()
        assert wait_settled(lab) == {}
        assert delta(before, rst_counts(c, f, b0)) == {}
    finally:
        fe.stop()
        holder.close()
    counts, log = queue_counts(lab, agents)
    assert (counts["skipped"], counts["queued"]) == (1, 1)
    assert states[MID] == "skipped"
    # here flower is absent: the rule was queued and failed; with flower (veth: no NIC offload)
    # it went in in software
    assert states[LARGE] == ("failed" if UNSUPPORTED in log else "in_sw")


def test_s3_gateway_announces_the_range_length(tmp_path: Path) -> None:
    """The S3 gateway offloads GETs >= 1 MiB and tells the agent each one's range length: a
    1.5 MiB object and a 1.1 MB range of a 3 MB one get no rule, the whole 3 MB object does."""
    import boto3  # the S3 client stack: imported only when the test runs
    from botocore.config import Config

    from xo.rgw.labrun import ACCESS_KEY, SECRET_KEY, S3Deployment

    mid, big = os.urandom(S3_OFFLOAD + S3_OFFLOAD // 2), os.urandom(LARGE)
    with (
        Lab(clients=1, frontends=1, backends=2) as lab,
        LabAgents(lab, tmp_path / "agents", verbose=True, hw_rules=True) as agents,
    ):
        c = lab.clients[0]
        sockets = {h.name: agents.socket_path(h) for h in [*lab.frontends, *lab.backends]}
        with S3Deployment(lab, tmp_path / "s3", offload=True, threshold=S3_OFFLOAD,
                          agent_sockets=sockets, verbose=True) as dep, c.enter():
            s3 = boto3.client(
                "s3", endpoint_url=dep.url, aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                              retries={"max_attempts": 1, "mode": "standard"}))
            s3.create_bucket(Bucket="hwrules")
            s3.put_object(Bucket="hwrules", Key="mid", Body=mid)
            s3.put_object(Bucket="hwrules", Key="big", Body=big)
            before = rst_counts(c)
            assert s3.get_object(Bucket="hwrules", Key="mid")["Body"].read() == mid
            assert s3.get_object(Bucket="hwrules", Key="big")["Body"].read() == big
            rng = s3.get_object(Bucket="hwrules", Key="big", Range=f"bytes=0-{S3_RANGE - 1}")
            assert rng["Body"].read() == big[:S3_RANGE]
            assert wait_settled(lab) == {}
            assert delta(before, rst_counts(c)) == {}
            assert dep.log("gateway").count("came back after the node served it") == 3
        counts, log = queue_counts(lab, agents)
    assert (counts["skipped"], counts["queued"]) == (2, 1), log[-3000:]
