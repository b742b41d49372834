"""The handoff state machine: the protocol's happy paths, every failure path, and refusal of
every event not allowed in a state (exhaustively)."""

from __future__ import annotations

import pytest

from xo.agent.machine import TRANSITIONS, Event, Machine, State, StateError

E = Event


def run(m: Machine, *events: Event) -> State:
    for e in events:
        m.advance(e)
    return m.state


def test_owner_offload_and_return() -> None:
    m = Machine.owner()
    assert run(m, E.BLOCK, E.CAPTURE, E.SEND, E.ACCEPTED, E.READY) == State.OFFLOADED
    assert run(m, E.END, E.RESTORED) == State.LOCAL
    assert m.done
    assert m.history[:3] == [State.LOCAL, State.BLOCKED, State.CAPTURED]


@pytest.mark.parametrize("upto", [[E.BLOCK], [E.BLOCK, E.CAPTURE], [E.BLOCK, E.CAPTURE, E.SEND]])
def test_owner_failure_before_acceptance_keeps_the_flow_local(upto: list[Event]) -> None:
    m = Machine.owner()
    assert run(m, *upto, E.FAILED) == State.LOCAL


@pytest.mark.parametrize("end", [E.CLOSED, E.LOST])
def test_owner_flow_closed_or_lost_while_offloaded(end: Event) -> None:
    m = Machine.owner()
    assert run(m, E.BLOCK, E.CAPTURE, E.SEND, E.ACCEPTED, E.READY, end) == State.CLOSED


def test_target_serve_and_give_back_and_failed_give_back() -> None:
    m = Machine.target()
    assert run(m, E.RESTORED, E.READY, E.BLOCK, E.FAILED) == State.SERVING
    assert run(m, E.BLOCK, E.ENDED) == State.CLOSED


def test_target_without_ready_expires() -> None:
    assert run(Machine.target(), E.RESTORED, E.EXPIRED) == State.CLOSED


def test_ready_before_restore_is_refused() -> None:
    m = Machine.target()
    with pytest.raises(StateError, match="'ready' not allowed in state 'received'"):
        m.advance(E.READY)
    assert m.state == State.RECEIVED and m.history == []


@pytest.mark.parametrize("state", list(State))
def test_every_unlisted_event_is_refused(state: State) -> None:
    for event in Event:
        m = Machine(state)
        if (state, event) in TRANSITIONS:
            assert m.advance(event) == TRANSITIONS[(state, event)]
        else:
            with pytest.raises(StateError):
                m.advance(event)
            assert m.state == state


def test_closed_is_terminal() -> None:
    assert not any(s == State.CLOSED for s, _ in TRANSITIONS)
