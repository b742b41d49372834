"""The handoff state machine of one offloaded flow, on the owner and on the target.

Pure bookkeeping (no I/O), so the order of ARCHITECTURE.md's protocol is enforced in one place
and tested without root: an agent asks `advance(event)` before acting, and an event that is
out of order (a Ready for a flow never accepted, an End for a flow still being handed off) is
refused with a StateError instead of corrupting the datapath.

Owner (F):  LOCAL -block-> BLOCKED -capture-> CAPTURED -send-> HANDOFF_SENT
              -accepted-> REDIRECTED -ready-> OFFLOADED -end-> RETURNING -restored-> LOCAL
            HANDOFF_SENT -failed-> LOCAL (repair off, unblock: the app keeps its socket)
            OFFLOADED -closed-> CLOSED (client closed or reset while offloaded)
            OFFLOADED -lost-> CLOSED (the target died holding the flow)
Target (B): RECEIVED -restored-> RESTORED -ready-> SERVING -block-> GIVING_BACK
              -ended-> CLOSED;   GIVING_BACK -failed-> SERVING (the app keeps it)
            RESTORED -expired-> CLOSED (Ready never came: the owner kept the flow)
            SERVING -closed-> CLOSED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class State(enum.Enum):
    LOCAL = "local"
    BLOCKED = "blocked"
    CAPTURED = "captured"
    HANDOFF_SENT = "handoff-sent"
    REDIRECTED = "redirected"
    OFFLOADED = "offloaded"
    RETURNING = "returning"
    RECEIVED = "received"
    RESTORED = "restored"
    SERVING = "serving"
    GIVING_BACK = "giving-back"
    CLOSED = "closed"


class Event(enum.Enum):
    BLOCK = "block"
    CAPTURE = "capture"
    SEND = "send"
    ACCEPTED = "accepted"
    FAILED = "failed"
    READY = "ready"
    END = "end"
    RESTORED = "restored"
    CLOSED = "closed"
    LOST = "lost"
    ENDED = "ended"
    EXPIRED = "expired"


S, E = State, Event
TRANSITIONS: dict[tuple[State, Event], State] = {
    # owner
    (S.LOCAL, E.BLOCK): S.BLOCKED,
    (S.BLOCKED, E.CAPTURE): S.CAPTURED,
    (S.BLOCKED, E.FAILED): S.LOCAL,
    (S.CAPTURED, E.SEND): S.HANDOFF_SENT,
    (S.CAPTURED, E.FAILED): S.LOCAL,
    (S.HANDOFF_SENT, E.ACCEPTED): S.REDIRECTED,
    (S.HANDOFF_SENT, E.FAILED): S.LOCAL,
    (S.REDIRECTED, E.READY): S.OFFLOADED,
    # a Ready that fails leaves the redirect in place: the target serves or ends the flow
    (S.REDIRECTED, E.FAILED): S.OFFLOADED,
    (S.REDIRECTED, E.END): S.RETURNING,
    (S.OFFLOADED, E.END): S.RETURNING,
    (S.RETURNING, E.RESTORED): S.LOCAL,
    (S.REDIRECTED, E.CLOSED): S.CLOSED,
    (S.OFFLOADED, E.CLOSED): S.CLOSED,
    (S.RETURNING, E.CLOSED): S.CLOSED,
    (S.REDIRECTED, E.LOST): S.CLOSED,
    (S.OFFLOADED, E.LOST): S.CLOSED,
    # target
    (S.RECEIVED, E.RESTORED): S.RESTORED,
    (S.RECEIVED, E.FAILED): S.CLOSED,
    (S.RESTORED, E.READY): S.SERVING,
    (S.RESTORED, E.EXPIRED): S.CLOSED,
    (S.SERVING, E.BLOCK): S.GIVING_BACK,
    (S.GIVING_BACK, E.ENDED): S.CLOSED,
    (S.GIVING_BACK, E.FAILED): S.SERVING,
    (S.SERVING, E.CLOSED): S.CLOSED,
    (S.GIVING_BACK, E.CLOSED): S.CLOSED,
}


class StateError(RuntimeError):
    """An event that is not allowed in the flow's current state."""


@dataclass
class Machine:
    """One flow's state and its history (for `xo status` and failure reports)."""

    state: State
    history: list[State] = field(default_factory=list)

    @classmethod
    def owner(cls) -> Machine:
        return cls(State.LOCAL)

    @classmethod
    def target(cls) -> Machine:
        return cls(State.RECEIVED)

    def can(self, event: Event) -> bool:
        return (self.state, event) in TRANSITIONS

    def advance(self, event: Event) -> State:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise StateError(f"event {event.value!r} not allowed in state {self.state.value!r}")
        self.history.append(self.state)
        self.state = nxt
        return nxt

    @property
    def done(self) -> bool:
        return self.state in (State.CLOSED, State.LOCAL) and bool(self.history)
