"""The `xo` command: every registered subcommand imports and answers --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xo.cli import COMMANDS, main


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name: str) -> None:
    # A subprocess, so each command's imports are checked on their own.
    r = subprocess.run(
        [sys.executable, "-m", "xo.cli", name, "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "usage: xo " + name in r.stdout
