"""Compile and load bpf/xo_tc.c with BCC, its three maps pinned in a bpffs.

Why pinned: an agent that restarts loads the program again and BCC reopens the pinned maps,
so the flows in place keep their entries (and the old filter keeps running until replaced).
`ip netns exec` remounts /sys, and this host mounts no bpffs by default, so XO mounts its own
bpffs at PIN_ROOT when needed and unmounts it when the last pin directory under it is gone
(under a lock file: several processes share it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xo.datapath.errors import DatapathError, DatapathPermissionError
from xo.datapath.layout import PROGRAM, check_sizes

PIN_ROOT = Path("/run/xo/bpffs")
LOCK_FILE = Path("/run/xo/bpffs.lock")
BPF_FS_MAGIC = 0xCAFE4A11
MAP_PINS = ("flows", "stats", "counters")
DEFAULT_MAX_FLOWS = 65536
# Entries the kernel's own bpffs preloads (bpf_preload iterators); not ours, not pins.
KERNEL_ENTRIES = {"maps.debug", "progs.debug"}


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


_libc = ctypes.CDLL(None, use_errno=True)


def on_bpffs(path: Path) -> bool:
    """Whether `path` lives on a bpf filesystem."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


@contextlib.contextmanager
def pin_lock() -> Iterator[None]:
    """Serialise mount/pin/unmount of the shared bpffs between processes."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mount_bpffs(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(where), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise DatapathPermissionError(f"mounting a bpffs at {where} needs CAP_SYS_ADMIN")
        raise DatapathError(f"cannot mount a bpffs at {where}: {os.strerror(err)}")


def prepare_pin_dir(pin_dir: Path) -> None:
    """Make pin_dir exist on a bpffs, mounting one at PIN_ROOT if pin_dir is under it."""
    if pin_dir.is_relative_to(PIN_ROOT) and not on_bpffs(PIN_ROOT):
        _mount_bpffs(PIN_ROOT)
    pin_dir.mkdir(parents=True, exist_ok=True)
    if not on_bpffs(pin_dir):
        raise DatapathError(
            f"{pin_dir} is not on a bpffs: mount one (mount -t bpf bpf DIR) or use {PIN_ROOT}"
        )


def release_pin_dir(pin_dir: Path) -> None:
    """Remove our pins, pin_dir and its empty parents up to PIN_ROOT; unmount PIN_ROOT when
    nothing else is pinned under it (EBUSY: another process still uses it, leave it)."""
    for name in MAP_PINS:
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()
    with contextlib.suppress(OSError):
        pin_dir.rmdir()
    for d in pin_dir.parents:
        if d == PIN_ROOT or not d.is_relative_to(PIN_ROOT):
            break
        with contextlib.suppress(OSError):  # not empty: other interfaces are pinned there
            d.rmdir()
    if not on_bpffs(PIN_ROOT) or set(os.listdir(PIN_ROOT)) - KERNEL_ENTRIES:
        return
    if _libc.umount2(os.fsencode(PIN_ROOT), 0) != 0:
        err = ctypes.get_errno()
        if err != errno.EBUSY:
            raise DatapathError(f"cannot unmount {PIN_ROOT}: {os.strerror(err)}")


def pins_exist(pin_dir: Path) -> bool:
    return all((pin_dir / name).exists() for name in MAP_PINS)


class _MapInfoHead(ctypes.Structure):
    """The head of struct bpf_map_info (include/uapi/linux/bpf.h)."""

    _fields_ = [
        (name, ctypes.c_uint32)
        for name in ("type", "id", "key_size", "value_size", "max_entries", "map_flags")
    ]


def map_max_entries(fd: int) -> int:
    """max_entries of the map behind fd, as the kernel has it (a pinned map keeps its size)."""
    from bcc.libbcc import lib  # type: ignore[import-untyped]

    info = _MapInfoHead()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib.bpf_obj_get_info(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
        raise DatapathError(f"bpf_obj_get_info on map fd {fd}: {os.strerror(ctypes.get_errno())}")
    return int(info.max_entries)


def check_pinned_size(pin_dir: Path, max_flows: int) -> None:
    """Refuse (before compiling) to reuse a pinned table of another size: BCC would silently
    reopen it, and resizing would mean dropping the flows in place."""
    from bcc.libbcc import lib  # type: ignore[import-untyped]

    fd = lib.bpf_obj_get(os.fsencode(pin_dir / MAP_PINS[0]))
    if fd < 0:
        raise DatapathError(
            f"cannot open pinned map {pin_dir / MAP_PINS[0]}: {os.strerror(ctypes.get_errno())}"
        )
    try:
        pinned = map_max_entries(fd)
    finally:
        os.close(fd)
    if pinned != max_flows:
        raise DatapathError(
            f"the flow table pinned in {pin_dir} holds {pinned} flows, not {max_flows}: "
            f"attach with max_flows={pinned}, or detach to resize"
        )


class Program:
    """One compiled copy of the TC program pair with its maps (reopened from pins if present)."""

    def __init__(self, pin_dir: Path, max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        try:
            import bcc  # Debian's python3-bpfcc; the venv sees it through system site packages
        except ImportError as e:
            raise DatapathError(
                f"BCC is not importable ({e}): use the venv made by scripts/setup.sh"
            ) from None
        if os.geteuid() != 0:
            raise DatapathPermissionError(
                "loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)"
            )
        cflags = [
            f"-I{PROGRAM.parent}",
            f"-DXO_MAX_FLOWS={max_flows}",
            *(f'-DXO_PIN_{name.upper()}="{pin_dir / name}"' for name in MAP_PINS),
        ]
        try:
            self.bpf: Any = bcc.BPF(src_file=os.fsencode(PROGRAM), cflags=cflags)
            self.ingress = self.bpf.load_func(b"xo_ingress", bcc.BPF.SCHED_CLS)
            self.egress = self.bpf.load_func(b"xo_egress", bcc.BPF.SCHED_CLS)
        except Exception as e:  # BCC raises bare Exception for compile, load and pin errors
            raise DatapathError(f"cannot load {PROGRAM} (pins in {pin_dir}): {e}") from e
        self.flows = self.bpf[b"xo_flows"]
        self.stats = self.bpf[b"xo_stats"]
        self.counters = self.bpf[b"xo_counters"]
        check_sizes(self.flows.Key, self.flows.Leaf, self.stats.Leaf)

    def close(self) -> None:
        """Drop our fds; the pinned maps and attached filters live on in the kernel."""
        self.bpf.cleanup()
