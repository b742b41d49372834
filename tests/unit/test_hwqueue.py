"""The hardware rule queue's state machine, driven through a gated transport.

The transport is a test double only to hold a request "in flight" for as long as a test needs
(a timing race a real kernel answers too fast to hit); the real netlink path is tested in
tests/kernel/test_flower_queue.py and, where flower is absent, tests/net/test_hwrules_noflower.py.
"""

from __future__ import annotations

import errno
import ipaddress
import threading
from collections.abc import Iterator

import pytest

from xo.flow import Endpoint, FlowKey
from xo.hwrules import (
    FlowerRule,
    HwRuleQueue,
    QueueClosed,
    RuleRejected,
    RuleState,
    SizePolicy,
    block_rule,
)
from xo.hwrules.policy import DEFAULT_THRESHOLD, MIB
from xo.tc.flower import OffloadState

WAIT_S = 5.0
IN_HW = OffloadState(in_hw=True, not_in_hw=False, in_hw_count=1, skip_sw=False, skip_hw=False)
IN_SW = OffloadState(in_hw=False, not_in_hw=True, in_hw_count=0, skip_sw=False, skip_hw=False)
BIG = DEFAULT_THRESHOLD


class GatedTransport:
    """Records every call; an add blocks while `gate` is closed, so it stays in flight."""

    def __init__(self, placed: OffloadState = IN_HW) -> None:
        self.placed = placed
        self.calls: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.in_flight = threading.Event()
        self.reject: RuleRejected | None = None
        self.closed = False

    def add(self, rule: FlowerRule) -> OffloadState:
        self.calls.append(("add", rule.handle))
        self.in_flight.set()
        if not self.gate.wait(WAIT_S):
            raise TimeoutError("test gate never opened")
        if self.reject is not None:
            raise self.reject
        return self.placed

    def delete(self, rule: FlowerRule) -> None:
        self.calls.append(("delete", rule.handle))

    def close(self) -> None:
        self.closed = True


def flow(n: int) -> FlowKey:
    return FlowKey(Endpoint(ipaddress.ip_address("198.18.0.10"), 40000 + n),
                   Endpoint(ipaddress.ip_address("198.18.0.100"), 80))


def rule(n: int) -> FlowerRule:
    return block_rule(flow(n), ifindex=2)


@pytest.fixture
def transport() -> GatedTransport:
    return GatedTransport()


@pytest.fixture
def queue(transport: GatedTransport) -> Iterator[HwRuleQueue]:
    q = HwRuleQueue(transport)
    yield q
    transport.gate.set()
    q.close(timeout=WAIT_S)


def test_rule_goes_in_hw_then_is_removed(queue: HwRuleQueue, transport) -> None:
    ticket = queue.submit(rule(1), size=BIG)
    assert ticket is not None
    assert queue.drain(WAIT_S)
    assert queue.state(flow(1)) is RuleState.IN_HW
    assert queue.end(flow(1), wait=True, timeout=WAIT_S) is RuleState.REMOVED
    assert transport.calls == [("add", ticket.rule.handle), ("delete", ticket.rule.handle)]


def test_not_in_hw_is_in_sw() -> None:
    q = HwRuleQueue(GatedTransport(placed=IN_SW))
    try:
        q.submit(rule(1), size=BIG)
        assert q.drain(WAIT_S)
        assert q.state(flow(1)) is RuleState.IN_SW
        assert q.counts["in_sw"] == 1
    finally:
        q.close(timeout=WAIT_S)


def test_cancel_while_queued_never_touches_the_kernel(queue: HwRuleQueue, transport) -> None:
    transport.gate.clear()
    first = queue.submit(rule(1), size=BIG)
    assert transport.in_flight.wait(WAIT_S)  # rule 1 in flight: rule 2 must wait its turn
    second = queue.submit(rule(2), size=BIG)
    assert queue.state(flow(2)) is RuleState.QUEUED
    assert queue.end(flow(2)) is RuleState.CANCELLED
    transport.gate.set()
    assert queue.drain(WAIT_S)
    assert first is not None and second is not None
    assert transport.calls == [("add", first.rule.handle)]
    assert second.reason == "flow ended before the rule was issued"
    assert queue.counts["cancelled"] == 1


def test_end_while_in_flight_waits_then_deletes(queue: HwRuleQueue, transport) -> None:
    transport.gate.clear()
    ticket = queue.submit(rule(1), size=BIG)
    assert transport.in_flight.wait(WAIT_S)
    assert queue.state(flow(1)) is RuleState.ISSUING
    assert queue.end(flow(1)) is RuleState.ISSUING  # cannot be cancelled any more
    assert not ticket.done.is_set()
    transport.gate.set()
    assert ticket.done.wait(WAIT_S)
    assert ticket.state is RuleState.REMOVED
    assert transport.calls == [("add", ticket.rule.handle), ("delete", ticket.rule.handle)]


def test_requests_are_issued_in_order(queue: HwRuleQueue, transport) -> None:
    tickets = [queue.submit(rule(n), size=BIG) for n in range(20)]
    assert queue.drain(WAIT_S)
    assert transport.calls == [("add", t.rule.handle) for t in tickets if t]
    assert len({t.rule.handle for t in tickets if t}) == 20


