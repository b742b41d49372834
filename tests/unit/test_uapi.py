"""Every constant and struct layout in xo/uapi.py, checked against the installed kernel headers.

The headers are parsed (#defines, enums, struct bodies), not compiled: a typo in xo.uapi, or
a layout that drifted from the kernel's, fails here instead of corrupting a socket. Names not
in the uapi (SOL_TCP, TCPOPT_*, the TCP states, MSS bounds) come from the same headers'
kernel-internal part, which is what the kernel compares our values against.
"""

from __future__ import annotations

import ast
import glob
import operator
import re
import struct
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from xo import uapi

HEADER_ROOTS = sorted(glob.glob("/usr/src/linux-headers-*-common/include"))
# Searched in this order: the uapi first, then the kernel-internal headers.
HEADERS = [
    "uapi/linux/tcp.h",
    "uapi/linux/tls.h",
    "uapi/linux/sockios.h",
    "uapi/asm-generic/sockios.h",
    "uapi/asm-generic/ioctls.h",
    "uapi/asm-generic/socket.h",
    "uapi/linux/in.h",
    "linux/socket.h",
    "net/tcp.h",
    "net/tcp_states.h",
]
INT_MAX = 2**31 - 1
# Values that are not header symbols, each with the rule that derives it.
DERIVED: dict[str, Callable[[dict[str, int]], int]] = {
    # sock_setsockopt(SO_*BUFFORCE): sk_buf = min(val, INT_MAX / 2) * 2
    "SOCK_BUF_MAX": lambda sym: (INT_MAX // 2) * 2,
}
SCALAR_SIZES = {
    "__u8": 1,
    "__s8": 1,
    "char": 1,
    "unsigned char": 1,
    "__u16": 2,
    "__s16": 2,
    "__be16": 2,
    "__u32": 4,
    "__s32": 4,
    "__be32": 4,
    "int": 4,
    "__u64": 8,
    "__s64": 8,
    "__aligned_u64": 8,
}
STRUCT_CHARS = {1: "B", 2: "H", 4: "I", 8: "Q"}

pytestmark = pytest.mark.skipif(
    not HEADER_ROOTS,
    reason="no kernel headers in /usr/src/linux-headers-*-common (scripts/setup.sh installs them)",
)

_OPS: dict[type, Callable[..., int]] = {
    ast.BitOr: operator.or_,
    ast.BitAnd: operator.and_,
    ast.BitXor: operator.xor,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.USub: operator.neg,
    ast.Invert: operator.invert,
    ast.UAdd: operator.pos,
}


def _eval(node: ast.AST) -> int:
    """Integer constant expressions only: no names, no calls."""
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ValueError(f"not a constant expression: {ast.dump(node)}")


class Headers:
    """#defines (object- and one-argument function-like) and enum values of some headers."""

    def __init__(self, root: Path) -> None:
        self.macros: dict[str, str] = {}
        self.functions: dict[str, tuple[str, str]] = {}
        self.enums: dict[str, int] = {}
        self.structs: dict[str, str] = {}
        for rel in HEADERS:
            self._parse(root / rel)

    def _parse(self, path: Path) -> None:
        text = re.sub(r"/\*.*?\*/", " ", path.read_text(), flags=re.S)
        text = re.sub(r"//[^\n]*", "", text).replace("\\\n", " ")
        for m in re.finditer(r"^\s*#\s*define\s+(\w+)(\((\w+)\))?[ \t]*(.*)$", text, re.M):
            name, param, body = m.group(1), m.group(3), m.group(4).strip()
            if param:
                self.functions.setdefault(name, (param, body))
            else:
                self.macros.setdefault(name, body)
        for m in re.finditer(r"\benum\s*\w*\s*\{(.*?)\}", text, re.S):
            self._parse_enum(m.group(1))
        for m in re.finditer(r"\bstruct\s+(\w+)\s*\{(.*?)\};", text, re.S):
            self.structs.setdefault(m.group(1), m.group(2))

    def _parse_enum(self, body: str) -> None:
        nxt: int | None = 0
        for entry in filter(None, (e.strip() for e in body.split(","))):
            name, _, expr = (p.strip() for p in entry.partition("="))
            if expr:
                try:
                    nxt = self.value(expr)
                except ValueError:
                    nxt = None  # e.g. __constant_cpu_to_be32(...): not one of ours
            if nxt is not None:
                self.enums.setdefault(name, nxt)
                nxt += 1

    def expand(self, expr: str, depth: int = 0) -> str:
        if depth > 20:
            raise ValueError(f"macro recursion in {expr!r}")

        def call(m: re.Match[str]) -> str:
            param, body = self.functions[m.group(1)]
            arg = m.group(2).strip()
            body = re.sub(rf"\b{param}\s*##\s*", arg, body)
            return "(" + re.sub(rf"\b{param}\b", arg, body) + ")"

        names = "|".join(map(re.escape, self.functions)) or "(?!)"
        expr = re.sub(rf"\b({names})\s*\(([^()]*)\)", call, expr)

        def name(m: re.Match[str]) -> str:
            word = m.group(0)
            if word in self.macros:
                return "(" + self.expand(self.macros[word], depth + 1) + ")"
            if word in self.enums:
                return str(self.enums[word])
            return word

        return re.sub(r"\b[A-Za-z_]\w*\b", name, expr)

    def value(self, expr: str) -> int:
        text = self.expand(expr)
        text = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", text)
        try:
            return _eval(ast.parse(text, mode="eval"))
        except SyntaxError:
            raise ValueError(f"cannot evaluate {expr!r} -> {text!r}") from None

    def symbol(self, name: str) -> int:
        if name in self.macros:
            return self.value(name)
        if name in self.enums:
            return self.enums[name]
        raise KeyError(name)

    def layout(self, struct_name: str) -> list[tuple[str, int, int]]:
        """(field, size, alignment) of each member, bitfield groups as one storage unit."""
        out = []
        for decl in filter(None, (d.strip() for d in self.structs[struct_name].split(";"))):
            decl = " ".join(decl.split())
            m = re.match(r"^(struct \w+|unsigned char|\w+) (.*)$", decl)
            if not m:
                raise ValueError(f"cannot parse {decl!r} in struct {struct_name}")
            ctype, rest = m.groups()
            if ctype.startswith("struct "):
                inner = self.layout(ctype.split()[1])
                size, align = _struct_size(inner), max(a for _, _, a in inner)
            else:
                size = align = SCALAR_SIZES[ctype]
            if ":" in rest:  # bitfields: `__u8 a : 4, b : 4` share one unit
                bits = sum(int(p.split(":")[1]) for p in rest.split(","))
                if bits > size * 8:
                    raise ValueError(f"bitfields overflow their unit in {decl!r}")
                out.append((rest.split(":")[0].strip(), size, align))
                continue
            arr = re.match(r"^(\w+)\[(.+)\]$", rest)
            if arr:
                out.append((arr.group(1), size * self.value(arr.group(2)), align))
            else:
                out.append((rest, size, align))
        return out


def _offsets(layout: list[tuple[str, int, int]]) -> dict[str, int]:
    offsets, pos = {}, 0
    for name, size, align in layout:
        pos = -(-pos // align) * align
        offsets[name] = pos
        pos += size
    return offsets


def _struct_size(layout: list[tuple[str, int, int]]) -> int:
    name, size, _ = layout[-1]
    end = _offsets(layout)[name] + size
    align = max(a for _, _, a in layout)
    return -(-end // align) * align


@cache
def headers() -> Headers:
    return Headers(Path(HEADER_ROOTS[-1]))


def _int_constants() -> dict[str, int]:
    return {
        k: v
        for k, v in vars(uapi).items()
        if k.isupper() and isinstance(v, int) and not isinstance(v, bool)
    }


LAYOUT_CONSTANTS = {"TCP_INFO_LEN", "TCP_INFO_BYTES_SENT_OFFSET"}  # checked by layout tests


@pytest.mark.parametrize("name", sorted(set(_int_constants()) - set(DERIVED) - LAYOUT_CONSTANTS))
def test_constant_matches_header(name: str) -> None:
    try:
        expected = headers().symbol(name)
    except KeyError:
        pytest.fail(f"uapi.{name} is not defined in any of {HEADERS}: add it to DERIVED with why")
    assert getattr(uapi, name) == expected, f"uapi.{name}"


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_derived_constant(name: str) -> None:
    assert getattr(uapi, name) == DERIVED[name](_int_constants())


def test_sioc_aliases_resolve_through_asm_generic() -> None:
    """SIOCINQ/SIOCOUTQ are FIONREAD/TIOCOUTQ: the parser must have followed the alias."""
    assert headers().macros["SIOCINQ"] == "FIONREAD"
    assert headers().symbol("SIOCINQ") == headers().symbol("FIONREAD") == uapi.SIOCINQ


def _struct_chars(layout: list[tuple[str, int, int]]) -> str:
    """struct module format of a layout of plain scalar members (no padding in these)."""
    return "=" + "".join(STRUCT_CHARS[size] for _, size, _ in layout)


@pytest.mark.parametrize(
    ("attr", "c_struct"),
    [
        ("TCP_REPAIR_OPT", "tcp_repair_opt"),
        ("TCP_REPAIR_WINDOW_STRUCT", "tcp_repair_window"),
        ("TLS_CRYPTO_INFO", "tls_crypto_info"),
    ],
)
def test_struct_layout(attr: str, c_struct: str) -> None:
    layout = headers().layout(c_struct)
    ours = getattr(uapi, attr)
    assert ours.size == _struct_size(layout)
    assert ours.format == _struct_chars(layout)


def test_tcp_info_head_is_everything_before_tcpi_rto() -> None:
    layout = headers().layout("tcp_info")
    offsets = _offsets(layout)
    assert uapi.TCP_INFO_HEAD.size == offsets["tcpi_rto"]
    # state, ca_state, retransmits, probes, backoff, options, wscales, (app_limited|fo_fail)
    assert [n for n, _, _ in layout][:8] == [
        "tcpi_state",
        "tcpi_ca_state",
        "tcpi_retransmits",
        "tcpi_probes",
        "tcpi_backoff",
        "tcpi_options",
        "tcpi_snd_wscale",
        "tcpi_delivery_rate_app_limited",
    ]
    assert _struct_size(layout) <= uapi.TCP_INFO_LEN


def test_tcp_info_bytes_sent_and_retrans() -> None:
    layout = headers().layout("tcp_info")
    offsets = _offsets(layout)
    sizes = {n: size for n, size, _ in layout}
    assert offsets["tcpi_bytes_sent"] == uapi.TCP_INFO_BYTES_SENT_OFFSET
    assert (
        offsets["tcpi_bytes_retrans"] == uapi.TCP_INFO_BYTES_SENT_OFFSET + sizes["tcpi_bytes_sent"]
    )
    assert uapi.TCP_INFO_BYTES_SENT.format == "=QQ"
    assert uapi.TCP_INFO_BYTES_SENT.size == sizes["tcpi_bytes_sent"] + sizes["tcpi_bytes_retrans"]


def test_every_struct_in_uapi_is_checked() -> None:
    checked = {
        "TCP_REPAIR_OPT",
        "TCP_REPAIR_WINDOW_STRUCT",
        "TLS_CRYPTO_INFO",
        "TCP_INFO_HEAD",
        "TCP_INFO_BYTES_SENT",
    }
    structs = {k for k, v in vars(uapi).items() if isinstance(v, struct.Struct)}
    assert structs <= checked, f"add a layout test for {sorted(structs - checked)}"


@pytest.mark.parametrize("cipher", sorted(uapi.TLS_CIPHERS))
def test_tls_cipher_layout(cipher: int) -> None:
    c = uapi.TLS_CIPHERS[cipher]
    macro = next(
        k for k, v in _int_constants().items() if k.startswith("TLS_CIPHER_") and v == cipher
    )
    h = headers()
    assert h.symbol(macro) == cipher
    for part in ("iv", "key", "salt", "rec_seq"):
        assert getattr(c, part) == h.symbol(f"{macro}_{part.upper()}_SIZE"), f"{c.name} {part}"
    layout = h.layout("tls12_crypto_info_" + macro.removeprefix("TLS_CIPHER_").lower())
    assert c.size == _struct_size(layout)
    assert [n for n, _, _ in layout] == ["info", "iv", "key", "salt", "rec_seq"]
