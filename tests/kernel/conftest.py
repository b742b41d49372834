"""Fixtures of the kernel tier: tests that run inside the VM booted by scripts/kernel-tier.sh.

Outside that VM every kernel-marked test is skipped by tests/conftest.py. Inside it, a test
asks for the kernel features it needs with `require_module("cls_flower")`: a feature that is
truly absent skips the test with a message naming the module.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

NETDEVSIM_BUS = Path("/sys/bus/netdevsim")
NETDEVSIM_ID = 7  # bus device id of the test device; arbitrary but unique within the VM
DEVICE_APPEAR_TIMEOUT_S = 5.0
POLL_S = 0.05


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


class Netdevsim:
    """One netdevsim device with one port, from a chosen build of the module."""

    def __init__(self, ko: Path) -> None:
        self.ko = ko
        self.ifname = ""

    def load(self) -> str:
        """Insert the module, create the device, return its netdev name (hw-tc-offload on)."""
        _unload()
        _require_module("psample")  # netdevsim's one module dependency
        subprocess.run(["insmod", str(self.ko)], check=True, capture_output=True)
        (NETDEVSIM_BUS / "new_device").write_text(f"{NETDEVSIM_ID} 1")
        net = NETDEVSIM_BUS / "devices" / f"netdevsim{NETDEVSIM_ID}" / "net"
        deadline = time.monotonic() + DEVICE_APPEAR_TIMEOUT_S
        while not (net.is_dir() and any(net.iterdir())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"netdevsim{NETDEVSIM_ID}: no netdev after {self.ko}")
            time.sleep(POLL_S)
        # udev in the guest renames the port (eth0 -> eni7np1): let it finish first.
        subprocess.run(["udevadm", "settle", f"--timeout={DEVICE_APPEAR_TIMEOUT_S:.0f}"],
                       capture_output=True)
        self.ifname = sorted(p.name for p in net.iterdir())[0]
        subprocess.run(["ip", "link", "set", self.ifname, "up"], check=True)
        subprocess.run(["ethtool", "-K", self.ifname, "hw-tc-offload", "on"], check=True)
        return self.ifname

    def unload(self) -> None:
        if (NETDEVSIM_BUS / "del_device").exists():
            (NETDEVSIM_BUS / "del_device").write_text(f"{NETDEVSIM_ID}")
        _unload()


def _unload() -> None:
    if Path("/sys/module/netdevsim").exists():
        subprocess.run(["rmmod", "netdevsim"], check=True)


@pytest.fixture
def netdevsim_stock(netdevsim_dir: Path) -> Iterator[Netdevsim]:
    """A device of the unmodified module: it refuses flower offload."""
    dev = Netdevsim(netdevsim_dir / "stock" / "netdevsim.ko")
    dev.load()
    try:
        yield dev
    finally:
        dev.unload()


@pytest.fixture
def netdevsim_flower(netdevsim_dir: Path) -> Iterator[Netdevsim]:
    """A device of the patched module: skip_sw flower rules report in_hw (control plane only)."""
    dev = Netdevsim(netdevsim_dir / "flower" / "netdevsim.ko")
    dev.load()
    try:
        yield dev
    finally:
        dev.unload()
