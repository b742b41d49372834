"""Rendezvous (highest random weight) placement of objects on storage nodes.

Every gateway ranks the nodes for a bucket/key by a keyed hash and stores the replicas on the
first ones. The rank depends only on the node names and the key, so adding or removing a node
moves only the objects whose top nodes change (about 1/N of them), with no shared map to keep.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def score(node: str, bucket: str, key: str) -> int:
    """The node's weight for one object: 64 bits of SHA-256 over node, bucket and key."""
    digest = hashlib.sha256(f"{node}\0{bucket}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rank(nodes: Sequence[str], bucket: str, key: str) -> list[str]:
    """All node names, best first (ties, practically impossible, broken by name)."""
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"node names must be unique: {list(nodes)}")
    return sorted(nodes, key=lambda n: (-score(n, bucket, key), n))
