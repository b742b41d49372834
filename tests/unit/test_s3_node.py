"""The node's side of an offloaded GET, on a real socket pair: serve, then give back.

The give-back callback stands in for the agent's GiveBack call (it only records what the node
hands back); the end-to-end path through the agents is tests/net/test_s3_lab.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from xo.rgw.http import response_head
from xo.rgw.node import ServeState, StorageNode
from xo.rgw.store import Store


def node_with_object(tmp_path: Path, data: bytes) -> tuple[StorageNode, str]:
    store = Store(tmp_path)
    store.create_bucket("bkt")
    etag = store.put("bkt", "obj", [data], "", {}).etag
    return StorageNode(store, ("127.0.0.1", 0)), etag


def serve(node: StorageNode, state: ServeState, preread: bytes) -> tuple[bytes, list]:
    client, server = socket.socketpair()
    returned: list[tuple[socket.socket, bytes, dict]] = []
    with client, server:
        node.serve_handed_in(server, preread, state.to_bytes(),
                             lambda s, rest, st: returned.append((s, rest, json.loads(st))))
        server.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(1 << 20):
            received += chunk
    return received, returned


def test_serves_range_and_gives_back_preread(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096
    node, etag = node_with_object(tmp_path, data)
    head = response_head(206, [("Content-Length", "1000")])
    state = ServeState("bkt", "obj", etag, 5000, 1000, head)
    received, returned = serve(node, state, b"GET /next HTTP/1.1\r\n")
    assert received == head + data[5000:6000]
    ((_, rest, st),) = returned
    assert rest == b"GET /next HTTP/1.1\r\n"  # the pipelined request goes back to the gateway
    assert st == {"served": True}
    node.close()


def test_changed_object_is_not_served(tmp_path: Path) -> None:
    node, _ = node_with_object(tmp_path, b"new version")
    state = ServeState("bkt", "obj", "0" * 32, 0, 11, response_head(200, []))
    received, returned = serve(node, state, b"")
    assert received == b""  # nothing written: the gateway answers from the returned socket
    ((_, rest, st),) = returned
    assert rest == b"" and st["served"] is False and "changed" in st["reason"]
    node.close()


def test_garbage_state_is_not_served(tmp_path: Path) -> None:
    node, _ = node_with_object(tmp_path, b"x")
    client, server = socket.socketpair()
    returned: list[dict] = []
    with client, server:
        node.serve_handed_in(server, b"", b"not json",
                             lambda s, rest, st: returned.append(json.loads(st)))
    assert returned[0]["served"] is False and "bad serve state" in returned[0]["reason"]
    node.close()
