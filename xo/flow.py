"""Addresses and flow keys shared by the datapath, the agent and the protocol.

A flow is named from the frontend's point of view: the client's address and the VIP:port it
dialled. The same key selects the frontend's eBPF/flower redirect and travels in the protocol.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from xo.v1 import offload_pb2

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FlowError(ValueError):
    """A flow, address or port that cannot be valid (bad length, port 0, mixed families)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise FlowError(f"not an IP address: {self.ip!r}")
        if not 0 < self.port < 65536:
            raise FlowError(f"port out of range 1..65535: {self.port}")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse 'ADDR:PORT' or '[V6ADDR]:PORT'."""
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise FlowError(f"expected ADDR:PORT, got {text!r}")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError as e:
            raise FlowError(f"bad address in {text!r}: {e}") from None
        return cls(ip, int(port))

    @property
    def family(self) -> int:
        return self.ip.version

    def sockaddr(self) -> tuple[str, int]:
        return (str(self.ip), self.port)

    def to_proto(self) -> offload_pb2.Endpoint:
        return offload_pb2.Endpoint(addr=self.ip.packed, port=self.port)

    @classmethod
    def from_proto(cls, msg: offload_pb2.Endpoint) -> Endpoint:
        if len(msg.addr) not in (4, 16):
            raise FlowError(f"address must be 4 or 16 bytes, got {len(msg.addr)}")
        return cls(ipaddress.ip_address(msg.addr), msg.port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class FlowKey:
    """client -> vip, as the frontend sees the client's packets arrive."""

    client: Endpoint
    vip: Endpoint

    def __post_init__(self) -> None:
        if self.client.family != self.vip.family:
            raise FlowError(f"mixed address families in flow {self.client} -> {self.vip}")

    @property
    def family(self) -> int:
        return self.client.family

    def to_proto(self) -> offload_pb2.Flow:
        return offload_pb2.Flow(client=self.client.to_proto(), vip=self.vip.to_proto())

    @classmethod
    def from_proto(cls, msg: offload_pb2.Flow) -> FlowKey:
        return cls(Endpoint.from_proto(msg.client), Endpoint.from_proto(msg.vip))

    def __str__(self) -> str:
        return f"{self.client} -> {self.vip}"
