"""Which flows get a hardware rule: the ones big enough to repay a slow, scarce NIC slot.

Seed 003 offloaded objects of 2 MiB and more to the NIC; smaller ones finish on eBPF before a
flower insert (milliseconds, tens on real NICs) would even land.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
DEFAULT_THRESHOLD = 2 * MIB


@dataclass(frozen=True, slots=True)
class SizePolicy:
    """Wants a rule when the expected transfer is at least `threshold` bytes.

    An unknown size (None) gets one only if `unknown_size` says so.
    """

    threshold: int = DEFAULT_THRESHOLD
    unknown_size: bool = False

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"size threshold must be >= 0, got {self.threshold}")

    def wants(self, size: int | None) -> bool:
        if size is None:
            return self.unknown_size
        if size < 0:
            raise ValueError(f"transfer size must be >= 0, got {size}")
        return size >= self.threshold

    def why_not(self, size: int | None) -> str:
        """Why a flow of `size` gets no rule (for `xo status` and logs)."""
        if size is None:
            return "size unknown and unknown sizes get no rule"
        return f"{size} bytes < threshold {self.threshold}"
