"""The csum plugin against the csum actions iproute2 sent (IPv4: iph+tcp, IPv6: tcp)."""

from __future__ import annotations

import pytest
from tc_wire import decode, raw

from xo.tc import TcError, csum


def recorded_csum(name: str, part: str):
    acts = decode(raw(name, part)).get_attr("TCA_OPTIONS").get_attr("TCA_FLOWER_ACT")
    second = acts.get_attr("TCA_ACT_PRIO_2")
    assert second.get_attr("TCA_ACT_KIND") == "csum"
    return second.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_CSUM_PARMS")


@pytest.mark.parametrize("name,targets", [
    ("flower_v4_redirect", ["iph", "tcp"]), ("flower_v6_redirect", ["tcp"])])
@pytest.mark.parametrize("part", ["request", "dump"])
def test_update_flags_equal_tc(name: str, targets: list[str], part: str) -> None:
    parms = recorded_csum(name, part)
    assert parms["update_flags"] == csum.update_flags(targets)
    assert parms["action"] == 3  # pipe


def test_parameters_encode_flags_and_control() -> None:
    params = csum.get_parameters({"update": ["ip4h", "tcp"], "action": "pipe"})
    assert params == {"attrs": [["TCA_CSUM_PARMS", {"action": 3, "update_flags": 9}]]}


@pytest.mark.parametrize("targets", [[], ["ipv6h"], ["tcp", "bogus"]])
def test_bad_targets_raise(targets: list[str]) -> None:
    with pytest.raises(TcError, match="targets must be among"):
        csum.update_flags(targets)
