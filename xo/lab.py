"""A lab of network namespaces on one bridge: clients, frontends (one holds the VIP), backends.

examples:
  xo lab up                          build a lab (1 client, 1 frontend, 2 backends), print it
  xo lab up -c 2 -f 1 -b 3 --name mylab
  ip netns exec mylab-c0 curl http://198.18.0.1/    use it
  xo lab down mylab                  remove one lab
  xo lab down --all                  remove leftover labs (whose creating process is gone)
  xo lab down --all --force          remove every lab, even ones in use

Why: every net-tier test, the demo and the benchmarks need hosts with real TCP stacks that
cannot disturb the machine or each other. A lab is a set of namespaces whose names share one
unique prefix ("xo3f9a1c-c0", ...); nothing outside them is touched, and two labs never
collide because each has its own bridge namespace (addresses may repeat between labs).

    with Lab(clients=1, frontends=1, backends=2) as lab:
        lab.backends[0].run(["ip", "addr"])
        with lab.clients[0].enter():
            s = socket.create_connection((str(lab.vip4), 80))

Layout: namespace NAME-br holds the Linux bridge br0; every host namespace NAME-<h> has lo and
eth0 (a veth whose peer <h> is a bridge port), IPv4 198.18.0.0/24, IPv6 fd00:78:6f::/64 (nodad),
fixed MACs, permanent neighbour entries for every host and the VIP, checksum offloads off (so
captures verify checksums). The VIP is an extra address on frontends[0]'s eth0.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
STATE_DIR = Path("/run/xo/labs")  # one JSON per lab: owner pid, so `down --all` spares live labs
NAME_RE = re.compile(r"^[a-z][a-z0-9]{1,11}$")
AUTO_NAME_RE = re.compile(r"^xo[0-9a-f]{6}$")
NAME_PREFIX = "xo"
NAME_HEX_BYTES = 3

SUBNET4 = ipaddress.IPv4Network("198.18.0.0/24")
SUBNET6 = ipaddress.IPv6Network("fd00:78:6f::/64")
VIP_OFFSET = 1
# Host number = role base + index; it is also the last address byte and the last MAC byte.
ROLE_BASE = {"f": 10, "b": 50, "c": 100}
ROLE_MAX = 40  # hosts per role, so the ranges above never overlap
MAC_PREFIX = "02:78:6f:00:00"  # locally administered
IFNAME = "eth0"
BRIDGE = "br0"
KILL_TIMEOUT_S = 2.0
CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """The lab could not be built, entered or torn down (message says which step and why)."""


class LabCommandError(subprocess.CalledProcessError):
    """A command in the lab failed; unlike its base class, str() includes the stderr."""

    def __str__(self) -> str:
        err = self.stderr.decode() if isinstance(self.stderr, bytes) else (self.stderr or "")
        return f"{super().__str__()}: {err.strip()}" if err else super().__str__()


def _run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a set-up command, raising LabCommandError with its stderr."""
    p = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise LabCommandError(p.returncode, list(argv), p.stdout, p.stderr)
    return p


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    """setns(2) for the calling thread only (os.setns is Python 3.12+)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns failed: {os.strerror(err)} (needs root / CAP_SYS_ADMIN)")


@contextlib.contextmanager
def netns_entered(netns: str) -> Iterator[None]:
    """Move the current thread into `netns` for the block, then back to where it was."""
    path = NETNS_DIR / netns
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LabError(f"no network namespace {netns!r} ({path} missing)") from None
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(target)
        os.close(here)


def _parse_snmp(text: str) -> dict[str, int]:
    """/proc/net/{snmp,netstat}: pairs of lines 'Tcp: names...' / 'Tcp: values...'."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        proto, _, names = head.partition(":")
        _, _, values = vals.partition(":")
        for n, v in zip(names.split(), values.split(), strict=False):
            out[proto + n] = int(v)
    return out


