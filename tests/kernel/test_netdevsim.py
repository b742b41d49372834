"""netdevsim as the stand-in NIC of the hardware tier, checked with iproute2's own `tc`.

The stock module refuses flower offload with a known message; the patched one accepts
skip_sw flower rules and the kernel reports them in_hw. These pin the test bed the
xo.hwrules tests rely on, independently of our pyroute2 plugins.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable

import pytest

pytestmark = pytest.mark.kernel

STOCK_REFUSAL = "only offload of BPF classifiers supported"
RULE = ["protocol", "ip", "pref", "10", "flower", "skip_sw", "ip_proto", "tcp",
        "dst_ip", "198.18.0.1", "dst_port", "80", "action", "drop"]


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True)


def _ingress(ifname: str) -> None:
    subprocess.run(["tc", "qdisc", "add", "dev", ifname, "clsact"], check=True)


def test_stock_netdevsim_refuses_flower(require_module: Callable[[str], None],
                                        netdevsim_stock) -> None:
    require_module("cls_flower")
    _ingress(netdevsim_stock.ifname)
    res = _tc("filter", "add", "dev", netdevsim_stock.ifname, "ingress", *RULE)
    assert res.returncode != 0
    assert STOCK_REFUSAL in res.stderr


def test_patched_netdevsim_reports_in_hw(require_module: Callable[[str], None],
                                         netdevsim_flower) -> None:
    require_module("cls_flower")
    _ingress(netdevsim_flower.ifname)
    res = _tc("filter", "add", "dev", netdevsim_flower.ifname, "ingress", *RULE)
    assert res.returncode == 0, res.stderr
    dump = _tc("-j", "filter", "show", "dev", netdevsim_flower.ifname, "ingress")
    rules = [f for f in json.loads(dump.stdout) if f.get("options")]
    assert len(rules) == 1
    options = rules[0]["options"]
    assert options.get("in_hw") is True
    assert options.get("in_hw_count") == 1
    assert options.get("skip_sw") is True
