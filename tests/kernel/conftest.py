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
from xo.lab import Lab

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


@pytest.fixture
def ktls() -> None:
    """For `pytest.mark.usefixtures("ktls")`: skip unless the kernel has kTLS (module tls)."""
    _require_module("tls")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """A lab with one client, one frontend and one backend, shared by a module's tests."""
    with Lab(clients=1, frontends=1, backends=1) as lab:
        yield lab


@pytest.fixture(scope="session")
def netdevsim_dir() -> Path:
    """Directory with stock/netdevsim.ko and flower/netdevsim.ko (scripts/netdevsim/build.sh)."""
    value = os.environ.get("XO_NETDEVSIM_DIR")
    if not value or not Path(value, "stock", "netdevsim.ko").is_file():
        pytest.skip("kernel feature absent: no out-of-tree netdevsim build (XO_NETDEVSIM_DIR)")
    return Path(value)


def _netdevsim(netdevsim_dir: Path, build: str) -> Iterator[Netdevsim]:
    """A loaded device of one build of the module (a subdirectory of netdevsim_dir)."""
    _require_module("psample")
    dev = Netdevsim(netdevsim_dir / build / "netdevsim.ko", NETDEVSIM_ID)
    dev.load()
    try:
        yield dev
    finally:
        dev.unload()


@pytest.fixture
def netdevsim_stock(netdevsim_dir: Path) -> Iterator[Netdevsim]:
    """A device of the unmodified module: it refuses flower offload."""
    yield from _netdevsim(netdevsim_dir, "stock")


@pytest.fixture
def netdevsim_flower(netdevsim_dir: Path) -> Iterator[Netdevsim]:
    """A device of the patched module: skip_sw flower rules report in_hw (control plane only)."""
    yield from _netdevsim(netdevsim_dir, "flower")
