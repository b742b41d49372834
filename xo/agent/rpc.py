"""gRPC transport between agents: mutual TLS credentials, peer identity, client channels.

Both sides present certificates from the same CA (xo.pki). The server requires a client
certificate; every handler then maps the certificate's name to a configured peer and refuses
anyone else, so a valid certificate alone is not enough to hand us a connection.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import grpc.aio

from xo.agent.config import AgentConfig, Peer
from xo.pki import TlsFiles
from xo.v1 import offload_pb2_grpc

# A handoff RPC is a few hundred bytes; keep messages bounded (a state with queues fits).
MAX_MESSAGE = 8 * 1024 * 1024
KEEPALIVE_MS = 2000
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Agents are in the same L2/L3 neighbourhood; fail fast instead of backing off for seconds.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_http_proxy", 0),
]

# The server must accept the clients' keepalive pings, or it answers GOAWAY "too_many_pings"
# and in-flight handoffs on that channel fail.
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


class PeerRefused(PermissionError):
    """The caller is not a configured peer."""


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes]:
    return files.ca.read_bytes(), files.cert.read_bytes(), files.key.read_bytes()


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    ca, cert, key = _read(files)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = _read(files)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)


def caller_identities(context: grpc.aio.ServicerContext) -> list[str]:
    """Names in the caller's verified certificate (common name and DNS SANs)."""
    auth = context.auth_context()
    names: list[str] = []
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        names += [v.decode() for v in auth.get(key, [])]
    return names


def authorize(cfg: AgentConfig, identities: Iterable[str]) -> Peer:
    """The configured peer the caller is; PeerRefused for anyone else."""
    names = list(identities)
    for name in names:
        peer = cfg.peer_by_identity(name)
        if peer is not None:
            return peer
    raise PeerRefused(f"caller {names or ['<no certificate>']} is not a configured peer")


class Channels:
    """One secure channel + stub per peer, created lazily and reused."""

    def __init__(self, cfg: AgentConfig) -> None:
        self._cfg = cfg
        self._creds = channel_credentials(cfg.tls)
        self._open: dict[str, tuple[grpc.aio.Channel, offload_pb2_grpc.OffloadStub]] = {}

    def stub(self, peer: Peer) -> offload_pb2_grpc.OffloadStub:
        entry = self._open.get(peer.name)
        if entry is None:
            options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", peer.identity)]
            channel = grpc.aio.secure_channel(peer.address, self._creds, options=options)
            entry = (channel, offload_pb2_grpc.OffloadStub(channel))
            self._open[peer.name] = entry
        return entry[1]

    async def close(self) -> None:
        for channel, _ in self._open.values():
            await channel.close()
        self._open.clear()
