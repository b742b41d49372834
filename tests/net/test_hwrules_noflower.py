"""On a kernel without cls_flower (this host), the hardware rule queue fails cleanly and the
flow keeps working on eBPF: the reason is reported once, every rule is counted as failed, and
the redirected connection stays byte-exact with no RST."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from test_datapath import PAYLOAD, echo_via, listen, rsts, wait_closed

from xo.datapath import Datapath, Redirect
from xo.flow import Endpoint, FlowKey
from xo.hwrules import HwRuleQueue, NetlinkTransport, RuleState, redirect_rule
from xo.lab import Lab

pytestmark = pytest.mark.net

VPORT, HPORT, CPORT = 8200, 47200, 40200
FLOWS = 3
WAIT_S = 30.0  # generous: the machine is shared, a VM may be running


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(clients=1, frontends=1, backends=1) as lab:
        yield lab


def test_queue_fails_once_and_the_flow_stays_on_ebpf(lab: Lab, caplog) -> None:
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    vip = Endpoint(lab.vip4, VPORT)
    handoff = Endpoint(b.ip4, HPORT)
    flows = [FlowKey(Endpoint(c.ip4, CPORT + n), vip) for n in range(FLOWS)]
    srv = listen(b, handoff)
    before = rsts(c, f, b)
    caplog.set_level(logging.WARNING, logger="xo.hwrules.queue")
    with Datapath.attach("eth0", netns=f.netns) as dp_f, \
            Datapath.attach("eth0", netns=b.netns) as dp_b:
        target = Redirect(handoff, mac=b.mac)
        dp_f.redirect(flows[0], target)  # eBPF first, as the agent does
        dp_b.snat(FlowKey(flows[0].client, handoff), vip)
        queue = HwRuleQueue(NetlinkTransport(f.netns))
        try:
            tickets = [queue.submit(redirect_rule(fl, target, dp_f.ifindex, dp_f.mac),
                                    size=queue.policy.threshold) for fl in flows]
            assert queue.drain(WAIT_S)
            states = [t.state for t in tickets if t]
            if RuleState.IN_SW in states or RuleState.IN_HW in states:
                pytest.skip("this kernel has cls_flower: the no-flower path does not apply")
            echo_via(c, srv, flows[0].client, vip, PAYLOAD)
            wait_closed(b, handoff)
            assert queue.end(flows[0]) is RuleState.FAILED
        finally:
            queue.close(timeout=WAIT_S)
            srv.close()
    assert states == [RuleState.FAILED] * FLOWS
    assert queue.counts["failed"] == FLOWS
    assert "TC classifier not found" in queue.unsupported_reason
    warnings = [r for r in caplog.records if "hardware rules disabled" in r.getMessage()]
    assert len(warnings) == 1, "the reason must be reported once, not per flow"
    assert rsts(c, f, b) == before
