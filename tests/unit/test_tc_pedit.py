"""The pedit plugin: keys computed from munges equal the keys iproute2 sent and dumped."""

from __future__ import annotations

import pytest
from tc_wire import decode, raw

from xo.tc import TcError, pedit

REDIRECT_V4 = [("eth", "dst", "02:00:00:00:00:21"), ("eth", "src", "02:00:00:00:00:01"),
               ("ip", "dst", "198.18.0.21"), ("tcp", "dport", 61000)]
REDIRECT_V6 = [*REDIRECT_V4[:2], ("ip6", "dst", "fd00:78:6f::21"), ("tcp", "dport", 61000)]


def recorded_pedit(name: str, part: str):
    acts = decode(raw(name, part)).get_attr("TCA_OPTIONS").get_attr("TCA_FLOWER_ACT")
    first = acts.get_attr("TCA_ACT_PRIO_1")
    assert first.get_attr("TCA_ACT_KIND") == "pedit"
    return first.get_attr("TCA_ACT_OPTIONS")


def keys_for(munges: list[tuple[str, str, object]]) -> list[pedit.Key]:
    return [k for m in munges for k in pedit.munge_keys(*m)]


@pytest.mark.parametrize("name,munges", [
    ("flower_v4_redirect", REDIRECT_V4), ("flower_v6_redirect", REDIRECT_V6),
    ("flower_v4_redirect_skip_sw", REDIRECT_V4)])
@pytest.mark.parametrize("part", ["request", "dump"])
def test_keys_equal_tc_keys(name: str, munges: list, part: str) -> None:
    assert pedit.decode_keys(recorded_pedit(name, part)) == keys_for(munges)


def test_parms_ex_of_tc_request() -> None:
    sel = recorded_pedit("flower_v4_redirect", "request").get_attr("TCA_PEDIT_PARMS_EX")
    assert sel["action"] == 3  # pipe: csum and mirred follow
    assert sel["nkeys"] == 6


def test_mac_spanning_words_splits_like_tc() -> None:
    keys = pedit.munge_keys("eth", "src", "02:00:00:00:00:01")
    assert [(k.off, k.mask, k.val) for k in keys] == [
        (4, b"\xff\xff\x00\x00", b"\x00\x00\x02\x00"),
        (8, b"\x00\x00\x00\x00", b"\x00\x00\x00\x01"),
    ]


def test_port_keeps_the_other_port() -> None:
    (key,) = pedit.munge_keys("tcp", "sport", 443)
    assert (key.htype, key.off, key.mask, key.val) == ("tcp", 0, b"\x00\x00\xff\xff",
                                                       b"\x01\xbb\x00\x00")


def test_keys_apply_like_the_kernel() -> None:
    """word = (word & mask) ^ val over an IPv4 header sets exactly the destination."""
    header = bytearray(range(20))
    for key in keys_for([("ip", "dst", "10.1.2.3")]):
        word = bytes(header[key.off:key.off + 4])
        header[key.off:key.off + 4] = bytes((w & m) ^ v for w, m, v in
                                            zip(word, key.mask, key.val, strict=True))
    assert header[16:20] == bytes([10, 1, 2, 3]) and header[:16] == bytes(range(16))


@pytest.mark.parametrize("munge,message", [
    (("udp", "dport", 53), "cannot munge"),
    (("ip", "dst", "fd00::1"), "bad value"),
    (("tcp", "dport", 70000), "bad value"),
    (("eth", "dst", "02:00:00:00:00"), "takes 6 bytes"),
])
def test_bad_munge_raises(munge: tuple[str, str, object], message: str) -> None:
    with pytest.raises(TcError, match=message):
        pedit.munge_keys(*munge)


def test_no_keys_or_bad_control_raise() -> None:
    with pytest.raises(TcError, match="no keys"):
        pedit.get_parameters({"kind": "pedit"})
    with pytest.raises(TcError, match="unknown control"):
        pedit.get_parameters({"keys": REDIRECT_V4, "action": "bounce"})
