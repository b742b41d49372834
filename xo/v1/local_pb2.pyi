from xo.v1 import offload_pb2 as _offload_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("app", "accept_connections")
    APP_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    app: str
    accept_connections: bool
    def __init__(self, app: _Optional[str] = ..., accept_connections: _Optional[bool] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("ok", "detail", "agent", "ktls")
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    KTLS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    detail: str
    agent: str
    ktls: bool
    def __init__(self, ok: _Optional[bool] = ..., detail: _Optional[str] = ..., agent: _Optional[str] = ..., ktls: _Optional[bool] = ...) -> None: ...

class OffloadRequest(_message.Message):
    __slots__ = ("request_id", "target", "preread", "app_state", "app", "expected_bytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PREREAD_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    target: str
    preread: bytes
    app_state: bytes
    app: str
    expected_bytes: int
    def __init__(self, request_id: _Optional[int] = ..., target: _Optional[str] = ..., preread: _Optional[bytes] = ..., app_state: _Optional[bytes] = ..., app: _Optional[str] = ..., expected_bytes: _Optional[int] = ...) -> None: ...

class OffloadResult(_message.Message):
    __slots__ = ("request_id", "accepted", "handoff_id", "reason", "detail")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    accepted: bool
    handoff_id: str
    reason: _offload_pb2.Reason
    detail: str
    def __init__(self, request_id: _Optional[int] = ..., accepted: _Optional[bool] = ..., handoff_id: _Optional[str] = ..., reason: _Optional[_Union[_offload_pb2.Reason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class HandedIn(_message.Message):
    __slots__ = ("handoff_id", "flow", "preread", "app_state")
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    PREREAD_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    flow: _offload_pb2.Flow
    preread: bytes
    app_state: bytes
    def __init__(self, handoff_id: _Optional[str] = ..., flow: _Optional[_Union[_offload_pb2.Flow, _Mapping]] = ..., preread: _Optional[bytes] = ..., app_state: _Optional[bytes] = ...) -> None: ...

class GiveBack(_message.Message):
    __slots__ = ("handoff_id", "preread", "app_state")
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    PREREAD_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    preread: bytes
    app_state: bytes
    def __init__(self, handoff_id: _Optional[str] = ..., preread: _Optional[bytes] = ..., app_state: _Optional[bytes] = ...) -> None: ...

class GiveBackResult(_message.Message):
    __slots__ = ("handoff_id", "ok", "detail")
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    ok: bool
    detail: str
    def __init__(self, handoff_id: _Optional[str] = ..., ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class Returned(_message.Message):
    __slots__ = ("handoff_id", "flow", "reason", "preread", "app_state")
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREREAD_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    flow: _offload_pb2.Flow
    reason: _offload_pb2.Reason
    preread: bytes
    app_state: bytes
    def __init__(self, handoff_id: _Optional[str] = ..., flow: _Optional[_Union[_offload_pb2.Flow, _Mapping]] = ..., reason: _Optional[_Union[_offload_pb2.Reason, str]] = ..., preread: _Optional[bytes] = ..., app_state: _Optional[bytes] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlowStatus(_message.Message):
    __slots__ = ("role", "handoff_id", "flow", "target", "peer", "app", "state", "ebpf_rule", "hw_rule", "age_s", "packets", "bytes")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EBPF_RULE_FIELD_NUMBER: _ClassVar[int]
    HW_RULE_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    PACKETS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    role: str
    handoff_id: str
    flow: _offload_pb2.Flow
    target: _offload_pb2.Endpoint
    peer: str
    app: str
    state: str
    ebpf_rule: str
    hw_rule: str
    age_s: float
    packets: int
    bytes: int
    def __init__(self, role: _Optional[str] = ..., handoff_id: _Optional[str] = ..., flow: _Optional[_Union[_offload_pb2.Flow, _Mapping]] = ..., target: _Optional[_Union[_offload_pb2.Endpoint, _Mapping]] = ..., peer: _Optional[str] = ..., app: _Optional[str] = ..., state: _Optional[str] = ..., ebpf_rule: _Optional[str] = ..., hw_rule: _Optional[str] = ..., age_s: _Optional[float] = ..., packets: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class PeerStatus(_message.Message):
    __slots__ = ("name", "address", "healthy", "failed_checks", "flows", "rtt_ms", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    FAILED_CHECKS_FIELD_NUMBER: _ClassVar[int]
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    RTT_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    healthy: bool
    failed_checks: int
    flows: int
    rtt_ms: float
    detail: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., healthy: _Optional[bool] = ..., failed_checks: _Optional[int] = ..., flows: _Optional[int] = ..., rtt_ms: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("agent", "interface", "uptime_s", "reattached", "flows", "peers", "hw_queue_depth", "refusals", "datapath", "apps")
    class RefusalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DatapathEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class AppsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    AGENT_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REATTACHED_FIELD_NUMBER: _ClassVar[int]
    FLOWS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    HW_QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    REFUSALS_FIELD_NUMBER: _ClassVar[int]
    DATAPATH_FIELD_NUMBER: _ClassVar[int]
    APPS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    interface: str
    uptime_s: float
    reattached: bool
    flows: _containers.RepeatedCompositeFieldContainer[FlowStatus]
    peers: _containers.RepeatedCompositeFieldContainer[PeerStatus]
    hw_queue_depth: int
    refusals: _containers.ScalarMap[str, int]
    datapath: _containers.ScalarMap[str, int]
    apps: _containers.ScalarMap[str, int]
    def __init__(self, agent: _Optional[str] = ..., interface: _Optional[str] = ..., uptime_s: _Optional[float] = ..., reattached: _Optional[bool] = ..., flows: _Optional[_Iterable[_Union[FlowStatus, _Mapping]]] = ..., peers: _Optional[_Iterable[_Union[PeerStatus, _Mapping]]] = ..., hw_queue_depth: _Optional[int] = ..., refusals: _Optional[_Mapping[str, int]] = ..., datapath: _Optional[_Mapping[str, int]] = ..., apps: _Optional[_Mapping[str, int]] = ...) -> None: ...

class LocalMessage(_message.Message):
    __slots__ = ("hello", "hello_reply", "offload", "offload_result", "handed_in", "give_back", "give_back_result", "returned", "status", "status_reply")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HELLO_REPLY_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_FIELD_NUMBER: _ClassVar[int]
    OFFLOAD_RESULT_FIELD_NUMBER: _ClassVar[int]
    HANDED_IN_FIELD_NUMBER: _ClassVar[int]
    GIVE_BACK_FIELD_NUMBER: _ClassVar[int]
    GIVE_BACK_RESULT_FIELD_NUMBER: _ClassVar[int]
    RETURNED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REPLY_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    hello_reply: HelloReply
    offload: OffloadRequest
    offload_result: OffloadResult
    handed_in: HandedIn
    give_back: GiveBack
    give_back_result: GiveBackResult
    returned: Returned
    status: StatusRequest
    status_reply: StatusReply
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., hello_reply: _Optional[_Union[HelloReply, _Mapping]] = ..., offload: _Optional[_Union[OffloadRequest, _Mapping]] = ..., offload_result: _Optional[_Union[OffloadResult, _Mapping]] = ..., handed_in: _Optional[_Union[HandedIn, _Mapping]] = ..., give_back: _Optional[_Union[GiveBack, _Mapping]] = ..., give_back_result: _Optional[_Union[GiveBackResult, _Mapping]] = ..., returned: _Optional[_Union[Returned, _Mapping]] = ..., status: _Optional[_Union[StatusRequest, _Mapping]] = ..., status_reply: _Optional[_Union[StatusReply, _Mapping]] = ...) -> None: ...
