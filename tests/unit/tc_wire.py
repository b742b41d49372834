"""Recorded `tc` netlink bytes (tests/unit/fixtures/tc/) and pyroute2's encoding of a request.

The fixtures were recorded once in the kernel tier by scripts/record-tc-fixtures.py: iproute2
6.1's own requests for XO's flower rules and the kernel's dump replies (veth: software only;
patched netdevsim: in hardware).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from pyroute2.iproute.linux import get_arguments_processor
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.rtnl import RTM_DELTFILTER, RTM_NEWTFILTER
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from xo import tc

FIXTURES = Path(__file__).parent / "fixtures" / "tc"
NLMSGHDR = struct.Struct("=IHHII")
COMMANDS = {
    "add-filter": (RTM_NEWTFILTER, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL),
    "del-filter": (RTM_DELTFILTER, NLM_F_REQUEST | NLM_F_ACK),
}

tc.register()


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def raw(name: str, part: str) -> bytes:
    """'request', 'dump' or 'delete' bytes of one recorded exchange."""
    return bytes.fromhex(fixture(name)[part])


def ifindex_of(message: bytes) -> int:
    """tcm_ifindex of a recorded message (the VM's device numbering)."""
    return int(struct.unpack_from("=i", message, NLMSGHDR.size + 4)[0])


def encode(command: str, kind: str, **kwarg: Any) -> bytes:
    """The request pyroute2's IPRoute.tc(command, kind, **kwarg) puts on the socket."""
    msg_type, flags = COMMANDS[command]
    processor = get_arguments_processor("tc", command, {"kind": kind, **kwarg})
    msg = tcmsg()
    msg["header"]["type"], msg["header"]["flags"] = msg_type, flags
    for name, *_ in msg.fields:
        msg[name] = processor.get_value(name, default=0, mode="field")
    for key, value in processor.items():
        nla = tcmsg.name2nla(key)
        if msg.valid_nla(nla) and value is not None:
            msg["attrs"].append([nla, value])
    msg.encode()
    return bytes(msg.data)


def same_request(ours: bytes, theirs: bytes) -> bool:
    """Equal but for the sequence number and port id (per-socket, per-request)."""
    ours_hdr, theirs_hdr = NLMSGHDR.unpack_from(ours), NLMSGHDR.unpack_from(theirs)
    return ours_hdr[:3] == theirs_hdr[:3] and ours[NLMSGHDR.size:] == theirs[NLMSGHDR.size:]


def decode(message: bytes) -> tcmsg:
    msg = tcmsg(message)
    msg.decode()
    return msg
