"""Validation of protocol messages, and a redacting description for logs.

Every message an agent receives is checked here before anything acts on it, so malformed or
hostile input becomes a ProtocolError with a Reason (sent back as an error reply), never an
exception deep inside a handler. `describe` is the only way messages reach a log: it prints
field names and byte counts, never state bytes or keys.
"""

from __future__ import annotations

from google.protobuf.message import Message

from xo.flow import Endpoint, FlowError, FlowKey
from xo.v1 import offload_pb2

# Identifiers are chosen by the owner; bound them so they cannot bloat logs or tables.
MAX_ID_LEN = 64
MAX_APP_LEN = 64
# A request already read, or app state, larger than this is not a handoff but a transfer.
MAX_BLOB = 1024 * 1024
TCP_STATE_VERSION = 1


class ProtocolError(ValueError):
    """A message that cannot be acted on; `reason` goes back to the sender."""

    def __init__(self, reason: offload_pb2.Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _refuse(detail: str) -> ProtocolError:
    return ProtocolError(offload_pb2.REFUSED, detail)


def handoff_id(value: str) -> str:
    if not value or len(value) > MAX_ID_LEN or not value.isprintable():
        raise _refuse(f"handoff_id must be 1..{MAX_ID_LEN} printable characters")
    return value


def flow(msg: offload_pb2.Flow, has: bool) -> FlowKey:
    if not has:
        raise _refuse("flow is missing")
    try:
        return FlowKey.from_proto(msg)
    except (FlowError, ValueError) as e:
        raise _refuse(f"bad flow: {e}") from None


def endpoint(msg: offload_pb2.Endpoint, what: str) -> Endpoint:
    try:
        return Endpoint.from_proto(msg)
    except (FlowError, ValueError) as e:
        raise _refuse(f"bad {what}: {e}") from None


def blob(value: bytes, what: str) -> bytes:
    if len(value) > MAX_BLOB:
        raise _refuse(f"{what} of {len(value)} bytes exceeds {MAX_BLOB}")
    return value


def tcp_state(msg: offload_pb2.TcpState, key: FlowKey, local: Endpoint | None) -> None:
    """The state must describe this flow's client and (if given) the expected local side."""
    if msg.version != TCP_STATE_VERSION:
        raise _refuse(f"tcp state version {msg.version} not supported")
    remote = endpoint(msg.remote, "tcp.remote")
    if remote != key.client:
        raise _refuse(f"tcp state remote {remote} is not the flow's client {key.client}")
    if local is not None and endpoint(msg.local, "tcp.local") != local:
        raise _refuse("tcp state local endpoint does not match the flow")


def handoff(req: offload_pb2.HandoffRequest) -> tuple[str, FlowKey, Endpoint]:
    """(handoff_id, flow, target endpoint) of a structurally valid HandoffRequest."""
    hid = handoff_id(req.handoff_id)
    key = flow(req.flow, req.HasField("flow"))
    if not req.HasField("tcp"):
        raise _refuse("tcp state is missing")
    tcp_state(req.tcp, key, key.vip)
    if not req.HasField("target"):
        raise _refuse("target is missing")
    target = endpoint(req.target, "target")
    if target.family != key.family:
        raise _refuse("target and flow are of different address families")
    if len(req.app) > MAX_APP_LEN:
        raise _refuse("app name too long")
    blob(req.preread, "preread")
    blob(req.app_state, "app_state")
    return hid, key, target


def end(req: offload_pb2.EndRequest) -> tuple[str, FlowKey]:
    hid = handoff_id(req.handoff_id)
    key = flow(req.flow, req.HasField("flow"))
    known = offload_pb2.Reason.values()
    if req.reason not in known or req.reason == offload_pb2.REASON_UNSPECIFIED:
        raise _refuse(f"end reason {req.reason} unknown")
    if req.reason == offload_pb2.DONE and not req.HasField("tcp"):
        raise _refuse("an End with reason DONE must carry the tcp state")
    if req.HasField("tcp"):
        tcp_state(req.tcp, key, None)
    blob(req.preread, "preread")
    blob(req.app_state, "app_state")
    return hid, key


def describe(msg: Message) -> str:
    """Field names and sizes only: safe to log (state bytes and keys never appear)."""
    parts = []
    for fd, value in msg.ListFields():
        if fd.message_type is not None and not fd.is_repeated:
            if fd.message_type.name in ("Flow", "Endpoint"):
                parts.append(f"{fd.name}={_endpoint_text(value)}")
            else:
                parts.append(f"{fd.name}=<{value.ByteSize()} bytes>")
        elif isinstance(value, bytes):
            parts.append(f"{fd.name}=<{len(value)} bytes>")
        elif fd.is_repeated:
            parts.append(f"{fd.name}=<{len(value)} items>")
        else:
            parts.append(f"{fd.name}={value!r}")
    return f"{msg.DESCRIPTOR.name}({', '.join(parts)})"


def _endpoint_text(value: Message) -> str:
    try:
        if isinstance(value, offload_pb2.Flow):
            return str(FlowKey.from_proto(value))
        if isinstance(value, offload_pb2.Endpoint):
            return str(Endpoint.from_proto(value))
    except (FlowError, ValueError):
        pass
    return "<invalid>"
