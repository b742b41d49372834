from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TlsVersion(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TLS_VERSION_UNSPECIFIED: _ClassVar[TlsVersion]
    TLS_1_2: _ClassVar[TlsVersion]
    TLS_1_3: _ClassVar[TlsVersion]

class TlsCipher(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TLS_CIPHER_UNSPECIFIED: _ClassVar[TlsCipher]
    AES_GCM_128: _ClassVar[TlsCipher]
    AES_GCM_256: _ClassVar[TlsCipher]
    CHACHA20_POLY1305: _ClassVar[TlsCipher]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    DONE: _ClassVar[Reason]
    CLIENT_CLOSED: _ClassVar[Reason]
    CLIENT_RESET: _ClassVar[Reason]
    REFUSED: _ClassVar[Reason]
    TIMEOUT: _ClassVar[Reason]
    INTERNAL: _ClassVar[Reason]
    UNSUPPORTED: _ClassVar[Reason]
    SHUTDOWN: _ClassVar[Reason]
TLS_VERSION_UNSPECIFIED: TlsVersion
TLS_1_2: TlsVersion
TLS_1_3: TlsVersion
TLS_CIPHER_UNSPECIFIED: TlsCipher
AES_GCM_128: TlsCipher
AES_GCM_256: TlsCipher
CHACHA20_POLY1305: TlsCipher
REASON_UNSPECIFIED: Reason
DONE: Reason
CLIENT_CLOSED: Reason
CLIENT_RESET: Reason
REFUSED: Reason
TIMEOUT: Reason
INTERNAL: Reason
UNSUPPORTED: Reason
SHUTDOWN: Reason

class Endpoint(_message.Message):
    __slots__ = ("addr", "port")
    ADDR_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    addr: bytes
    port: int
    def __init__(self, addr: _Optional[bytes] = ..., port: _Optional[int] = ...) -> None: ...

class TcpWindow(_message.Message):
    __slots__ = ("snd_wl1", "snd_wnd", "max_window", "rcv_wnd", "rcv_wup")
    SND_WL1_FIELD_NUMBER: _ClassVar[int]
    SND_WND_FIELD_NUMBER: _ClassVar[int]
    MAX_WINDOW_FIELD_NUMBER: _ClassVar[int]
    RCV_WND_FIELD_NUMBER: _ClassVar[int]
    RCV_WUP_FIELD_NUMBER: _ClassVar[int]
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    def __init__(self, snd_wl1: _Optional[int] = ..., snd_wnd: _Optional[int] = ..., max_window: _Optional[int] = ..., rcv_wnd: _Optional[int] = ..., rcv_wup: _Optional[int] = ...) -> None: ...

class TcpState(_message.Message):
    __slots__ = ("version", "local", "remote", "send_seq", "recv_seq", "recv_queue", "send_unacked", "send_unsent", "mss_clamp", "snd_wscale", "rcv_wscale", "sack_ok", "timestamps_ok", "timestamp", "window", "sndbuf", "rcvbuf")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    SEND_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECV_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECV_QUEUE_FIELD_NUMBER: _ClassVar[int]
    SEND_UNACKED_FIELD_NUMBER: _ClassVar[int]
    SEND_UNSENT_FIELD_NUMBER: _ClassVar[int]
    MSS_CLAMP_FIELD_NUMBER: _ClassVar[int]
    SND_WSCALE_FIELD_NUMBER: _ClassVar[int]
    RCV_WSCALE_FIELD_NUMBER: _ClassVar[int]
    SACK_OK_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_OK_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SNDBUF_FIELD_NUMBER: _ClassVar[int]
    RCVBUF_FIELD_NUMBER: _ClassVar[int]
    version: int
    local: Endpoint
    remote: Endpoint
    send_seq: int
    recv_seq: int
    recv_queue: bytes
    send_unacked: bytes
    send_unsent: bytes
    mss_clamp: int
    snd_wscale: int
    rcv_wscale: int
    sack_ok: bool
    timestamps_ok: bool
    timestamp: int
    window: TcpWindow
    sndbuf: int
    rcvbuf: int
    def __init__(self, version: _Optional[int] = ..., local: _Optional[_Union[Endpoint, _Mapping]] = ..., remote: _Optional[_Union[Endpoint, _Mapping]] = ..., send_seq: _Optional[int] = ..., recv_seq: _Optional[int] = ..., recv_queue: _Optional[bytes] = ..., send_unacked: _Optional[bytes] = ..., send_unsent: _Optional[bytes] = ..., mss_clamp: _Optional[int] = ..., snd_wscale: _Optional[int] = ..., rcv_wscale: _Optional[int] = ..., sack_ok: _Optional[bool] = ..., timestamps_ok: _Optional[bool] = ..., timestamp: _Optional[int] = ..., window: _Optional[_Union[TcpWindow, _Mapping]] = ..., sndbuf: _Optional[int] = ..., rcvbuf: _Optional[int] = ...) -> None: ...

class TlsDirection(_message.Message):
    __slots__ = ("key", "iv", "salt", "rec_seq")
    KEY_FIELD_NUMBER: _ClassVar[int]
    IV_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    REC_SEQ_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    iv: bytes
    salt: bytes
    rec_seq: bytes
    def __init__(self, key: _Optional[bytes] = ..., iv: _Optional[bytes] = ..., salt: _Optional[bytes] = ..., rec_seq: _Optional[bytes] = ...) -> None: ...

class TlsState(_message.Message):
    __slots__ = ("version", "tls_version", "cipher", "tx", "rx")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TLS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CIPHER_FIELD_NUMBER: _ClassVar[int]
    TX_FIELD_NUMBER: _ClassVar[int]
    RX_FIELD_NUMBER: _ClassVar[int]
    version: int
    tls_version: TlsVersion
    cipher: TlsCipher
    tx: TlsDirection
    rx: TlsDirection
    def __init__(self, version: _Optional[int] = ..., tls_version: _Optional[_Union[TlsVersion, str]] = ..., cipher: _Optional[_Union[TlsCipher, str]] = ..., tx: _Optional[_Union[TlsDirection, _Mapping]] = ..., rx: _Optional[_Union[TlsDirection, _Mapping]] = ...) -> None: ...

class Flow(_message.Message):
    __slots__ = ("client", "vip")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    VIP_FIELD_NUMBER: _ClassVar[int]
    client: Endpoint
    vip: Endpoint
    def __init__(self, client: _Optional[_Union[Endpoint, _Mapping]] = ..., vip: _Optional[_Union[Endpoint, _Mapping]] = ...) -> None: ...

class HandoffRequest(_message.Message):
    __slots__ = ("handoff_id", "flow", "tcp", "tls", "preread", "app_state", "app", "target")
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    TCP_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    PREREAD_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    APP_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    flow: Flow
    tcp: TcpState
    tls: TlsState
    preread: bytes
    app_state: bytes
    app: str
    target: Endpoint
    def __init__(self, handoff_id: _Optional[str] = ..., flow: _Optional[_Union[Flow, _Mapping]] = ..., tcp: _Optional[_Union[TcpState, _Mapping]] = ..., tls: _Optional[_Union[TlsState, _Mapping]] = ..., preread: _Optional[bytes] = ..., app_state: _Optional[bytes] = ..., app: _Optional[str] = ..., target: _Optional[_Union[Endpoint, _Mapping]] = ...) -> None: ...

class HandoffReply(_message.Message):
    __slots__ = ("accepted", "reason", "detail", "target_mac")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TARGET_MAC_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: Reason
    detail: str
    target_mac: bytes
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[_Union[Reason, str]] = ..., detail: _Optional[str] = ..., target_mac: _Optional[bytes] = ...) -> None: ...

class ReadyRequest(_message.Message):
    __slots__ = ("handoff_id",)
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    def __init__(self, handoff_id: _Optional[str] = ...) -> None: ...

class ReadyReply(_message.Message):
    __slots__ = ("ok", "detail")
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    detail: str
    def __init__(self, ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class EndRequest(_message.Message):
    __slots__ = ("handoff_id", "flow", "reason", "tcp", "tls", "preread", "app_state")
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TCP_FIELD_NUMBER: _ClassVar[int]
    TLS_FIELD_NUMBER: _ClassVar[int]
    PREREAD_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    flow: Flow
    reason: Reason
    tcp: TcpState
    tls: TlsState
    preread: bytes
    app_state: bytes
    def __init__(self, handoff_id: _Optional[str] = ..., flow: _Optional[_Union[Flow, _Mapping]] = ..., reason: _Optional[_Union[Reason, str]] = ..., tcp: _Optional[_Union[TcpState, _Mapping]] = ..., tls: _Optional[_Union[TlsState, _Mapping]] = ..., preread: _Optional[bytes] = ..., app_state: _Optional[bytes] = ...) -> None: ...

class EndReply(_message.Message):
    __slots__ = ("ok", "detail")
    OK_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    detail: str
    def __init__(self, ok: _Optional[bool] = ..., detail: _Optional[str] = ...) -> None: ...

class PeerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("name", "protocol", "handoff_addresses", "handoff_port_min", "handoff_port_max", "ktls", "active_flows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_PORT_MIN_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_PORT_MAX_FIELD_NUMBER: _ClassVar[int]
    KTLS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FLOWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    protocol: int
    handoff_addresses: _containers.RepeatedCompositeFieldContainer[Endpoint]
    handoff_port_min: int
    handoff_port_max: int
    ktls: bool
    active_flows: int
    def __init__(self, name: _Optional[str] = ..., protocol: _Optional[int] = ..., handoff_addresses: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., handoff_port_min: _Optional[int] = ..., handoff_port_max: _Optional[int] = ..., ktls: _Optional[bool] = ..., active_flows: _Optional[int] = ...) -> None: ...

class PeerMessage(_message.Message):
    __slots__ = ("id", "timeout_ms", "handoff", "handoff_reply", "ready", "ready_reply", "end", "end_reply")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_REPLY_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    READY_REPLY_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    END_REPLY_FIELD_NUMBER: _ClassVar[int]
    id: int
    timeout_ms: int
    handoff: HandoffRequest
    handoff_reply: HandoffReply
    ready: ReadyRequest
    ready_reply: ReadyReply
    end: EndRequest
    end_reply: EndReply
    def __init__(self, id: _Optional[int] = ..., timeout_ms: _Optional[int] = ..., handoff: _Optional[_Union[HandoffRequest, _Mapping]] = ..., handoff_reply: _Optional[_Union[HandoffReply, _Mapping]] = ..., ready: _Optional[_Union[ReadyRequest, _Mapping]] = ..., ready_reply: _Optional[_Union[ReadyReply, _Mapping]] = ..., end: _Optional[_Union[EndRequest, _Mapping]] = ..., end_reply: _Optional[_Union[EndReply, _Mapping]] = ...) -> None: ...
