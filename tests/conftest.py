"""Shared pytest set-up: tier markers and the root requirement of the net tier."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The kernel tier runs only inside the VM of scripts/kernel-tier.sh (it exports
    # XO_KERNEL_TIER=1): this host's kernel lacks what those tests exercise.
    if os.environ.get("XO_KERNEL_TIER") != "1":
        vm_only = pytest.mark.skip(reason="kernel tier: runs in the VM (make test-kernel)")
        for item in items:
            if "kernel" in item.keywords:
                item.add_marker(vm_only)
    # The net tier needs root for network namespaces, TC programs and TCP_REPAIR.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces, TC and TCP_REPAIR")
    for item in items:
        if "net" in item.keywords:
            item.add_marker(skip)
