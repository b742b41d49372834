"""The S3 gateway and storage node configuration, one TOML file for a whole deployment.

    [gateway]
    listen = "127.0.0.1:9000"
    replicas = 2                 # copies of each object
    write_quorum = 2             # copies that must be durable before a PUT is acknowledged
    connect_timeout = 1.0        # seconds; a dead node costs at most this per attempt
    io_timeout = 10.0
    keys = { AKIDEXAMPLE = "secret" }

    [offload]
    enabled = true
    threshold = 4194304          # GETs of at least this many bytes are offloaded
    agent_socket = "/run/xo/agent.sock"
    return_timeout = 30.0        # seconds the gateway waits for an offloaded connection back
    agent_timeout = 5.0          # seconds the agent has to answer an offload or give-back

    [[nodes]]
    name = "n0"
    address = "127.0.0.1:9100"   # the node's HTTP API (gateway -> node)
    data_dir = "/var/lib/xo-s3/n0"
    target = "b0"                # the offload target: agent peer name or ADDR:PORT
    agent_socket = "/run/xo/b0.sock"   # the node's local agent (receives handed-in clients)

    [tls]                        # optional: the gateway speaks HTTPS only (TLS 1.2/1.3)
    cert = "/etc/xo/s3.pem"      # PEM certificate chain (relative paths: to this file)
    key = "/etc/xo/s3.key"       # PEM private key
    handshake_timeout = 10.0     # seconds a client has to complete its handshake
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xo.flow import Endpoint, FlowError

# Below ~4 MiB a handoff costs more than it saves here (BENCHMARKS.md, section s3).
DEFAULT_THRESHOLD = 4 * 1024 * 1024
DEFAULT_CONNECT_TIMEOUT = 1.0
DEFAULT_IO_TIMEOUT = 10.0
DEFAULT_RETURN_TIMEOUT = 30.0
DEFAULT_AGENT_TIMEOUT = 5.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class ConfigError(ValueError):
    """The configuration file is missing, not TOML, or has a bad or missing value."""


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str
    address: Endpoint
    data_dir: Path | None = None
    target: str = ""
    agent_socket: str = ""


@dataclass(frozen=True, slots=True)
class OffloadConfig:
    enabled: bool = False
    threshold: int = DEFAULT_THRESHOLD
    agent_socket: str = ""
    return_timeout: float = DEFAULT_RETURN_TIMEOUT
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """HTTPS on the gateway: where its certificate and key are."""

    cert: Path
    key: Path
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT


@dataclass(frozen=True, slots=True)
class S3Config:
    listen: tuple[str, int]
    keys: dict[str, str]
    nodes: list[NodeSpec]
    replicas: int = 2
    write_quorum: int = 2
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    io_timeout: float = DEFAULT_IO_TIMEOUT
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    tls: TlsConfig | None = None

    def node(self, name: str) -> NodeSpec:
        for spec in self.nodes:
            if spec.name == name:
                return spec
        raise ConfigError(f"no node named {name!r} (have {[n.name for n in self.nodes]})")


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
         default: Any = None) -> Any:
    if key not in table:
        if default is None:
            raise ConfigError(f"{where}.{key} is required")
        return default
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}.{key} has the wrong type: {value!r}")
    return value


def _endpoint(text: str, where: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except FlowError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_listen(text: str, where: str = "listen") -> tuple[str, int]:
    """'ADDR:PORT' to bind; unlike an Endpoint, port 0 (any free port) is allowed."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{where}: expected ADDR:PORT, got {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}: bad address {host!r}") from None
    return host, int(port)


def _tls(data: dict[str, Any], base: Path | None) -> TlsConfig | None:
    """The optional [tls] table; relative paths are taken from the config file's folder."""
    table = data.get("tls")
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError("[tls] must be a table")
    unknown = set(table) - {"cert", "key", "handshake_timeout"}
    if unknown:
        raise ConfigError(f"tls: unknown key {sorted(unknown)[0]!r}")
    paths = []
    for name in ("cert", "key"):
        path = Path(_get(table, name, str, "tls"))
        if base is not None and not path.is_absolute():
            path = base / path
        paths.append(path)
    timeout = float(_get(table, "handshake_timeout", (int, float), "tls",
                         DEFAULT_HANDSHAKE_TIMEOUT))
    if timeout <= 0:
        raise ConfigError("tls.handshake_timeout must be > 0")
    return TlsConfig(paths[0], paths[1], timeout)


def parse(data: dict[str, Any], base: Path | None = None) -> S3Config:
    """Validate a parsed TOML document (`base`: the folder relative paths start from)."""
    gw = data.get("gateway")
    if not isinstance(gw, dict):
        raise ConfigError("a [gateway] table is required")
    keys = _get(gw, "keys", dict, "gateway")
    if not keys or not all(isinstance(v, str) and v for v in keys.values()):
        raise ConfigError("gateway.keys must map access keys to non-empty secret keys")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise ConfigError("at least one [[nodes]] entry is required")
    nodes = []
    for i, raw in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where} must be a table")
        data_dir = raw.get("data_dir")
        nodes.append(
            NodeSpec(
                name=_get(raw, "name", str, where),
                address=_endpoint(_get(raw, "address", str, where), where),
                data_dir=Path(data_dir) if isinstance(data_dir, str) else None,
                target=_get(raw, "target", str, where, ""),
                agent_socket=_get(raw, "agent_socket", str, where, ""),
            )
        )
    if len({n.name for n in nodes}) != len(nodes):
        raise ConfigError("node names must be unique")
    replicas = _get(gw, "replicas", int, "gateway", 2)
    quorum = _get(gw, "write_quorum", int, "gateway", replicas)
    if not 1 <= replicas <= len(nodes):
        raise ConfigError(f"gateway.replicas must be 1..{len(nodes)}, got {replicas}")
    if not 1 <= quorum <= replicas:
        raise ConfigError(f"gateway.write_quorum must be 1..replicas, got {quorum}")
    off = data.get("offload", {})
    if not isinstance(off, dict):
        raise ConfigError("[offload] must be a table")
    offload = OffloadConfig(
        enabled=_get(off, "enabled", bool, "offload", False),
        threshold=_get(off, "threshold", int, "offload", DEFAULT_THRESHOLD),
        agent_socket=_get(off, "agent_socket", str, "offload", ""),
        return_timeout=float(_get(off, "return_timeout", (int, float), "offload",
                                  DEFAULT_RETURN_TIMEOUT)),
        agent_timeout=float(_get(off, "agent_timeout", (int, float), "offload",
                                 DEFAULT_AGENT_TIMEOUT)),
    )
    if offload.threshold < 0:
        raise ConfigError("offload.threshold must be >= 0")
    return S3Config(
        listen=parse_listen(_get(gw, "listen", str, "gateway"), "gateway.listen"),
        keys=dict(keys),
        nodes=nodes,
        replicas=replicas,
        write_quorum=quorum,
        connect_timeout=float(_get(gw, "connect_timeout", (int, float), "gateway",
                                   DEFAULT_CONNECT_TIMEOUT)),
        io_timeout=float(_get(gw, "io_timeout", (int, float), "gateway", DEFAULT_IO_TIMEOUT)),
        offload=offload,
        tls=_tls(data, base),
    )


def load(path: str | Path) -> S3Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return parse(data, Path(path).parent)
