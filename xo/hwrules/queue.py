"""The hardware rule queue: flower rules issued in order by one worker, cancellable until issued.

Why a queue: a flower insert takes milliseconds (tens on real NICs) and cannot be cancelled
once the request is on the socket, while the eBPF map entry that serves the flow meanwhile
costs microseconds. So the agent puts the eBPF rule in first, then `submit()`s the flow's
flower rule here and moves on. A worker thread issues requests one at a time, in order:

    queued -> issuing -> in_hw | in_sw | failed          (end while queued -> cancelled)
    skipped                                              (the size policy gave it no rule)
    in_hw | in_sw -> removing -> removed                 (end after the rule is in)
    issuing + end -> (the add completes) -> removing -> removed

A flow that ends while its rule is still queued is cancelled without touching the kernel; one
that ends while its request is in flight is deleted right after the request returns, so no rule
outlives its flow. Where the kernel or NIC cannot take flower rules at all, the reason is
logged once, later rules fail at once (counted), and the flows keep working on eBPF.
"""

from __future__ import annotations

import collections
import enum
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from xo.flow import FlowKey
from xo.hwrules.policy import SizePolicy
from xo.hwrules.rules import FlowerRule
from xo.hwrules.transport import RuleRejected, Transport

log = logging.getLogger(__name__)

MAX_HANDLE = 0xFFFFFFFF  # flower handles are u32, 0 means "kernel picks"


class RuleState(enum.Enum):
    QUEUED = "queued"
    ISSUING = "issuing"
    IN_HW = "in_hw"
    IN_SW = "in_sw"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REMOVING = "removing"
    REMOVED = "removed"
    SKIPPED = "skipped"  # never queued: the SizePolicy wants no rule for this flow's size


FINAL = frozenset({RuleState.FAILED, RuleState.CANCELLED, RuleState.REMOVED, RuleState.SKIPPED})
INSTALLED = {RuleState.IN_HW, RuleState.IN_SW}


class QueueClosed(RuntimeError):
    """submit() after close()."""


@dataclass(eq=False)  # identity: the work queue removes exactly this ticket
class Ticket:
    """One flow's hardware rule as the queue tracks it."""

    rule: FlowerRule
    state: RuleState = RuleState.QUEUED
    reason: str = ""
    ending: bool = False
    done: threading.Event = field(default_factory=threading.Event)


Listener = Callable[[FlowKey, RuleState, str], None]


