"""netdevsim as the stand-in NIC of the hardware tier (kernel-tier VM, tests and benchmark).

Debian's kernel ships no netdevsim: scripts/netdevsim/build.sh builds it out of tree, stock
(refuses flower: "only offload of BPF classifiers supported") and with a two-line test patch
that accepts flower offload, so skip_sw rules report in_hw (control plane only: no packets).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

BUS = Path("/sys/bus/netdevsim")
MODULE = Path("/sys/module/netdevsim")
DEPENDS = "psample"  # netdevsim's one module dependency
APPEAR_TIMEOUT_S = 5.0
POLL_S = 0.05


class Netdevsim:
    """One netdevsim bus device with one port, from a chosen build of the module."""

    def __init__(self, ko: Path, dev_id: int) -> None:
        self.ko = Path(ko)
        self.dev_id = dev_id
        self.ifname = ""

    def load(self) -> str:
        """Insert the module, create the device, return its port (hw-tc-offload on, up)."""
        if not self.ko.is_file():
            raise FileNotFoundError(
                f"no netdevsim module at {self.ko} (scripts/netdevsim/build.sh builds it)")
        unload_module()
        subprocess.run(["modprobe", DEPENDS], check=True, capture_output=True)
        subprocess.run(["insmod", str(self.ko)], check=True, capture_output=True)
        (BUS / "new_device").write_text(f"{self.dev_id} 1")
        net = BUS / "devices" / f"netdevsim{self.dev_id}" / "net"
        deadline = time.monotonic() + APPEAR_TIMEOUT_S
        while not (net.is_dir() and any(net.iterdir())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"netdevsim{self.dev_id}: no port after loading {self.ko}")
            time.sleep(POLL_S)
        # udev renames the port (eth0 -> eni<id>np1): let it finish before using the name.
        if shutil.which("udevadm"):
            subprocess.run(["udevadm", "settle", f"--timeout={APPEAR_TIMEOUT_S:.0f}"],
                           capture_output=True)
        self.ifname = sorted(p.name for p in net.iterdir())[0]
        subprocess.run(["ip", "link", "set", self.ifname, "up"], check=True)
        subprocess.run(["ethtool", "-K", self.ifname, "hw-tc-offload", "on"], check=True,
                       capture_output=True)
        return self.ifname

    def unload(self) -> None:
        if (BUS / "del_device").exists() and (BUS / "devices" / f"netdevsim{self.dev_id}").exists():
            (BUS / "del_device").write_text(f"{self.dev_id}")
        unload_module()

    def __enter__(self) -> Netdevsim:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()


def unload_module() -> None:
    if MODULE.exists():
        subprocess.run(["rmmod", "netdevsim"], check=True)
