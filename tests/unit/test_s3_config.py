"""The S3 TOML configuration: the shipped example loads, bad files fail with ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from xo.rgw.config import ConfigError, load, parse

EXAMPLE = Path(__file__).parents[2] / "integrations" / "rgw" / "s3.toml"


def base() -> dict:
    return {
        "gateway": {"listen": "127.0.0.1:0", "keys": {"AK": "SK"}},
        "nodes": [{"name": f"n{i}", "address": f"127.0.0.1:{9100 + i}"} for i in range(3)],
    }


def test_example_config_loads() -> None:
    cfg = load(EXAMPLE)
    assert len(cfg.nodes) == 3 and cfg.replicas == 2
    assert cfg.offload.threshold > 0
    assert cfg.node("n1").data_dir is not None


def test_defaults() -> None:
    cfg = parse(base())
    assert cfg.listen == ("127.0.0.1", 0)
    assert cfg.replicas == 2 and cfg.write_quorum == 2
    assert not cfg.offload.enabled


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("gateway"), r"\[gateway\]"),
        (lambda d: d["gateway"].pop("keys"), "gateway.keys is required"),
        (lambda d: d["gateway"].update(keys={"AK": ""}), "non-empty"),
        (lambda d: d.update(nodes=[]), "nodes"),
        (lambda d: d["nodes"][1].update(name="n0"), "unique"),
        (lambda d: d["nodes"][0].update(address="nowhere"), "ADDR:PORT"),
        (lambda d: d["gateway"].update(replicas=4), "replicas must be 1..3"),
        (lambda d: d["gateway"].update(replicas=2, write_quorum=3), "write_quorum"),
        (lambda d: d["gateway"].update(replicas="2"), "wrong type"),
        (lambda d: d["gateway"].update(listen="localhost:80"), "bad address"),
        (lambda d: d.update(offload={"threshold": -1}), "threshold"),
        (lambda d: d.update(tls={"cert": "c.pem"}), "tls.key is required"),
        (lambda d: d.update(tls={"cert": "c", "key": "k", "ca": "x"}), "unknown key 'ca'"),
        (lambda d: d.update(tls={"cert": "c", "key": "k", "handshake_timeout": 0}), "> 0"),
        (lambda d: d.update(tls="on"), r"\[tls\] must be a table"),
    ],
)
def test_bad_config(mutate, message: str) -> None:
    data = base()
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse(data)


def test_unreadable_or_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway\n")
    with pytest.raises(ConfigError):
        load(bad)
    cfg = parse(base())
    with pytest.raises(ConfigError, match="no node named"):
        cfg.node("n9")


def test_commands_report_bad_config_cleanly(tmp_path: Path, capsys) -> None:
    from xo.cli import main

    assert main(["s3-gateway", "-c", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["s3-node", "-c", str(EXAMPLE), "--name", "n9"]) == 2
    assert "no node named 'n9'" in capsys.readouterr().err


def test_tls_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    conf = tmp_path / "s3.toml"
    conf.write_text(EXAMPLE.read_text() + '\n[tls]\ncert = "pki/gw.pem"\nkey = "/abs/gw.key"\n')
    cfg = load(conf)
    assert cfg.tls is not None
    assert (cfg.tls.cert, cfg.tls.key) == (tmp_path / "pki" / "gw.pem", Path("/abs/gw.key"))
    assert parse(base()).tls is None  # plain HTTP without the table


def test_gateway_reports_a_bad_certificate_cleanly(tmp_path: Path, capsys) -> None:
    from xo.cli import main

    conf = tmp_path / "s3.toml"
    (tmp_path / "gw.pem").write_text("not a certificate")
    (tmp_path / "gw.key").write_text("not a key")
    text = EXAMPLE.read_text().replace("127.0.0.1:9000", "127.0.0.1:0")
    conf.write_text(text + '\n[tls]\ncert = "gw.pem"\nkey = "gw.key"\n')
    assert main(["s3-gateway", "-c", str(conf), "--no-offload"]) == 2
    assert "tls: cannot load certificate" in capsys.readouterr().err
    conf.write_text(text + '\n[tls]\ncert = "missing.pem"\nkey = "gw.key"\n')
    assert main(["s3-gateway", "-c", str(conf), "--no-offload"]) == 2
    assert "No such file" in capsys.readouterr().err
