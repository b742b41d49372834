"""act_pedit with extended keys as a pyroute2 tc action plugin (tc-pedit(8), tc_pedit.h).

    {"kind": "pedit", "keys": [("eth", "dst", "02:00:00:00:00:21"), ("ip", "dst", "198.18.0.21"),
                               ("ip6", "dst", "fd00::21"), ("tcp", "dport", 61000)],
     "action": "pipe"}

Each (header, field, value) is what `tc ... pedit ex munge HEADER FIELD set VALUE` sets. A
field becomes one key per 32-bit word it touches, relative to its header (extended keys), with
the same word split, masks and order as iproute2, so requests are byte-identical to tc's.
The kernel applies a key as `word = (word & mask) ^ val` on the packet's bytes; mask and val
are built here in byte order and packed in host order, exactly as the kernel reads them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLA_F_NESTED, nla
from pyroute2.netlink.rtnl.tcmsg.common import tc_actions

from xo.tc.errors import TcError

# enum pedit_header_type / pedit_cmd (tc_pedit.h)
HTYPE_NETWORK, HTYPE_ETH, HTYPE_IP4, HTYPE_IP6, HTYPE_TCP, HTYPE_UDP = range(6)
CMD_SET = 0
HEADER_TYPES = {"eth": HTYPE_ETH, "ip": HTYPE_IP4, "ip6": HTYPE_IP6, "tcp": HTYPE_TCP}
HEADER_NAMES = {v: k for k, v in HEADER_TYPES.items()}

WORD = 4
KEY = struct.Struct("=IIIIII")  # struct tc_pedit_key: mask, val, off, at, offmask, shift
SEL = struct.Struct("=IIiiiBBH")  # struct tc_pedit_sel: tc_gen, nkeys, flags, pad
MAX_KEYS = 0xFF  # nkeys is an unsigned char
MAC_LEN = 6
NLA_HEADER = 4  # struct nlattr: len, type


@dataclass(frozen=True, slots=True)
class Field:
    """Where a munge-able field sits in its header, and how its value is written."""

    offset: int
    length: int
    kind: str  # "mac", "ip4", "ip6", "port"


FIELDS: dict[tuple[str, str], Field] = {
    ("eth", "dst"): Field(0, MAC_LEN, "mac"),
    ("eth", "src"): Field(MAC_LEN, MAC_LEN, "mac"),
    ("ip", "src"): Field(12, 4, "ip4"),
    ("ip", "dst"): Field(16, 4, "ip4"),
    ("ip6", "src"): Field(8, 16, "ip6"),
    ("ip6", "dst"): Field(24, 16, "ip6"),
    ("tcp", "sport"): Field(0, 2, "port"),
    ("tcp", "dport"): Field(2, 2, "port"),
}


@dataclass(frozen=True, slots=True)
class Key:
    """One decoded pedit key: keep `mask` bits of the word at header+off, xor in `val`."""

    htype: str
    off: int
    mask: bytes  # 4 bytes in packet order; 0xff = keep that byte
    val: bytes  # 4 bytes in packet order


def _value_bytes(header: str, name: str, field: Field, value: Any) -> bytes:
    try:
        if field.kind == "mac":
            raw = bytes(int(b, 16) for b in str(value).split(":"))
        elif field.kind == "ip4":
            raw = ipaddress.IPv4Address(value).packed
        elif field.kind == "ip6":
            raw = ipaddress.IPv6Address(value).packed
        else:
            raw = int(value).to_bytes(field.length, "big")
    except (ValueError, OverflowError, TypeError) as e:
        raise TcError(f"pedit: bad value {value!r} for {header} {name}: {e}") from None
    if len(raw) != field.length:
        raise TcError(f"pedit: {header} {name} takes {field.length} bytes, got {value!r}")
    return raw


def munge_keys(header: str, name: str, value: Any) -> list[Key]:
    """The keys that set `header name` to value: one per 32-bit word the field touches."""
    field = FIELDS.get((header, name))
    if field is None:
        raise TcError(f"pedit: cannot munge {header} {name}; known: {sorted(FIELDS)}")
    raw = _value_bytes(header, name, field, value)
    keys = []
    end = field.offset + field.length
    word = field.offset - field.offset % WORD
    while word < end:
        mask, val = bytearray(b"\xff" * WORD), bytearray(WORD)
        for i in range(max(word, field.offset), min(word + WORD, end)):
            mask[i - word] = 0
            val[i - word] = raw[i - field.offset]
        keys.append(Key(header, word, bytes(mask), bytes(val)))
        word += WORD
    return keys


def get_parameters(kwarg: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """TCA_ACT_OPTIONS of a pedit action: TCA_PEDIT_PARMS_EX + TCA_PEDIT_KEYS_EX."""
    munges = kwarg.get("keys") or []
    if not munges:
        raise TcError("pedit: no keys to munge")
    keys = [k for m in munges for k in munge_keys(*m)]
    if len(keys) > MAX_KEYS:
        raise TcError(f"pedit: {len(keys)} keys, the kernel takes at most {MAX_KEYS}")
    control = kwarg.get("action", "ok")
    if control not in tc_actions:
        raise TcError(f"pedit: unknown control {control!r}")
    packed = b"".join(
        KEY.pack(struct.unpack("=I", k.mask)[0], struct.unpack("=I", k.val)[0], k.off, 0, 0, 0)
        for k in keys
    )
    parms = {"action": tc_actions[control], "nkeys": len(keys), "keys": packed}
    keys_ex = [{"attrs": [["TCA_PEDIT_KEY_EX_HTYPE", HEADER_TYPES[k.htype]],
                          ["TCA_PEDIT_KEY_EX_CMD", CMD_SET]]} for k in keys]
    return {"attrs": [["TCA_PEDIT_PARMS_EX", parms], ["TCA_PEDIT_KEYS_EX", {"attrs": [
        ["TCA_PEDIT_KEY_EX", k] for k in keys_ex]}]]}


class options(nla):
    nla_flags = NLA_F_NESTED
    nla_map = (
        ("TCA_PEDIT_UNSPEC", "none"),
        ("TCA_PEDIT_TM", "none"),
        ("TCA_PEDIT_PARMS", "tca_pedit_sel"),
        ("TCA_PEDIT_PAD", "none"),
        ("TCA_PEDIT_PARMS_EX", "tca_pedit_sel"),
        ("TCA_PEDIT_KEYS_EX", "tca_pedit_keys_ex"),
    )

    class tca_pedit_sel(nla):
        """struct tc_pedit_sel followed by nkeys struct tc_pedit_key (kept as raw bytes)."""

        fields = (
            ("index", "I"),
            ("capab", "I"),
            ("action", "i"),
            ("refcnt", "i"),
            ("bindcnt", "i"),
            ("nkeys", "B"),
            ("flags", "B"),
            ("pad", "H"),
            ("keys", "s"),
        )

        def decode(self) -> None:
            # pyroute2 reads an "s" field as one byte on decode: take the whole key array.
            nla.decode(self)
            start = self.offset + NLA_HEADER + SEL.size
            self["keys"] = bytes(self.data[start:self.offset + self.length])

    class tca_pedit_keys_ex(nla):
        nla_flags = NLA_F_NESTED
        nla_map = ((6, "TCA_PEDIT_KEY_EX", "tca_pedit_key_ex"),)

        class tca_pedit_key_ex(nla):
            nla_flags = NLA_F_NESTED
            nla_map = (
                (1, "TCA_PEDIT_KEY_EX_HTYPE", "uint16"),
                (2, "TCA_PEDIT_KEY_EX_CMD", "uint16"),
            )


def decode_keys(opts: Any) -> list[Key]:
    """The keys of a decoded pedit action (request or dump), with their header types."""
    sel = opts.get_attr("TCA_PEDIT_PARMS_EX") or opts.get_attr("TCA_PEDIT_PARMS")
    if sel is None:
        raise TcError("pedit: no TCA_PEDIT_PARMS(_EX) in the action")
    raw = sel["keys"] or b""
    raw = raw.encode("latin-1") if isinstance(raw, str) else raw
    keys_ex = opts.get_attr("TCA_PEDIT_KEYS_EX")
    htypes = ([k.get_attr("TCA_PEDIT_KEY_EX_HTYPE") for k in keys_ex.get_attrs("TCA_PEDIT_KEY_EX")]
              if keys_ex is not None else [HTYPE_NETWORK] * sel["nkeys"])
    if len(raw) < sel["nkeys"] * KEY.size or len(htypes) != sel["nkeys"]:
        raise TcError(f"pedit: {sel['nkeys']} keys announced, {len(raw) // KEY.size} present")
    keys = []
    for i, htype in enumerate(htypes):
        mask, val, off, _at, _offmask, _shift = KEY.unpack_from(raw, i * KEY.size)
        keys.append(Key(HEADER_NAMES.get(htype, f"htype{htype}"), off,
                        struct.pack("=I", mask), struct.pack("=I", val)))
    return keys
