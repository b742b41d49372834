"""The rule builder: a flow's REDIRECT/BLOCK as flower, byte-identical to the recorded tc rules."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest
from tc_wire import decode, encode, ifindex_of, raw, same_request

from xo.datapath.layout import Redirect
from xo.flow import Endpoint, FlowKey
from xo.hwrules import Placement, block_rule, redirect_rule, snat_rule
from xo.hwrules.rules import PRIO
from xo.tc import EGRESS, pedit

ADDRS = {4: ("198.18.0.10", "198.18.0.100", "198.18.0.21"),
         6: ("fd00:78:6f::10", "fd00:78:6f::100", "fd00:78:6f::21")}
SRC_MAC, DST_MAC = "02:00:00:00:00:01", "02:00:00:00:00:21"
RECORDED_PRIO = 10


def flow(version: int) -> FlowKey:
    client, vip, _ = ADDRS[version]
    return FlowKey(Endpoint(ipaddress.ip_address(client), 40000),
                   Endpoint(ipaddress.ip_address(vip), 80))


def target(version: int) -> Redirect:
    return Redirect(Endpoint(ipaddress.ip_address(ADDRS[version][2]), 61000), mac=DST_MAC)


@pytest.mark.parametrize("version,name,placement", [
    (4, "flower_v4_redirect", Placement.SW_ONLY), (6, "flower_v6_redirect", Placement.SW_ONLY),
    (4, "flower_v4_redirect_skip_sw", Placement.HW_ONLY)])
def test_redirect_rule_equals_tc_rule(version: int, name: str, placement: Placement) -> None:
    recorded = raw(name, "request")
    rule = redirect_rule(flow(version), target(version), ifindex_of(recorded), SRC_MAC, placement)
    rule = replace(rule.with_handle(1), prio=RECORDED_PRIO)
    assert same_request(encode("add-filter", "flower", **rule.tc_args()), recorded)
    assert same_request(encode("del-filter", "flower", **rule.locator()), raw(name, "delete"))


@pytest.mark.parametrize("version,name", [(4, "flower_v4_block"), (6, "flower_v6_block")])
def test_block_rule_equals_tc_rule(version: int, name: str) -> None:
    recorded = raw(name, "request")
    rule = block_rule(flow(version), ifindex_of(recorded), Placement.SW_ONLY)
    rule = replace(rule.with_handle(1), prio=RECORDED_PRIO)
    assert same_request(encode("add-filter", "flower", **rule.tc_args()), recorded)


def test_families_get_their_own_prio() -> None:
    assert redirect_rule(flow(4), target(4), 2, SRC_MAC).prio == PRIO[4]
    assert redirect_rule(flow(6), target(6), 2, SRC_MAC).prio == PRIO[6]
    assert PRIO[4] != PRIO[6]


def test_redirect_defaults_to_the_interface_like_ebpf() -> None:
    rule = redirect_rule(flow(4), target(4), 7, SRC_MAC)
    pedit, _csum, mirred = rule.actions
    assert ("eth", "src", SRC_MAC) in pedit["keys"]
    assert mirred["ifindex"] == 7
    rule = redirect_rule(flow(4), replace(target(4), src_mac="02:00:00:00:00:09", ifindex=9),
                         7, SRC_MAC)
    assert ("eth", "src", "02:00:00:00:00:09") in rule.actions[0]["keys"]
    assert rule.actions[2]["ifindex"] == 9


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="redirect of IPv4 flow"):
        redirect_rule(flow(4), target(6), 2, SRC_MAC)
    with pytest.raises(ValueError, match="bad ifindex"):
        block_rule(flow(4), 0)
    with pytest.raises(TypeError, match="FlowKey"):
        block_rule("198.18.0.10:1 -> 198.18.0.100:80", 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MAC"):
        redirect_rule(flow(4), target(4), 2, "not-a-mac")


@pytest.mark.parametrize("version", [4, 6])
def test_snat_rule_matches_replies_and_rewrites_the_source(version: int) -> None:
    client, vip, backend = (ipaddress.ip_address(a) for a in ADDRS[version])
    local = Endpoint(backend, 61000)
    as_vip = Endpoint(vip, 80)
    rule = snat_rule(FlowKey(Endpoint(client, 40000), local), as_vip, 5).with_handle(3)
    msg = decode(encode("add-filter", "flower", **rule.tc_args()))
    assert msg["parent"] == EGRESS
    opts = msg.get_attr("TCA_OPTIONS")
    assert opts.get_attr(f"TCA_FLOWER_KEY_IPV{version}_SRC") == str(backend)
    assert opts.get_attr(f"TCA_FLOWER_KEY_IPV{version}_DST") == str(client)
    assert (opts.get_attr("TCA_FLOWER_KEY_TCP_SRC"), opts.get_attr("TCA_FLOWER_KEY_TCP_DST")) == (
        61000, 40000)
    acts = opts.get_attr("TCA_FLOWER_ACT")
    keys = pedit.decode_keys(acts.get_attr("TCA_ACT_PRIO_1").get_attr("TCA_ACT_OPTIONS"))
    ip_key = "ip" if version == 4 else "ip6"
    assert keys == [*pedit.munge_keys(ip_key, "src", str(vip)),
                    *pedit.munge_keys("tcp", "sport", 80)]
    csum_parms = acts.get_attr("TCA_ACT_PRIO_2").get_attr("TCA_ACT_OPTIONS").get_attr(
        "TCA_CSUM_PARMS")
    assert csum_parms["action"] == 0  # ok: the packet goes on after the rewrite
    with pytest.raises(ValueError, match="source rewrite"):
        snat_rule(FlowKey(Endpoint(client, 40000), local), Endpoint(
            ipaddress.ip_address(ADDRS[10 - version][1]), 80), 5)
