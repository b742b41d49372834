"""act_csum as a pyroute2 tc action plugin (tc-csum(8), tc_act/tc_csum.h).

    {"kind": "csum", "update": ["iph", "tcp"], "action": "pipe"}

Recomputes the named checksums after a pedit rewrote addresses or ports (pedit itself fixes
nothing). For IPv6 only the transport checksum exists: update=["tcp"].
"""

from __future__ import annotations

from typing import Any

from pyroute2.netlink import NLA_F_NESTED, nla
from pyroute2.netlink.rtnl.tcmsg.common import tc_actions

from xo.tc.errors import TcError

# enum TCA_CSUM_UPDATE_FLAG_* (tc_csum.h); tc accepts "iph" and "ip4h" for the IPv4 header
UPDATE_FLAGS = {
    "iph": 1,
    "ip4h": 1,
    "icmp": 2,
    "igmp": 4,
    "tcp": 8,
    "udp": 16,
    "udplite": 32,
    "sctp": 64,
}


def update_flags(targets: list[str]) -> int:
    """The TCA_CSUM_UPDATE_FLAG_* bits for target names like ["iph", "tcp"]."""
    unknown = [t for t in targets if t not in UPDATE_FLAGS]
    if unknown or not targets:
        raise TcError(f"csum: targets must be among {sorted(UPDATE_FLAGS)}, got {targets!r}")
    flags = 0
    for t in targets:
        flags |= UPDATE_FLAGS[t]
    return flags


def get_parameters(kwarg: dict[str, Any]) -> dict[str, list[list[Any]]]:
    control = kwarg.get("action", "ok")
    if control not in tc_actions:
        raise TcError(f"csum: unknown control {control!r}")
    parms = {"action": tc_actions[control], "update_flags": update_flags(kwarg.get("update", []))}
    return {"attrs": [["TCA_CSUM_PARMS", parms]]}


class options(nla):
    nla_flags = NLA_F_NESTED
    nla_map = (
        ("TCA_CSUM_UNSPEC", "none"),
        ("TCA_CSUM_PARMS", "tca_csum_parms"),
        ("TCA_CSUM_TM", "none"),
        ("TCA_CSUM_PAD", "none"),
    )

    class tca_csum_parms(nla):
        fields = (
            ("index", "I"),
            ("capab", "I"),
            ("action", "i"),
            ("refcnt", "i"),
            ("bindcnt", "i"),
            ("update_flags", "I"),
        )
