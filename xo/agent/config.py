"""Agent configuration, loaded from TOML.

Example (every key but the optional ones is required; unknown keys are refused so typos cannot
silently disable a setting):

    name = "b0"                      # identity: the certificate's common name
    interface = "eth0"               # the NIC the TC programs attach to
    listen = "198.18.0.3:7000"       # gRPC (mutual TLS)
    vips = ["198.18.0.100"]          # addresses this host owns client flows on (may be empty)
    netns = "lab-b0"                 # optional: run in this network namespace (/run/netns)
    pin_dir = "/run/xo/bpffs/b0"     # optional: where the datapath pins its maps
    handoff_timeout_ms = 1000        # optional: owner gives up on a Handoff reply after this
    metrics = "127.0.0.1:9464"       # optional: Prometheus endpoint (default off; loopback!)
    hw_rules = false                 # optional: mirror redirects as TC flower rules (NIC tier)
    hw_rules_min_bytes = 2097152     # optional: only transfers this big get one (seed 003: 2 MiB)
    hw_rules_unknown_size = true     # optional: and offloads whose app announced no size
    max_flows = 65536                # optional: flow table entries (new offloads refused when full)

    [handoff]                        # where restored (handed-in) sockets bind on this host
    addresses = ["198.18.0.3"]
    ports = [40000, 40999]

    [tls]
    ca = "pki/ca.pem"
    cert = "pki/b0.pem"
    key = "pki/b0.key"

    [local]                          # the unix-socket app API
    path = "/run/xo/b0.sock"
    mode = "0660"                    # optional, octal string or integer
    group = "nogroup"                # optional

    [[peers]]
    name = "f0"
    address = "198.18.0.2:7000"
    identity = "f0"                  # optional: certificate name, default = name

Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xo.datapath.program import DEFAULT_MAX_FLOWS
from xo.flow import Endpoint, FlowError, IPAddress
from xo.hwrules.policy import DEFAULT_THRESHOLD, SizePolicy
from xo.pki import TlsFiles

DEFAULT_SOCKET_MODE = 0o660
# A Handoff is a few hundred µs on a LAN; a second means the target is gone or overloaded.
DEFAULT_HANDOFF_TIMEOUT_MS = 1000
# An app that offloads without announcing a size (nginx, a streaming app) did so because it
# judged the transfer worth a handoff, which costs more than a queued flower insert: give it a
# rule. The queue cancels it for free if the flow ends before the rule is issued.
DEFAULT_HW_RULES_UNKNOWN_SIZE = True
MIN_PORT = 1
MAX_PORT = 65535


class ConfigError(ValueError):
    """The agent configuration is malformed or inconsistent; the message names the key."""


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    address: str  # host:port of the peer's gRPC server
    identity: str  # the name its certificate must carry


@dataclass(frozen=True, slots=True)
class LocalApi:
    path: Path
    mode: int = DEFAULT_SOCKET_MODE
    group: str | None = None


@dataclass(frozen=True, slots=True)
class HandoffRange:
    addresses: tuple[IPAddress, ...]
    port_min: int
    port_max: int

    def contains(self, ep: Endpoint) -> bool:
        return ep.ip in self.addresses and self.port_min <= ep.port <= self.port_max

    def address_for(self, family: int) -> IPAddress | None:
        return next((a for a in self.addresses if a.version == family), None)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    name: str
    interface: str
    listen: str
    handoff: HandoffRange
    tls: TlsFiles
    local: LocalApi
    vips: tuple[IPAddress, ...] = ()
    peers: tuple[Peer, ...] = field(default_factory=tuple)
    pin_dir: Path | None = None
    netns: str | None = None
    handoff_timeout_ms: int = DEFAULT_HANDOFF_TIMEOUT_MS
    metrics: str | None = None  # ADDR:PORT of GET /metrics; None: no endpoint
    hw_rules: bool = False  # queue a TC flower twin of each redirect (xo.agent.hwqueue)
    # ... for transfers of at least this many bytes (xo.hwrules.SizePolicy) ...
    hw_rules_min_bytes: int = DEFAULT_THRESHOLD
    # ... and for offloads whose app announced no size
    hw_rules_unknown_size: bool = DEFAULT_HW_RULES_UNKNOWN_SIZE
    max_flows: int = DEFAULT_MAX_FLOWS  # eBPF flow table size (fixed when the maps are pinned)

    def peer(self, name: str) -> Peer | None:
        return next((p for p in self.peers if p.name == name), None)

    def hw_policy(self) -> SizePolicy:
        """Which offloaded flows get a hardware rule (from the size their app announced)."""
        return SizePolicy(self.hw_rules_min_bytes, self.hw_rules_unknown_size)

    def peer_by_identity(self, identity: str) -> Peer | None:
        return next((p for p in self.peers if p.identity == identity), None)


def _take(table: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ConfigError(f"{where}: missing key {key!r}")
        return default
    value = table.pop(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _no_extra(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(table))}")


def _ip(text: Any, where: str) -> IPAddress:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected an address string, got {text!r}")
    try:
        return ipaddress.ip_address(text)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _host_port(text: str, where: str) -> str:
    try:
        Endpoint.parse(text)
    except FlowError as e:
        raise ConfigError(f"{where}: {e}") from None
    return text


def _mode(value: Any, where: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ConfigError(f"{where}: not an octal mode: {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        raise ConfigError(f"{where}: mode must be 0..0777, got {value!r}")
    return value


def _path(value: str, base: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def _handoff(table: dict[str, Any]) -> HandoffRange:
    where = "handoff"
    addrs = _take(table, "addresses", list, where)
    ports = _take(table, "ports", list, where)
    _no_extra(table, where)
    if not addrs:
        raise ConfigError("handoff.addresses: at least one address")
    if (
        len(ports) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports)
        or not MIN_PORT <= ports[0] <= ports[1] <= MAX_PORT
    ):
        raise ConfigError(f"handoff.ports: expected [min, max] within 1..65535, got {ports!r}")
    ips = tuple(_ip(a, "handoff.addresses") for a in addrs)
    return HandoffRange(ips, ports[0], ports[1])


def _tls(table: dict[str, Any], base: Path) -> TlsFiles:
    files = TlsFiles(*(_path(_take(table, k, str, "tls"), base) for k in ("ca", "cert", "key")))
    _no_extra(table, "tls")
    return files


def _local(table: dict[str, Any], base: Path) -> LocalApi:
    path = _path(_take(table, "path", str, "local"), base)
    mode = _mode(table.pop("mode", DEFAULT_SOCKET_MODE), "local.mode")
    group = _take(table, "group", str, "local", None)
    _no_extra(table, "local")
    return LocalApi(path, mode, group)


def _peers(items: list[Any]) -> tuple[Peer, ...]:
    peers = []
    for i, item in enumerate(items):
        where = f"peers[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table")
        item = dict(item)
        name = _take(item, "name", str, where)
        address = _host_port(_take(item, "address", str, where), f"{where}.address")
        identity = _take(item, "identity", str, where, name)
        _no_extra(item, where)
        peers.append(Peer(name, address, identity))
    names = [p.name for p in peers]
    if len(set(names)) != len(names):
        raise ConfigError(f"peers: duplicate names in {names}")
    return tuple(peers)


def parse(data: dict[str, Any], base: Path) -> AgentConfig:
    """Build a config from a parsed TOML document; paths are relative to `base`."""
    data = dict(data)
    name = _take(data, "name", str, "config")
    if not name:
        raise ConfigError("config.name: must not be empty")
    cfg = AgentConfig(
        name=name,
        interface=_take(data, "interface", str, "config"),
        listen=_host_port(_take(data, "listen", str, "config"), "config.listen"),
        vips=tuple(_ip(v, "config.vips") for v in _take(data, "vips", list, "config", [])),
        pin_dir=(
            _path(p, base) if (p := _take(data, "pin_dir", str, "config", None)) else None
        ),
        netns=_take(data, "netns", str, "config", None) or None,
        handoff_timeout_ms=_take(data, "handoff_timeout_ms", int, "config",
                                 DEFAULT_HANDOFF_TIMEOUT_MS),
        metrics=(
            _host_port(m, "config.metrics") if (m := _take(data, "metrics", str, "config", None))
            else None
        ),
        hw_rules=_take(data, "hw_rules", bool, "config", False),
        hw_rules_min_bytes=_take(data, "hw_rules_min_bytes", int, "config", DEFAULT_THRESHOLD),
        hw_rules_unknown_size=_take(data, "hw_rules_unknown_size", bool, "config",
                                    DEFAULT_HW_RULES_UNKNOWN_SIZE),
        max_flows=_take(data, "max_flows", int, "config", DEFAULT_MAX_FLOWS),
        handoff=_handoff(dict(_take(data, "handoff", dict, "config"))),
        tls=_tls(dict(_take(data, "tls", dict, "config")), base),
        local=_local(dict(_take(data, "local", dict, "config")), base),
        peers=_peers(_take(data, "peers", list, "config", [])),
    )
    _no_extra(data, "config")
    if cfg.handoff_timeout_ms <= 0:
        raise ConfigError("config.handoff_timeout_ms: must be positive")
    if cfg.max_flows < 1:
        raise ConfigError("config.max_flows: must be positive")
    if cfg.hw_rules_min_bytes < 0:
        raise ConfigError("config.hw_rules_min_bytes: must be >= 0 (0: every sized transfer)")
    if cfg.peer(cfg.name):
        raise ConfigError(f"peers: {cfg.name!r} lists itself")
    return cfg


def load(path: str | Path) -> AgentConfig:
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return parse(data, path.parent.resolve())


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def dumps(cfg: AgentConfig) -> str:
    """The TOML text of a config (used by the lab, the demo and tests to write agent files)."""
    top: dict[str, object] = {
        "name": cfg.name, "interface": cfg.interface, "listen": cfg.listen,
        "vips": [str(v) for v in cfg.vips],
    }
    if cfg.pin_dir:
        top["pin_dir"] = cfg.pin_dir
    if cfg.netns:
        top["netns"] = cfg.netns
    top["handoff_timeout_ms"] = cfg.handoff_timeout_ms
    if cfg.metrics:
        top["metrics"] = cfg.metrics
    if cfg.hw_rules:
        top["hw_rules"] = True
    if cfg.hw_rules_min_bytes != DEFAULT_THRESHOLD:
        top["hw_rules_min_bytes"] = cfg.hw_rules_min_bytes
    if cfg.hw_rules_unknown_size != DEFAULT_HW_RULES_UNKNOWN_SIZE:
        top["hw_rules_unknown_size"] = cfg.hw_rules_unknown_size
    if cfg.max_flows != DEFAULT_MAX_FLOWS:
        top["max_flows"] = cfg.max_flows
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    addrs = _toml_value([str(a) for a in cfg.handoff.addresses])
    lines += ["", "[handoff]", f"addresses = {addrs}",
              f"ports = [{cfg.handoff.port_min}, {cfg.handoff.port_max}]"]
    lines += ["", "[tls]"]
    lines += [f"{k} = {_toml_value(getattr(cfg.tls, k))}" for k in ("ca", "cert", "key")]
    lines += ["", "[local]", f"path = {_toml_value(cfg.local.path)}",
              f'mode = "{cfg.local.mode:o}"']
    if cfg.local.group:
        lines.append(f"group = {_toml_value(cfg.local.group)}")
    for p in cfg.peers:
        lines += ["", "[[peers]]", f"name = {_toml_value(p.name)}",
                  f"address = {_toml_value(p.address)}", f"identity = {_toml_value(p.identity)}"]
    return "\n".join(lines) + "\n"
