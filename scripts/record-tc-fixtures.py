"""Record the netlink bytes iproute2's `tc` exchanges for XO's flower rules (run in the VM).

The unit tests of xo/tc/ encode and decode against these bytes, so our pyroute2 plugins are
checked against the reference implementation, not against themselves. Recorded once:

    XO_VM_RWDIR=$PWD/tests/unit/fixtures scripts/kernel-tier.sh --exec bash -c \
        '.venv/bin/python scripts/record-tc-fixtures.py tests/unit/fixtures/tc \
         $XO_NETDEVSIM_DIR/flower/netdevsim.ko'

How: an nlmon device mirrors every netlink message; a packet socket on it collects tc's
requests (RTM_NEWTFILTER/RTM_DELTFILTER with NLM_F_REQUEST) and the kernel's dump replies.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ETH_P_ALL = 0x0003
RTM_NEWTFILTER, RTM_DELTFILTER = 44, 45
NLM_F_REQUEST = 0x1
NLMSGHDR = struct.Struct("=IHHII")
TCMSG_HANDLE = struct.Struct("=I")
TCMSG_HANDLE_OFF = 8  # family, pad1, pad2 (4 bytes) + ifindex (4 bytes)
DRAIN_S = 0.2
NETDEVSIM_ID = 9

# Addresses of the recorded rules: a client, the VIP it dialled, the backend it is sent to.
V4 = dict(client="198.18.0.10", vip="198.18.0.100", backend="198.18.0.21")
V6 = dict(client="fd00:78:6f::10", vip="fd00:78:6f::100", backend="fd00:78:6f::21")
CPORT, VPORT, HPORT = "40000", "80", "61000"
DST_MAC, SRC_MAC = "02:00:00:00:00:21", "02:00:00:00:00:01"


def match(proto: str, addrs: dict[str, str], flag: str) -> list[str]:
    return ["protocol", proto, "pref", "10", "handle", "0x1", "flower", flag,
            "ip_proto", "tcp", "src_ip", addrs["client"], "dst_ip", addrs["vip"],
            "src_port", CPORT, "dst_port", VPORT]


def redirect(dev: str, ip: str, addrs: dict[str, str], csum: list[str]) -> list[str]:
    return ["action", "pedit", "ex",
            "munge", "eth", "dst", "set", DST_MAC,
            "munge", "eth", "src", "set", SRC_MAC,
            "munge", ip, "dst", "set", addrs["backend"],
            "munge", "tcp", "dport", "set", HPORT, "pipe",
            "action", "csum", *csum, "pipe",
            "action", "mirred", "egress", "redirect", "dev", dev]


def rules(dev: str) -> dict[str, list[str]]:
    """name -> tc filter arguments after `dev DEV ingress`."""
    return {
        "flower_v4_redirect": match("ip", V4, "skip_hw") + redirect(dev, "ip", V4, ["iph", "tcp"]),
        "flower_v6_redirect": match("ipv6", V6, "skip_hw") + redirect(dev, "ip6", V6, ["tcp"]),
        "flower_v4_block": match("ip", V4, "skip_hw") + ["action", "drop"],
        "flower_v6_block": match("ipv6", V6, "skip_hw") + ["action", "drop"],
    }


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def drain(sock: socket.socket) -> list[bytes]:
    """Every netlink message mirrored since the last drain."""
    time.sleep(DRAIN_S)
    out = []
    while True:
        try:
            frame = sock.recv(1 << 16)
        except BlockingIOError:
            return out
        while frame:
            length = NLMSGHDR.unpack_from(frame)[0]
            out.append(frame[:length])
            frame = frame[(length + 3) & ~3:]


def requests(msgs: list[bytes], kind: int) -> list[bytes]:
    return [m for m in msgs if NLMSGHDR.unpack_from(m)[1] == kind
            and NLMSGHDR.unpack_from(m)[2] & NLM_F_REQUEST]


def replies(msgs: list[bytes]) -> list[bytes]:
    """Kernel -> tc RTM_NEWTFILTER messages of a filter with a handle (the dump of our rule)."""
    return [m for m in msgs if NLMSGHDR.unpack_from(m)[1] == RTM_NEWTFILTER
            and not NLMSGHDR.unpack_from(m)[2] & NLM_F_REQUEST
            and TCMSG_HANDLE.unpack_from(m, NLMSGHDR.size + TCMSG_HANDLE_OFF)[0]]


def tc_exchange(sock: socket.socket, dev: str, args: list[str]) -> dict[str, object]:
    drain(sock)
    sh("tc", "filter", "add", "dev", dev, "ingress", *args)
    add = requests(drain(sock), RTM_NEWTFILTER)
    sh("tc", "filter", "show", "dev", dev, "ingress")
    dump = replies(drain(sock))
    sh("tc", "filter", "del", "dev", dev, "ingress", *args[:6], "flower")
    delete = requests(drain(sock), RTM_DELTFILTER)
    if len(add) != 1 or len(dump) != 1 or len(delete) != 1:
        raise RuntimeError(f"expected one add/dump/del message, got {len(add)}/{len(dump)}/"
                           f"{len(delete)} for {args}")
    return {"tc": ["tc", "filter", "add", "dev", dev, "ingress", *args],
            "request": add[0].hex(), "dump": dump[0].hex(), "delete": delete[0].hex()}


def netdevsim_dev(ko: Path) -> str:
    sh("modprobe", "psample")
    sh("insmod", str(ko))
    Path("/sys/bus/netdevsim/new_device").write_text(f"{NETDEVSIM_ID} 1")
    sh("udevadm", "settle")
    net = Path(f"/sys/bus/netdevsim/devices/netdevsim{NETDEVSIM_ID}/net")
    dev = sorted(p.name for p in net.iterdir())[0]
    sh("ip", "link", "set", dev, "up")
    sh("ethtool", "-K", dev, "hw-tc-offload", "on")
    return dev


def main(out_dir: str, netdevsim_ko: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for m in ("nlmon", "cls_flower", "act_pedit", "act_csum", "act_mirred", "act_gact"):
        sh("modprobe", m)
    sh("ip", "link", "add", "xorec0", "type", "veth", "peer", "name", "xorec1")
    sh("ip", "link", "set", "xorec0", "up")
    sh("tc", "qdisc", "add", "dev", "xorec0", "clsact")
    sh("ip", "link", "add", "xonl0", "type", "nlmon")
    sh("ip", "link", "set", "xonl0", "up")
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind(("xonl0", 0))
    sock.setblocking(False)

    recorded = {name: tc_exchange(sock, "xorec0", args) for name, args in rules("xorec0").items()}
    hw = netdevsim_dev(Path(netdevsim_ko))
    sh("tc", "qdisc", "add", "dev", hw, "clsact")
    hw_args = match("ip", V4, "skip_sw") + redirect(hw, "ip", V4, ["iph", "tcp"])
    recorded["flower_v4_redirect_skip_sw"] = tc_exchange(sock, hw, hw_args)
    recorded["flower_v4_block_in_hw"] = tc_exchange(
        sock, hw, match("ip", V4, "skip_sw") + ["action", "drop"])
    for name, data in recorded.items():
        data["kernel"] = subprocess.run(["uname", "-r"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        data["iproute2"] = subprocess.run(["tc", "-V"], capture_output=True, text=True,
                                          check=True).stdout.strip()
        (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"recorded {out / name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
