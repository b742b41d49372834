"""Live TCP connection state: capture a socket with TCP_REPAIR, restore it elsewhere.

    freezer.freeze(inbound_flow(sock))   # xo.freeze: stop the peer's packets first
    state = xo.tcp.capture(sock)         # socket left in repair mode
    wire = state.to_bytes()              # the xo.v1.TcpState protobuf message
    xo.tcp.release(sock)                 # close without FIN/RST (or resume(sock) to keep it)
    ... elsewhere (its egress rewrite in place first):
    sock = xo.tcp.restore(TcpState.from_bytes(wire), local=Endpoint.parse("10.0.0.2:7000"),
                          probe=False)
    ... once the owner's redirect is in place:
    xo.tcp.nudge(sock)                   # window probe: the peer answers with its ACK now

See docs/tcp.md for the recipe, its pitfalls and the measured costs.
"""

from xo.tcp.capture import capture, release, resume
from xo.tcp.errors import (
    AddressInUseError,
    CaptureError,
    NotEstablishedError,
    QueueTooLargeError,
    RepairPermissionError,
    RestoreError,
    StateFormatError,
    StateVersionError,
    SyscallError,
    TcpError,
)
from xo.tcp.restore import nudge, restore
from xo.tcp.state import TCP_STATE_VERSION, TcpState, TcpWindow

__all__ = [
    "TCP_STATE_VERSION",
    "AddressInUseError",
    "CaptureError",
    "NotEstablishedError",
    "QueueTooLargeError",
    "RepairPermissionError",
    "RestoreError",
    "StateFormatError",
    "StateVersionError",
    "SyscallError",
    "TcpError",
    "TcpState",
    "TcpWindow",
    "capture",
    "nudge",
    "release",
    "restore",
    "resume",
]
