"""The hardware rule tier through real agents (hw_rules = true). On this host (no cls_flower)
the queue finds flower missing, says so once, counts one failure per offloaded flow, and every
flow keeps working on its eBPF redirect: byte-exact, zero RST, no rule left behind. On a
kernel with flower (the VM tier) the same run installs and removes one rule per flow."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from offload_kit import Client, delta, rst_counts, wait_settled

from xo.agent.labkit import LabAgents
from xo.httpapp import lab_apps
from xo.lab import Lab

pytestmark = pytest.mark.net

SMALL = 1000
LARGE = 200_000
REQUESTS = (SMALL, LARGE, SMALL, LARGE, SMALL, LARGE)
UNSUPPORTED = "hardware rules disabled, flows stay on eBPF"
CLOSED = re.compile(r"hardware rule queue closed: (\{[^}]*\})")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Lab, LabAgents]]:
    with Lab(clients=1, frontends=1, backends=2) as lab:
        agents = LabAgents(lab, tmp_path, verbose=True, hw_rules=True)
        agents.start()
        try:
            yield lab, agents
        finally:
            agents.stop()


def test_flows_keep_working_on_ebpf_when_flower_is_absent(env: tuple[Lab, LabAgents]) -> None:
    lab, agents = env
    c, f = lab.clients[0], lab.frontends[0]
    with lab_apps(lab, agents, small=SMALL) as apps:
        before = rst_counts(c, f, *lab.backends)
        client = Client(c, str(lab.vip4))
        served = [client.get(size)[0] for size in REQUESTS]  # get() checks every body byte
        client.close()
        assert wait_settled(lab) == {}
        after = rst_counts(c, f, *lab.backends)
    offloads = apps.frontend.stats.offloaded
    assert served == ["f0", "b0", "f0", "b1", "f0", "b0"]
    assert offloads == sum(1 for s in REQUESTS if s == LARGE)
    assert delta(before, after) == {}
    agents.stop()  # the queue logs its counts when it closes
    log = agents.log_path(f).read_text(errors="replace")
    found = CLOSED.findall(log)
    assert len(found) == 1, log[-3000:]
    counts = ast.literal_eval(found[0])
    assert counts["queued"] == offloads
    if UNSUPPORTED in log:  # this host: one report, then every rule fails without a syscall
        assert log.count(UNSUPPORTED) == 1
        assert counts["failed"] == offloads
        assert "TC classifier not found" in log
    else:  # flower present: each flow's rule went in (software) and came out at its End
        assert counts.get("in_sw", 0) + counts.get("in_hw", 0) == offloads
        assert counts["removed"] == offloads
