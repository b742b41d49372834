"""Flower rules in software really move a flow in a lab, rewritten exactly like the eBPF path.

Same scenario and assertions as the eBPF test in tests/net/test_datapath.py
(test_redirect_and_snat_deliver_with_valid_checksums), with the frontend's REDIRECT and the
backend's SNAT as flower rules issued through the hardware rule queue: nothing listens on the
frontend, so a missed redirect draws an RST; the echo must be byte-exact both ways.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xo.datapath.layout import Redirect
from xo.flow import Endpoint, FlowKey
from xo.hwrules import (
    HwRuleQueue,
    NetlinkTransport,
    RuleState,
    SizePolicy,
    redirect_rule,
    snat_rule,
)
from xo.lab import Host, Lab

# The eBPF test's packet helpers (AF_PACKET capture, checksum verification, sockets), reused
# so both paths are judged by the same code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "net"))
from test_datapath import (  # noqa: E402
    PAYLOAD,
    Capture,
    assert_dsr_frames,
    echo_via,
    ip_of,
    listen,
    rsts,
    vip_of,
    wait_closed,
)

pytestmark = pytest.mark.kernel

MODULES = ("cls_flower", "act_pedit", "act_csum", "act_mirred")
HPORT, VPORT, CPORT = 47100, 8100, 40100
WAIT_S = 20.0
EVERY_FLOW = SizePolicy(threshold=0)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(clients=1, frontends=1, backends=1) as lab:
        for h in (lab.frontends[0], lab.backends[0]):
            h.run(["tc", "qdisc", "add", "dev", h.ifname, "clsact"])
        # act_csum leaves GSO packets alone (tcf_csum_ipv4/6_tcp return early), and TCP builds
        # GSO packets whatever the device's gso flag says, so a software SNAT on the sender's
        # egress keeps the pseudo-header seed of the old source and segmentation finishes a
        # wrong checksum (veth marks it verified, so only a capture sees it). A NIC applies
        # the rule per wire packet; in software the backend must send one MSS per skb.
        lab.backends[0].run(["ip", "link", "set", "dev", "eth0", "gso_max_segs", "1"])
        yield lab


def queue_in(h: Host) -> HwRuleQueue:
    return HwRuleQueue(NetlinkTransport(h.netns), policy=EVERY_FLOW)


def flower_filters(h: Host, hook: str) -> str:
    return h.run(["tc", "filter", "show", "dev", h.ifname, hook]).stdout


@pytest.mark.parametrize("family", [4, 6])
def test_flower_redirect_and_snat_move_a_flow_byte_exact(
    require_module: Callable[[str], None], lab: Lab, family: int
) -> None:
    for m in MODULES:
        require_module(m)
    c, f, b = lab.clients[0], lab.frontends[0], lab.backends[0]
    vip = Endpoint(vip_of(lab, family), VPORT + family)
    client = Endpoint(ip_of(c, family), CPORT + family)
    handoff = Endpoint(ip_of(b, family), HPORT + family)
    flow_f, flow_b = FlowKey(client, vip), FlowKey(client, handoff)
    q_f, q_b = queue_in(f), queue_in(b)
    srv = listen(b, handoff)
    cap_b, cap_c = Capture(b), Capture(c)
    before_rst = rsts(c, f, b)
    try:
        size = len(PAYLOAD)
        t_f = q_f.submit(redirect_rule(flow_f, Redirect(handoff, mac=b.mac), f.ifindex, f.mac),
                         size)
        t_b = q_b.submit(snat_rule(flow_b, vip, b.ifindex), size)
        assert t_f and t_b and q_f.drain(WAIT_S) and q_b.drain(WAIT_S)
        # veth has no offload: without skip_sw the kernel keeps the rule in software
        assert (t_f.state, t_b.state) == (RuleState.IN_SW, RuleState.IN_SW), (t_f, t_b)
        echo_via(c, srv, client, vip, PAYLOAD)
        wait_closed(b, handoff)
        assert q_f.end(flow_f, wait=True, timeout=WAIT_S) is RuleState.REMOVED
        assert q_b.end(flow_b, wait=True, timeout=WAIT_S) is RuleState.REMOVED
    finally:
        q_f.close(timeout=WAIT_S)
        q_b.close(timeout=WAIT_S)
        srv.close()
    assert_dsr_frames(cap_b, cap_c, flow_b, vip, f, b, "flower")
    assert rsts(c, f, b) == before_rst
    assert "flower" not in flower_filters(f, "ingress")
    assert "flower" not in flower_filters(b, "egress")
