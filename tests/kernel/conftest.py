"""Fixtures of the kernel tier: tests that run inside the VM booted by scripts/kernel-tier.sh.

Outside that VM every kernel-marked test is skipped by tests/conftest.py. Inside it, a test
asks for the kernel features it needs with `require_module("cls_flower")`: a feature that is
truly absent skips the test with a message naming the module.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xo.hwrules.netdevsim import Netdevsim

NETDEVSIM_ID = 7  # bus device id of the test device; arbitrary but unique within the VM


def in_vm() -> bool:
    """True inside the kernel-tier VM (the guest script exports XO_KERNEL_TIER=1)."""
    return os.environ.get("XO_KERNEL_TIER") == "1"


def module_present(name: str) -> bool:
    """Load a module if needed; True when the kernel has it (loaded or built in)."""
    if Path("/sys/module", name).exists():
        return True
    return subprocess.run(["modprobe", name], capture_output=True).returncode == 0


def _require_module(name: str) -> None:
    if not module_present(name):
        release = os.uname().release
        pytest.skip(f"kernel feature absent: module {name} is not available in {release}")


@pytest.fixture
def require_module() -> Callable[[str], None]:
    """`require_module("tls")`: skip the test, naming the module, when the kernel lacks it."""
    return _require_module


@pytest.fixture(scope="session")
def netdevsim_dir() -> Path:
    """Directory with stock/netdevsim.ko and flower/netdevsim.ko (scripts/netdevsim/build.sh)."""
    value = os.environ.get("XO_NETDEVSIM_DIR")
    if not value or not Path(value, "stock", "netdevsim.ko").is_file():
        pytest.skip("kernel feature absent: no out-of-tree netdevsim build (XO_NETDEVSIM_DIR)")
    return Path(value)


@pytest.fixture
def netdevsim_stock(netdevsim_dir: Path) -> Iterator[Netdevsim]:
    """A device of the unmodified module: it refuses flower offload."""
    _require_module("psample")
    dev = Netdevsim(netdevsim_dir / "stock" / "netdevsim.ko", NETDEVSIM_ID)
    dev.load()
    try:
        yield dev
    finally:
        dev.unload()


@pytest.fixture
def netdevsim_flower(netdevsim_dir: Path) -> Iterator[Netdevsim]:
    """A device of the patched module: skip_sw flower rules report in_hw (control plane only)."""
    _require_module("psample")
    dev = Netdevsim(netdevsim_dir / "flower" / "netdevsim.ko", NETDEVSIM_ID)
    dev.load()
    try:
        yield dev
    finally:
        dev.unload()