def _parse_snmp6(text: str) -> dict[str, int]:
    """/proc/net/snmp6: one 'Name value' per line."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass
class Host:
    """One namespace of the lab with its eth0 on the lab's bridge."""

    name: str
    netns: str
    number: int
    ifname: str = IFNAME
    ifindex: int = 0
    mac: str = ""
    ip4: ipaddress.IPv4Address = field(default=SUBNET4.network_address)
    ip6: ipaddress.IPv6Address = field(default=SUBNET6.network_address)
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command in the namespace; output captured as text unless told otherwise."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        p = subprocess.run(self.argv(argv), check=False, **kw)
        if check and p.returncode != 0:
            raise LabCommandError(p.returncode, p.args, p.stdout, p.stderr)
        return p

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a command in the namespace; the lab stops it at down() if still running."""
        p = subprocess.Popen(self.argv(argv), **kw)
        self._procs.append(p)
        return p

    def enter(self) -> contextlib.AbstractContextManager[None]:
        """setns() the current thread into this host: sockets created inside live here."""
        return netns_entered(self.netns)

    def nstat(self) -> dict[str, int]:
        """Absolute SNMP counters of the namespace: 'TcpOutRsts', 'TcpExtTCPAbortOnData', ..."""
        with self.enter():
            snmp = Path("/proc/thread-self/net/snmp").read_text()
            ext = Path("/proc/thread-self/net/netstat").read_text()
            six = Path("/proc/thread-self/net/snmp6").read_text()
        return {**_parse_snmp(snmp), **_parse_snmp(ext), **_parse_snmp6(six)}

    def stop_processes(self) -> None:
        """Terminate (then kill) the processes started with popen() that still run."""
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(KILL_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._procs.clear()


class Lab:
    """Clients, frontends and backends on one bridge, each in its own network namespace."""

    def __init__(
        self, clients: int = 1, frontends: int = 1, backends: int = 2, name: str | None = None
    ) -> None:
        for role, n in (("clients", clients), ("frontends", frontends), ("backends", backends)):
            if not 0 <= n <= ROLE_MAX:
                raise LabError(f"{role} must be 0..{ROLE_MAX}, got {n}")
        if name is None:
            name = NAME_PREFIX + secrets.token_hex(NAME_HEX_BYTES)
        if not NAME_RE.match(name):
            raise LabError(f"lab name must match {NAME_RE.pattern}, got {name!r}")
        self.name = name
        self.bridge_netns = f"{name}-br"
        self.vip4 = SUBNET4.network_address + VIP_OFFSET
        self.vip6 = SUBNET6.network_address + VIP_OFFSET
        self.frontends = [self._host("f", i) for i in range(frontends)]
        self.backends = [self._host("b", i) for i in range(backends)]
        self.clients = [self._host("c", i) for i in range(clients)]
        self._up = False

    def _host(self, role: str, i: int) -> Host:
        n = ROLE_BASE[role] + i
        return Host(
            name=f"{role}{i}",
            netns=f"{self.name}-{role}{i}",
            number=n,
            mac=f"{MAC_PREFIX}:{n:02x}",
            ip4=SUBNET4.network_address + n,
            ip6=SUBNET6.network_address + n,
        )

    @property
    def hosts(self) -> list[Host]:
        return [*self.frontends, *self.backends, *self.clients]

    def host(self, name: str) -> Host:
        """A host by its short name ("c0", "f0", "b1")."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"lab {self.name} has no host {name!r}")

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> Lab:
        """Build the namespaces; on any failure everything built so far is removed."""
        if os.geteuid() != 0:
            raise LabError("a lab needs root (network namespaces, veths, bridge)")
        if self._up:
            return self
        taken = _lab_namespaces(self.name)
        if taken or (STATE_DIR / f"{self.name}.json").exists():
            raise LabError(f"lab {self.name} already exists ({' '.join(taken) or 'state file'})")
        self._up = True
        try:
            self._write_state()
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop started processes and delete every namespace of the lab; safe to call twice."""
        for h in self.hosts:
            h.stop_processes()
        remove_lab(self.name)
        self._up = False

    # --- building --------------------------------------------------------------------------
    def _write_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        hosts = [h.netns for h in self.hosts]
        state = {"name": self.name, "owner_pid": os.getpid(), "hosts": hosts}
        (STATE_DIR / f"{self.name}.json").write_text(json.dumps(state))

    def _build(self) -> None:
        for ns in [self.bridge_netns, *(h.netns for h in self.hosts)]:
            _run(["ip", "netns", "add", ns])
        br = self.bridge_netns
        cmds = [
            "link set lo up",
            f"link add {BRIDGE} type bridge forward_delay 0 stp_state 0 mcast_snooping 0",
        ]
        for h in self.hosts:
            cmds += [
                f"link add {h.name} type veth peer name {h.ifname} netns {h.netns} address {h.mac}",
                f"link set {h.name} master {BRIDGE}",
                f"link set {h.name} up",
            ]
        cmds.append(f"link set {BRIDGE} up")
        with netns_entered(br):
            _write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")  # the bridge itself is L2 only
        _run(["ip", "-n", br, "-batch", "-"], stdin="\n".join(cmds) + "\n")
        for h in self.hosts:
            self._configure_host(h)

    def _configure_host(self, h: Host) -> None:
        with h.enter():
            for key, value in (
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
                (f"net/ipv6/conf/{h.ifname}/accept_dad", "0"),
                (f"net/ipv6/conf/{h.ifname}/accept_ra", "0"),
                ("net/ipv4/conf/all/rp_filter", "0"),
                (f"net/ipv4/conf/{h.ifname}/rp_filter", "0"),
            ):
                _write_sysctl(key, value)
        cmds = [
            "link set lo up",
            f"addr add {h.ip4}/{SUBNET4.prefixlen} dev {h.ifname}",
            f"addr add {h.ip6}/{SUBNET6.prefixlen} dev {h.ifname} nodad",
        ]
        if self.frontends and h is self.frontends[0]:
            # The VIP is deprecated (preferred_lft 0) so the frontend never picks it as the
            # source of its own connections, yet still accepts connections to it.
            cmds += [
                f"addr add {self.vip4}/32 dev {h.ifname}",
                f"addr add {self.vip6}/128 dev {h.ifname} nodad preferred_lft 0",
            ]
        for other in self.hosts:
            if other is not h:
                cmds += [
                    f"neigh replace {other.ip4} lladdr {other.mac} dev {h.ifname} nud permanent",
                    f"neigh replace {other.ip6} lladdr {other.mac} dev {h.ifname} nud permanent",
                ]
        if self.frontends and h is not self.frontends[0]:
            vip_mac = self.frontends[0].mac
            cmds += [
                f"neigh replace {self.vip4} lladdr {vip_mac} dev {h.ifname} nud permanent",
                f"neigh replace {self.vip6} lladdr {vip_mac} dev {h.ifname} nud permanent",
            ]
        cmds.append(f"link set {h.ifname} up")
        _run(["ip", "-n", h.netns, "-batch", "-"], stdin="\n".join(cmds) + "\n")
        # Both veth ends: no checksum offload, so packets on the wire carry real checksums.
        _run(["ip", "netns", "exec", h.netns, "ethtool", "-K", h.ifname, "tx", "off", "rx", "off"])
        _run(["ip", "netns", "exec", self.bridge_netns, "ethtool", "-K", h.name, "tx", "off"])
        with h.enter():
            h.ifindex = socket.if_nametoindex(h.ifname)

    def describe(self) -> str:
        """A human summary: one line per host."""
        lines = [f"lab {self.name}: bridge namespace {self.bridge_netns}"]
        lines.append(f"  VIP {self.vip4} {self.vip6} on f0")
        for h in self.hosts:
            lines.append(f"  {h.name:<4} netns {h.netns:<16} {h.ifname} {h.mac} {h.ip4} {h.ip6}")
        return "\n".join(lines)


def _write_sysctl(key: str, value: str) -> None:
    """Write a per-namespace sysctl from a thread already inside the namespace."""
    Path("/proc/sys", key).write_text(value)


def _lab_namespaces(name: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{name}-"))


def remove_lab(name: str) -> list[str]:
    """Kill what still runs in a lab's namespaces and delete them; returns the deleted names."""
    if not NAME_RE.match(name):
        raise LabError(f"not a lab name: {name!r}")
    me = os.getpid()
    removed = []
    for ns in _lab_namespaces(name):
        pids = subprocess.run(
            ["ip", "netns", "pids", ns], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in (int(p) for p in pids):
            if pid != me:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        p = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, check=False)
        if p.returncode == 0:
            removed.append(ns)
        elif (NETNS_DIR / ns).exists():
            raise LabError(f"cannot delete namespace {ns}: {p.stderr.strip()}")
    _release_datapath_pins(removed)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{name}.json").unlink()
    return removed