class HwRuleQueue:
    """Queue of flower rules for one transport (one netns), drained by one worker thread."""

    def __init__(self, transport: Transport, policy: SizePolicy | None = None,
                 listener: Listener | None = None) -> None:
        self.transport = transport
        self.policy = policy or SizePolicy()
        self.listener = listener
        self.unsupported_reason = ""
        self.counts: collections.Counter[str] = collections.Counter()
        self._tickets: dict[FlowKey, Ticket] = {}
        self._work: collections.deque[tuple[str, Ticket]] = collections.deque()
        self._cond = threading.Condition()
        self._handles = itertools.count(1)
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="xo-hwrules", daemon=True)
        self._worker.start()

    # --- the agent's side -----------------------------------------------------------------
    def submit(self, rule: FlowerRule, size: int | None = None) -> Ticket:
        """Queue the flow's rule if the policy wants it for `size` bytes (None: unknown).

        One rule per flow. A flow the policy skips gets a final SKIPPED ticket (its reason
        says why) that is kept, like a failed one, until end() so its state can be read.
        """
        wanted = self.policy.wants(size)
        with self._cond:
            if self._closing:
                raise QueueClosed("the hardware rule queue is closed")
            old = self._tickets.get(rule.flow)
            if old is not None and old.state not in FINAL:
                raise ValueError(
                    f"flow {rule.flow} already has a hardware rule ({old.state.value})")
            if not wanted:
                ticket = Ticket(rule, RuleState.SKIPPED, self.policy.why_not(size))
                ticket.done.set()
                self._tickets[rule.flow] = ticket
                self.counts["skipped"] += 1
                return ticket
            ticket = Ticket(rule.with_handle(self._next_handle()))
            self._tickets[rule.flow] = ticket
            self.counts["queued"] += 1
            self._work.append(("add", ticket))
            self._cond.notify()
        return ticket

    def end(self, flow: FlowKey, wait: bool = False, timeout: float | None = None) -> RuleState:
        """The flow ended: cancel its rule if still queued, else have the worker delete it.

        Returns the state reached (with wait=True: a final one, unless the timeout expired).
        """
        with self._cond:
            ticket = self._tickets.get(flow)
            if ticket is None:
                raise KeyError(f"no hardware rule for flow {flow}")
            if ticket.state in FINAL:  # failed or skipped: nothing in the kernel, just forget it
                del self._tickets[flow]
                return ticket.state
            cancelled = ticket.state is RuleState.QUEUED
            if cancelled:
                self._work.remove(("add", ticket))
                self._finish(ticket, RuleState.CANCELLED, "flow ended before the rule was issued")
                self.counts["cancelled"] += 1
            elif ticket.state is RuleState.ISSUING:
                ticket.ending = True  # the worker deletes it when the add returns
            elif ticket.state in INSTALLED:
                ticket.state, ticket.ending = RuleState.REMOVING, True
                self._work.append(("delete", ticket))
                self._cond.notify()
            state = ticket.state
        if cancelled:
            self._notify(ticket, RuleState.CANCELLED)
        if wait:
            ticket.done.wait(timeout)
        return ticket.state if wait else state

    def state(self, flow: FlowKey) -> RuleState | None:
        """The rule's state (SKIPPED: no rule by policy); None if never submitted or ended."""
        with self._cond:
            ticket = self._tickets.get(flow)
            return ticket.state if ticket else None

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no work is queued or in flight; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._work and not self._busy, timeout)

    def close(self, remove_installed: bool = True, timeout: float | None = None) -> None:
        """Stop the worker; queued rules are cancelled, installed ones deleted (by default)."""
        with self._cond:
            if self._closing:
                return
            for op, ticket in list(self._work):
                if op == "add":
                    self._work.remove((op, ticket))
                    self._finish(ticket, RuleState.CANCELLED, "queue closed")
                    self.counts["cancelled"] += 1
            if remove_installed:
                for ticket in self._tickets.values():
                    if ticket.state in INSTALLED:
                        ticket.state, ticket.ending = RuleState.REMOVING, True
                        self._work.append(("delete", ticket))
                    elif ticket.state is RuleState.ISSUING:
                        ticket.ending = True
            self._closing = True
            self._cond.notify_all()
        self._worker.join(timeout)
        self.transport.close()

    # --- the worker -------------------------------------------------------------------------
    _busy = False

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._work or self._closing)
                if not self._work:
                    return
                op, ticket = self._work.popleft()
                self._busy = True
                if op == "add":
                    ticket.state = RuleState.ISSUING
                state = ticket.state
            self._notify(ticket, state)
            try:
                if op == "add":
                    self._add(ticket)
                else:
                    self._delete(ticket)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _add(self, ticket: Ticket) -> None:
        if self.unsupported_reason:
            self._failed(ticket, self.unsupported_reason)
            return
        try:
            placed = self.transport.add(ticket.rule)
        except RuleRejected as e:
            if e.unsupported and not self.unsupported_reason:
                self.unsupported_reason = str(e)
                log.warning("hardware rules disabled, flows stay on eBPF: %s", e)
            self._failed(ticket, str(e))
            return
        state = RuleState.IN_HW if placed.in_hw else RuleState.IN_SW
        self.counts[state.value] += 1
        with self._cond:
            ending = ticket.ending
            ticket.state = RuleState.REMOVING if ending else state
        self._notify(ticket, state)
        if ending:
            self._notify(ticket, RuleState.REMOVING)
            self._delete(ticket)

    def _delete(self, ticket: Ticket) -> None:
        try:
            self.transport.delete(ticket.rule)
        except RuleRejected as e:
            self.counts["delete_failed"] += 1
            log.warning("hardware rule delete failed: %s", e)
            with self._cond:
                self._finish(ticket, RuleState.FAILED, str(e))
            self._notify(ticket, RuleState.FAILED)
        else:
            self.counts["removed"] += 1
            with self._cond:
                self._finish(ticket, RuleState.REMOVED, "")
            self._notify(ticket, RuleState.REMOVED)

    def _failed(self, ticket: Ticket, reason: str) -> None:
        self.counts["failed"] += 1
        with self._cond:
            self._finish(ticket, RuleState.FAILED, reason)
        self._notify(ticket, RuleState.FAILED)

    # --- helpers ------------------------------------------------------------------------------
    def _finish(self, ticket: Ticket, state: RuleState, reason: str) -> None:
        """Final state (under the lock). A flow that ended is forgotten; a failed one is kept
        until end() so its state can be read."""
        ticket.state, ticket.reason = state, reason
        ended = ticket.ending or state in (RuleState.CANCELLED, RuleState.REMOVED)
        if ended and self._tickets.get(ticket.rule.flow) is ticket:
            del self._tickets[ticket.rule.flow]
        ticket.done.set()

    def _next_handle(self) -> int:
        return (next(self._handles) - 1) % MAX_HANDLE + 1

    def _notify(self, ticket: Ticket, state: RuleState) -> None:
        """Tell the listener (outside the lock: it may call back into the queue)."""
        if self.listener is not None:
            try:
                self.listener(ticket.rule.flow, state, ticket.reason)
            except Exception:  # a listener bug must not stop the worker
                log.exception("hardware rule listener failed")
