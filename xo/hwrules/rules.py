"""The eBPF REDIRECT and BLOCK of a flow, expressed as one TC flower filter.

Why the same semantics: the flower rule replaces the eBPF map entry for the flow once the NIC
holds it, so it must do exactly what bpf/xo_tc.c does on ingress: match the client -> VIP
4-tuple; REDIRECT rewrites the destination MAC, IP and port and the source MAC, fixes the
checksums (IPv4 header + TCP; TCP only for IPv6) and sends the packet out `ifindex` (egress,
like bpf_redirect(ifindex, 0)); BLOCK drops it. SNAT, on the backend's egress, rewrites the
source IP and port of the replies back to the VIP:port (csum, then the packet goes on).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from pyroute2 import protocols

from xo.datapath.layout import Redirect, parse_mac
from xo.flow import Endpoint, FlowKey
from xo.tc import EGRESS, INGRESS

# One flower instance per (prio, protocol) on a hook: IPv4 and IPv6 rules need their own prio.
PRIO = {4: 10, 6: 11}
ETH_TYPE = {4: protocols.ETH_P_IP, 6: protocols.ETH_P_IPV6}
PEDIT_IP = {4: "ip", 6: "ip6"}
CSUM_TARGETS = {4: ["iph", "tcp"], 6: ["tcp"]}


class Placement(enum.Enum):
    """Where the rule may live: both (kernel decides), hardware only, software only."""

    ANY = "any"
    HW_ONLY = "skip_sw"
    SW_ONLY = "skip_hw"


@dataclass(frozen=True, slots=True)
class FlowerRule:
    """One flower filter: where it hangs (ifindex, parent, prio, handle) and what it does.

    `flow` names the owner (the queue keys rules by it); src -> dst is the 4-tuple matched.
    """

    flow: FlowKey
    src: Endpoint
    dst: Endpoint
    ifindex: int
    prio: int
    protocol: int
    actions: tuple[dict[str, Any], ...]
    placement: Placement = Placement.ANY
    handle: int = 0  # assigned by the queue before the rule is issued
    parent: int = INGRESS
    description: str = field(default="", compare=False)

    def with_handle(self, handle: int) -> FlowerRule:
        return replace(self, handle=handle)

    def match(self) -> dict[str, Any]:
        """The flower keys: the matched TCP 4-tuple."""
        return {
            "ip_proto": "tcp",
            "src_ip": str(self.src.ip),
            "dst_ip": str(self.dst.ip),
            "src_port": self.src.port,
            "dst_port": self.dst.port,
        }

    def locator(self) -> dict[str, Any]:
        """What names the filter for a delete: hook, prio, protocol, handle."""
        return {"index": self.ifindex, "parent": self.parent, "prio": self.prio,
                "protocol": self.protocol, "handle": self.handle}

    def tc_args(self) -> dict[str, Any]:
        """Keyword arguments of `IPRoute.tc("add-filter", "flower", **args)` (xo.tc plugins)."""
        return {
            **self.locator(),
            **self.match(),
            "skip_sw": self.placement is Placement.HW_ONLY,
            "skip_hw": self.placement is Placement.SW_ONLY,
            "action": [dict(a) for a in self.actions],
        }


def _hook(flow: FlowKey, ifindex: int) -> tuple[FlowKey, int]:
    if not isinstance(flow, FlowKey):
        raise TypeError(f"expected xo.flow.FlowKey, got {type(flow).__name__}")
    if not isinstance(ifindex, int) or ifindex <= 0:
        raise ValueError(f"bad ifindex {ifindex!r}")
    return flow, ifindex


def redirect_rule(flow: FlowKey, target: Redirect, ifindex: int, mac: str,
                  placement: Placement = Placement.ANY) -> FlowerRule:
    """The flower twin of Datapath.redirect(flow, target) on the interface (ifindex, mac).

    target.src_mac and target.ifindex default to that interface, as in the eBPF datapath.
    """
    flow, ifindex = _hook(flow, ifindex)
    if not isinstance(target, Redirect):
        raise TypeError(f"expected xo.datapath.Redirect, got {type(target).__name__}")
    if target.to.family != flow.family:
        raise ValueError(f"redirect of IPv{flow.family} flow {flow} to {target.to}")
    parse_mac(mac)
    family = flow.family
    out = target.ifindex or ifindex
    actions = (
        {"kind": "pedit", "action": "pipe", "keys": [
            ("eth", "dst", target.mac),
            ("eth", "src", target.src_mac or mac),
            (PEDIT_IP[family], "dst", str(target.to.ip)),
            ("tcp", "dport", target.to.port),
        ]},
        {"kind": "csum", "action": "pipe", "update": CSUM_TARGETS[family]},
        {"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": out},
    )
    return FlowerRule(flow, flow.client, flow.vip, ifindex, PRIO[family], ETH_TYPE[family],
                      actions, placement,
                      description=f"redirect {flow} -> {target.to} via ifindex {out}")


def block_rule(flow: FlowKey, ifindex: int,
               placement: Placement = Placement.ANY) -> FlowerRule:
    """The flower twin of Datapath.block(flow): drop the client's packets."""
    flow, ifindex = _hook(flow, ifindex)
    actions = ({"kind": "gact", "action": "drop"},)
    return FlowerRule(flow, flow.client, flow.vip, ifindex, PRIO[flow.family],
                      ETH_TYPE[flow.family], actions, placement, description=f"block {flow}")


def snat_rule(flow: FlowKey, as_endpoint: Endpoint, ifindex: int,
              placement: Placement = Placement.ANY) -> FlowerRule:
    """The flower twin of Datapath.snat(flow, as_endpoint) on the backend's egress.

    flow is client -> local (the restored socket's address); packets local -> client leave
    with source as_endpoint (the VIP:port the client dialled).
    """
    flow, ifindex = _hook(flow, ifindex)
    if not isinstance(as_endpoint, Endpoint) or as_endpoint.family != flow.family:
        raise ValueError(f"source rewrite of IPv{flow.family} flow {flow} to {as_endpoint!r}")
    family = flow.family
    actions = (
        {"kind": "pedit", "action": "pipe", "keys": [
            (PEDIT_IP[family], "src", str(as_endpoint.ip)),
            ("tcp", "sport", as_endpoint.port),
        ]},
        {"kind": "csum", "action": "ok", "update": CSUM_TARGETS[family]},
    )
    return FlowerRule(flow, flow.vip, flow.client, ifindex, PRIO[family], ETH_TYPE[family],
                      actions, placement, parent=EGRESS,
                      description=f"snat {flow.vip} -> {as_endpoint} for {flow.client}")
