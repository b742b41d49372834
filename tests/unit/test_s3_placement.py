"""Rendezvous placement: stable, balanced, and minimal movement when nodes change."""

from __future__ import annotations

from collections import Counter

import pytest

from xo.rgw.placement import rank

NODES = ["n0", "n1", "n2", "n3"]
KEYS = [f"obj/{i}" for i in range(4000)]


def test_rank_is_a_stable_permutation() -> None:
    r = rank(NODES, "b", "k")
    assert sorted(r) == sorted(NODES)
    assert rank(list(reversed(NODES)), "b", "k") == r  # independent of configuration order
    assert rank(NODES, "b", "k2") != r or rank(NODES, "b2", "k") != r


def test_balanced_primaries() -> None:
    counts = Counter(rank(NODES, "b", k)[0] for k in KEYS)
    expected = len(KEYS) / len(NODES)
    assert all(abs(c - expected) < 0.15 * expected for c in counts.values()), counts


def test_removing_a_node_moves_only_its_objects() -> None:
    before = {k: rank(NODES, "b", k)[:2] for k in KEYS}
    after = {k: rank(NODES[:-1], "b", k)[:2] for k in KEYS}
    for k in KEYS:
        survivors = [n for n in before[k] if n != "n3"]
        assert after[k][: len(survivors)] == survivors  # remaining replicas keep their rank
    moved = sum(before[k] != after[k] for k in KEYS)
    assert moved < 0.6 * len(KEYS)  # ~2/4 of the keys had n3 among their two replicas


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        rank(["a", "a"], "b", "k")
