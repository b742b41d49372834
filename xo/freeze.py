"""Freeze a connection's inbound packets while its TCP state is captured or restored.

Why: a socket in TCP_REPAIR mode still processes input. A data segment or ACK arriving
between the reads of xo.tcp.capture() moves rcv_nxt/snd_una under the snapshot, and once the
socket is closed a segment finding no socket draws an RST that kills the connection. So the
owner drops the flow's inbound packets (freeze) before repair-on and keeps dropping them
until something else owns the 4-tuple (a restored socket, or a redirect to another host),
then thaws. Dropped segments are not lost: the peer retransmits them.

`Freezer` is the pluggable hook: the datapath's eBPF map implements it in microseconds;
`NftFreezer` here is the portable fallback (and what the tests use), an nftables set of
4-tuples matched in the prerouting hook, driven in-process through libnftables.

    with NftFreezer() as freezer:                # guards the current network namespace
        flow = inbound_flow(sock)
        freezer.freeze(flow)
        state = xo.tcp.capture(sock)
        ...
        freezer.thaw(flow)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
from types import TracebackType
from typing import Protocol

from xo.flow import FlowKey
from xo.tcp.capture import sockaddr_endpoint

NFT_CTX_DEFAULT = 0
LIBNFTABLES = "libnftables.so.1"
DEFAULT_TABLE = "xo_freeze"
# Before conntrack (-200) and any address rewrite (dstnat, -100): a frozen packet is dropped
# as it arrived.
HOOK_PRIORITY = -300


class FreezeError(RuntimeError):
    """Freezing or thawing a flow failed (message carries the nftables error)."""


class Freezer(Protocol):
    """Stop and restart delivery of a flow's inbound packets (peer -> local socket)."""

    def freeze(self, flow: FlowKey) -> None:
        """Drop the flow's inbound packets from now on."""

    def thaw(self, flow: FlowKey) -> None:
        """Deliver the flow's inbound packets again."""


def inbound_flow(sock: socket.socket) -> FlowKey:
    """The flow key of a connected socket's inbound packets: peer -> local."""
    peer, local = sock.getpeername(), sock.getsockname()
    return FlowKey(client=sockaddr_endpoint(peer), vip=sockaddr_endpoint(local))


def _element(flow: FlowKey) -> tuple[str, str]:
    """(set name, element) of one 4-tuple, as nftables syntax."""
    c, v = flow.client, flow.vip
    name = "flows4" if flow.family == 4 else "flows6"
    return name, f"{c.ip} . {c.port} . {v.ip} . {v.port}"


class _Nft:
    """The few libnftables calls we need; one context = one netlink socket = one netns."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("nftables") or LIBNFTABLES
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise FreezeError(f"libnftables not found ({e}); install nftables") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not self._ctx:
            raise FreezeError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, commands: str) -> None:
        if not self._ctx:
            raise FreezeError("nftables context already closed")
        if self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode()) != 0:
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode().strip()
            raise FreezeError(f"nftables refused {commands.strip()!r}: {err}")

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


class NftFreezer:
    """Freezer on an nftables table of its own in the network namespace it was created in."""

    def __init__(self, table: str = DEFAULT_TABLE) -> None:
        if not table.replace("_", "").isalnum():
            raise FreezeError(f"table name must be alphanumeric/underscore, got {table!r}")
        self.table = table
        self._nft = _Nft()
        t = f"inet {table}"
        try:
            self._nft.run(
                # add+delete first: a table left by a killed process is replaced, not merged.
                f"add table {t}\ndelete table {t}\n"
                f"table {t} {{\n"
                "  set flows4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; }\n"
                "  set flows6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; }\n"
                "  chain prerouting {\n"
                f"    type filter hook prerouting priority {HOOK_PRIORITY}; policy accept;\n"
                "    ip saddr . tcp sport . ip daddr . tcp dport @flows4 drop\n"
                "    ip6 saddr . tcp sport . ip6 daddr . tcp dport @flows6 drop\n"
                "  }\n"
                "}\n"
            )
        except FreezeError:
            self._nft.close()
            raise

    def freeze(self, flow: FlowKey) -> None:
        name, element = _element(flow)
        self._nft.run(f"add element inet {self.table} {name} {{ {element} }}")

    def thaw(self, flow: FlowKey) -> None:
        name, element = _element(flow)
        self._nft.run(f"delete element inet {self.table} {name} {{ {element} }}")

    def close(self) -> None:
        """Remove the table (thawing every flow still frozen)."""
        try:
            self._nft.run(f"delete table inet {self.table}")
        finally:
            self._nft.close()

    def __enter__(self) -> NftFreezer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["FreezeError", "Freezer", "NftFreezer", "inbound_flow"]