def _release_datapath_pins(namespaces: list[str]) -> None:
    """Datapath maps pinned for interfaces of deleted namespaces are orphans: unpin them (and
    let the datapath unmount its bpffs when nothing else is pinned)."""
    try:
        from xo.datapath.program import PIN_ROOT, pin_lock, release_pin_dir
    except ImportError:  # no BCC here: nothing can have been pinned
        return
    with pin_lock():
        for ns in namespaces:
            ns_dir = PIN_ROOT / ns
            for pin_dir in sorted(ns_dir.iterdir()) if ns_dir.is_dir() else []:
                release_pin_dir(pin_dir)


def _owner_alive(name: str) -> bool:
    try:
        state = json.loads((STATE_DIR / f"{name}.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    pid = int(state.get("owner_pid", 0))
    return pid > 0 and Path(f"/proc/{pid}").exists()


def list_labs() -> list[str]:
    """Names of the labs present (from their namespaces and their state files)."""
    names = {p.stem for p in STATE_DIR.glob("*.json")} if STATE_DIR.is_dir() else set()
    if NETNS_DIR.is_dir():
        names |= {p.name.rsplit("-", 1)[0] for p in NETNS_DIR.iterdir() if "-" in p.name}
    known = {n for n in names if (STATE_DIR / f"{n}.json").exists() or AUTO_NAME_RE.match(n)}
    return sorted(n for n in known if NAME_RE.match(n))


def remove_stale_labs(force: bool = False) -> dict[str, list[str]]:
    """Remove labs whose creating process is gone (all labs with force); name -> namespaces."""
    out: dict[str, list[str]] = {}
    for name in list_labs():
        if force or not _owner_alive(name):
            out[name] = remove_lab(name)
    return out


def labs_in_use() -> list[str]:
    """Labs whose creating process still runs (spared by `xo lab down --all`)."""
    return [n for n in list_labs() if _owner_alive(n)]


def configure(parser: argparse.ArgumentParser) -> None:
    """`xo lab up|down` arguments."""
    sub = parser.add_subparsers(dest="action", metavar="up|down|list", required=True)
    up = sub.add_parser("up", help="build a lab and leave it up")
    up.add_argument("-c", "--clients", type=int, default=1)
    up.add_argument("-f", "--frontends", type=int, default=1)
    up.add_argument("-b", "--backends", type=int, default=2)
    up.add_argument("--name", help="namespace prefix (default: xo + 6 hex digits)")
    down = sub.add_parser("down", help="remove a lab by name, or leftover labs with --all")
    down.add_argument("name", nargs="?")
    down.add_argument("--all", action="store_true", help="every lab whose creator is gone")
    down.add_argument("--force", action="store_true", help="with --all: also labs in use")
    sub.add_parser("list", help="list labs")


def run(args: argparse.Namespace) -> int:
    """Carry out `xo lab up|down|list`."""
    try:
        if args.action == "up":
            lab = Lab(args.clients, args.frontends, args.backends, name=args.name).up()
            print(lab.describe())
            return 0
        if args.action == "list":
            for name in list_labs():
                print(name, "in use" if _owner_alive(name) else "leftover")
            return 0
        if args.all == bool(args.name):
            print("xo lab down: give a lab NAME or --all", file=sys.stderr)
            return 2
        removed = remove_stale_labs(args.force) if args.all else {args.name: remove_lab(args.name)}
        for name, namespaces in removed.items():
            print(f"removed {name}: {' '.join(namespaces) or '(no namespaces)'}")
        for name in [] if args.force or not args.all else labs_in_use():
            print(f"kept {name}: its creating process still runs (use --force)")
        return 0
    except LabError as e:
        print(f"xo lab: {e}", file=sys.stderr)
        return 1
