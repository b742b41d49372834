"""Agent config: TOML parsing, defaults, refusal of malformed input, round trip of dumps()."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from xo.agent import config
from xo.hwrules import SizePolicy
from xo.hwrules.policy import MIB

GOOD = """
name = "b0"
interface = "eth0"
listen = "198.18.0.3:7000"
vips = ["198.18.0.100", "fd00:78:6f::100"]

[handoff]
addresses = ["198.18.0.3"]
ports = [40000, 40999]

[tls]
ca = "pki/ca.pem"
cert = "pki/b0.pem"
key = "/abs/b0.key"

[local]
path = "/run/xo/b0.sock"
mode = "0640"

[[peers]]
name = "f0"
address = "198.18.0.2:7000"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_parses_and_resolves_relative_paths(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.name == "b0"
    want = ("198.18.0.100", "fd00:78:6f::100")
    assert cfg.vips == tuple(ipaddress.ip_address(v) for v in want)
    assert cfg.tls.ca == tmp_path.resolve() / "pki/ca.pem"
    assert cfg.tls.key == Path("/abs/b0.key")
    assert cfg.local.mode == 0o640
    assert cfg.peers[0].identity == "f0"  # defaults to the name
    assert cfg.handoff.port_min == 40000 and cfg.handoff.port_max == 40999


def test_dumps_round_trips(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    again = config.load(write(tmp_path, config.dumps(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('name = "b0"\n', ""), "missing key 'name'"),
        (lambda t: t + "\nbogus = 1\n", "unknown key(s) bogus"),
        (lambda t: t.replace("[40000, 40999]", "[5, 1]"), "handoff.ports"),
        (lambda t: t.replace('"0640"', '"999"'), "local.mode"),
        (lambda t: t.replace('"198.18.0.2:7000"', '"nowhere"'), "peers[0].address"),
        (lambda t: t.replace('"198.18.0.3"]', '"not-an-ip"]'), "handoff.addresses"),
        (lambda t: t.replace('name = "f0"', 'name = "b0"'), "lists itself"),
        (lambda t: t.replace("[handoff]", "[handoff\n"), "agent.toml"),
        (lambda t: "hw_rules_min_bytes = -1\n" + t, "config.hw_rules_min_bytes: must be >= 0"),
        (lambda t: 'hw_rules_min_bytes = "2M"\n' + t,
         "config.hw_rules_min_bytes: expected int, got str"),
        (lambda t: "hw_rules_min_bytes = true\n" + t,
         "config.hw_rules_min_bytes: expected int, got bool"),
        (lambda t: "hw_rules_unknown_size = 1\n" + t,
         "config.hw_rules_unknown_size: expected bool, got int"),
    ],
)
def test_refuses_malformed(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(write(tmp_path, edit(GOOD)))


def test_hw_rule_policy_defaults_to_seed_003(tmp_path: Path) -> None:
    """2 MiB and more get a NIC rule, as in seed 003; offloads of unknown size get one too."""
    cfg = config.load(write(tmp_path, GOOD))
    assert (cfg.hw_rules_min_bytes, cfg.hw_rules_unknown_size) == (2 * MIB, True)
    policy = cfg.hw_policy()
    assert policy == SizePolicy(threshold=2 * MIB, unknown_size=True)
    assert not policy.wants(2 * MIB - 1) and policy.wants(2 * MIB) and policy.wants(None)
    assert "hw_rules_min_bytes" not in config.dumps(cfg)  # defaults stay implicit


def test_hw_rule_policy_from_the_config(tmp_path: Path) -> None:
    text = "hw_rules = true\nhw_rules_min_bytes = 65536\nhw_rules_unknown_size = false\n" + GOOD
    cfg = config.load(write(tmp_path, text))
    assert cfg.hw_rules and cfg.hw_policy() == SizePolicy(threshold=65536, unknown_size=False)
    assert not cfg.hw_policy().wants(None) and cfg.hw_policy().wants(65536)
    again = config.load(write(tmp_path, config.dumps(cfg)))
    assert again == cfg  # dumps() writes the non-default keys back


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")
