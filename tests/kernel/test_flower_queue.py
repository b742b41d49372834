"""The hardware rule queue over a real netlink socket, against (patched and stock) netdevsim.

skip_sw rules on the patched netdevsim must come back in_hw; the stock module's refusal must
surface as the queue's "unsupported" reason, reported once, with every rule failed and counted.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Callable

import pytest

from xo.datapath.layout import Redirect
from xo.flow import Endpoint, FlowKey
from xo.hwrules import (
    FINAL_STATES,
    HwRuleQueue,
    NetlinkTransport,
    Placement,
    RuleState,
    SizePolicy,
    redirect_rule,
)
from xo.hwrules.netdevsim import Netdevsim

pytestmark = pytest.mark.kernel

STOCK_REFUSAL = "only offload of BPF classifiers supported"
MAC, BACKEND_MAC = "02:00:00:00:00:01", "02:00:00:00:00:21"
WAIT_S = 60.0
BIG = SizePolicy().threshold
BURST = 40


def flow(n: int) -> FlowKey:
    return FlowKey(Endpoint(ipaddress.ip_address("198.18.0.10"), 20000 + n),
                   Endpoint(ipaddress.ip_address("198.18.0.100"), 80))


def rule(dev: Netdevsim, n: int, placement: Placement):
    target = Redirect(Endpoint(ipaddress.ip_address("198.18.0.21"), 61000 + n), mac=BACKEND_MAC)
    return redirect_rule(flow(n), target, ifindex(dev), MAC, placement)


def ifindex(dev: Netdevsim) -> int:
    return int(open(f"/sys/class/net/{dev.ifname}/ifindex").read())


def clsact(dev: Netdevsim) -> None:
    subprocess.run(["tc", "qdisc", "add", "dev", dev.ifname, "clsact"], check=True)


def flower_rules(dev: Netdevsim) -> list[dict]:
    out = subprocess.run(["tc", "-j", "filter", "show", "dev", dev.ifname, "ingress"],
                         capture_output=True, text=True, check=True).stdout
    return [f for f in json.loads(out or "[]") if f.get("kind") == "flower" and f.get("options")]


@pytest.fixture
def modules(require_module: Callable[[str], None]) -> None:
    for m in ("cls_flower", "act_pedit", "act_csum", "act_mirred"):
        require_module(m)


@pytest.mark.parametrize("placement", [Placement.HW_ONLY, Placement.ANY])
def test_rule_reported_in_hw_on_patched_netdevsim(modules, netdevsim_flower,
                                                   placement: Placement) -> None:
    clsact(netdevsim_flower)
    q = HwRuleQueue(NetlinkTransport())
    try:
        ticket = q.submit(rule(netdevsim_flower, 1, placement), size=BIG)
        assert ticket is not None and q.drain(WAIT_S)
        assert ticket.state is RuleState.IN_HW, ticket.reason
        (dumped,) = flower_rules(netdevsim_flower)
        assert dumped["options"]["in_hw"] is True and dumped["options"]["in_hw_count"] == 1
        assert q.end(flow(1), wait=True, timeout=WAIT_S) is RuleState.REMOVED
        assert flower_rules(netdevsim_flower) == []
    finally:
        q.close(timeout=WAIT_S)


def test_stock_netdevsim_refusal_disables_the_queue_once(modules, netdevsim_stock) -> None:
    clsact(netdevsim_stock)
    q = HwRuleQueue(NetlinkTransport())
    try:
        tickets = [q.submit(rule(netdevsim_stock, n, Placement.HW_ONLY), size=BIG)
                   for n in range(3)]
        assert q.drain(WAIT_S)
    finally:
        q.close(timeout=WAIT_S)
    assert [t.state for t in tickets if t] == [RuleState.FAILED] * 3
    assert STOCK_REFUSAL in q.unsupported_reason
    assert q.counts["failed"] == 3
    assert flower_rules(netdevsim_stock) == []


def test_burst_with_flows_ending_early_leaves_no_rule(modules, netdevsim_flower) -> None:
    """Flows end while their rules are queued or in flight: nothing may outlive its flow."""
    clsact(netdevsim_flower)
    q = HwRuleQueue(NetlinkTransport())
    try:
        tickets = [q.submit(rule(netdevsim_flower, n, Placement.HW_ONLY), size=BIG)
                   for n in range(BURST)]
        for n in range(BURST // 2, BURST):  # the second half ends at once
            q.end(flow(n))
        assert q.drain(WAIT_S)
        for n in range(BURST // 2):
            q.end(flow(n))
        assert q.drain(WAIT_S)
    finally:
        q.close(timeout=WAIT_S)
    states = [t.state for t in tickets if t]
    assert set(states) <= FINAL_STATES and RuleState.FAILED not in states
    cancelled = states.count(RuleState.CANCELLED)
    assert q.counts["in_hw"] == BURST - cancelled  # cancelled rules never reached the kernel
    assert q.counts["removed"] == BURST - cancelled
    assert flower_rules(netdevsim_flower) == []