def test_states_reach_the_listener_in_order(transport) -> None:
    seen: list[RuleState] = []
    q = HwRuleQueue(transport, listener=lambda f, s, r: seen.append(s))
    try:
        q.submit(rule(1), size=BIG)
        assert q.drain(WAIT_S)
        q.end(flow(1), wait=True, timeout=WAIT_S)
    finally:
        q.close(timeout=WAIT_S)
    assert seen == [RuleState.ISSUING, RuleState.IN_HW, RuleState.REMOVING,
                    RuleState.REMOVED]


def test_unsupported_kernel_reported_once_then_fails_fast(transport, caplog) -> None:
    transport.reject = RuleRejected("add block: TC classifier not found (errno 2)",
                                    errno.ENOENT, unsupported=True)
    q = HwRuleQueue(transport)
    try:
        for n in range(3):
            q.submit(rule(n), size=BIG)
        assert q.drain(WAIT_S)
    finally:
        q.close(timeout=WAIT_S)
    assert [q.state(flow(n)) for n in range(3)] == [RuleState.FAILED] * 3
    assert q.counts["failed"] == 3
    assert "TC classifier not found" in q.unsupported_reason
    assert len([c for c in transport.calls if c[0] == "add"]) == 1  # the kernel asked once
    warnings = [r for r in caplog.records if "hardware rules disabled" in r.getMessage()]
    assert len(warnings) == 1


def test_one_rule_rejected_does_not_disable_the_queue(transport) -> None:
    transport.reject = RuleRejected("add: File exists (errno 17)", errno.EEXIST)
    q = HwRuleQueue(transport)
    try:
        q.submit(rule(1), size=BIG)
        assert q.drain(WAIT_S)
        transport.reject = None
        q.submit(rule(2), size=BIG)
        assert q.drain(WAIT_S)
        assert (q.state(flow(1)), q.state(flow(2))) == (RuleState.FAILED, RuleState.IN_HW)
        assert q.unsupported_reason == ""
    finally:
        q.close(timeout=WAIT_S)


def test_policy_skips_small_and_unknown_sizes(queue: HwRuleQueue, transport) -> None:
    small, unknown = queue.submit(rule(1), size=BIG - 1), queue.submit(rule(2), size=None)
    big = queue.submit(rule(3), size=2 * MIB)
    assert queue.drain(WAIT_S)
    assert (small.state, unknown.state, big.state) == (
        RuleState.SKIPPED, RuleState.SKIPPED, RuleState.IN_HW)
    assert small.reason == f"{BIG - 1} bytes < threshold {BIG}"
    assert "unknown" in unknown.reason
    assert [op for op, _ in transport.calls] == ["add"]  # skipped flows never reach the kernel
    assert queue.counts["skipped"] == 2 and queue.counts["queued"] == 1
    # `xo status` reads the skip until the flow ends; then the flow is forgotten
    assert queue.state(flow(1)) is RuleState.SKIPPED
    assert queue.end(flow(1)) is RuleState.SKIPPED
    assert queue.state(flow(1)) is None
    # a later offload of the same 4-tuple (the flow came back and left again) is judged anew
    again = queue.submit(rule(2), size=BIG)
    assert queue.drain(WAIT_S) and again.state is RuleState.IN_HW


@pytest.mark.parametrize(("policy", "size", "wanted"), [
    (SizePolicy(), DEFAULT_THRESHOLD, True),
    (SizePolicy(), DEFAULT_THRESHOLD - 1, False),
    (SizePolicy(), 0, False),
    (SizePolicy(), None, False),
    (SizePolicy(unknown_size=True), None, True),
    (SizePolicy(threshold=0), 0, True),
    (SizePolicy(threshold=0, unknown_size=False), None, False),
])
def test_size_policy(policy: SizePolicy, size: int | None, wanted: bool) -> None:
    assert policy.wants(size) is wanted


def test_size_policy_refuses_negative_numbers() -> None:
    with pytest.raises(ValueError, match="size threshold"):
        SizePolicy(threshold=-1)
    with pytest.raises(ValueError, match="transfer size"):
        SizePolicy().wants(-1)


def test_duplicate_and_unknown_flows_raise(queue: HwRuleQueue) -> None:
    queue.submit(rule(1), size=BIG)
    with pytest.raises(ValueError, match="already has a hardware rule"):
        queue.submit(rule(1), size=BIG)
    with pytest.raises(KeyError, match="no hardware rule"):
        queue.end(flow(9))


def test_close_cancels_queued_and_removes_installed(transport) -> None:
    q = HwRuleQueue(transport)
    installed = q.submit(rule(1), size=BIG)
    assert q.drain(WAIT_S)
    transport.gate.clear()
    transport.in_flight.clear()
    in_flight = q.submit(rule(2), size=BIG)
    assert transport.in_flight.wait(WAIT_S)
    queued = q.submit(rule(3), size=BIG)
    closer = threading.Thread(target=q.close, kwargs={"timeout": WAIT_S})
    closer.start()
    transport.gate.set()
    closer.join(WAIT_S)
    assert installed and in_flight and queued
    assert (installed.state, in_flight.state, queued.state) == (
        RuleState.REMOVED, RuleState.REMOVED, RuleState.CANCELLED)
    assert ("add", queued.rule.handle) not in transport.calls
    assert transport.closed
    with pytest.raises(QueueClosed):
        q.submit(rule(4), size=BIG)
