"""Linux kernel constants and struct layouts XO uses, in one place.

Every value here is a copy of a Linux uapi definition (include/uapi/linux/tcp.h, tls.h,
sockios.h, in.h). tests/unit/test_uapi.py checks each against the installed kernel headers,
so a typo cannot hide. Netlink attribute layouts for tc kinds live in their pyroute2 plugin
modules (xo/tc/), following pyroute2's one-module-per-kind style.
"""

from __future__ import annotations

import struct

# --- socket levels -----------------------------------------------------------------------
SOL_TCP = 6
SOL_TLS = 282

# --- include/uapi/linux/tcp.h --------------------------------------------------------------
TCP_MAXSEG = 2
TCP_INFO = 11
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_ULP = 31
TCP_ULP_NAME_MAX = 16  # include/net/tcp.h: getsockopt(TCP_ULP) returns at most this

TCP_REPAIR_ON = 1
TCP_REPAIR_OFF = 0
TCP_REPAIR_OFF_NO_WP = -1

# enum { TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE, TCP_QUEUES_NR }
TCP_NO_QUEUE = 0
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2

# TCP option kinds accepted by TCP_REPAIR_OPTIONS
TCPOPT_MSS = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8

TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_WSCALE = 4

# enum tcp states (include/net/tcp_states.h; exposed in tcp_info.tcpi_state)
TCP_ESTABLISHED = 1
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9

# include/net/tcp.h (kernel-internal, but they bound what the uapi accepts)
TCP_MIN_MSS = 88  # smallest MSS the kernel accepts
MAX_TCP_WINDOW = 32767  # largest value setsockopt(TCP_MAXSEG) accepts
TCP_MAX_WSCALE = 14  # largest window scale shift (RFC 7323)

# struct tcp_repair_opt { __u32 opt_code; __u32 opt_val; }
TCP_REPAIR_OPT = struct.Struct("=II")
# struct tcp_repair_window { snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup } (5 x __u32)
TCP_REPAIR_WINDOW_STRUCT = struct.Struct("=IIIII")
# The head of struct tcp_info we read: state, ca_state, retransmits, probes, backoff,
# options, (snd_wscale:4 | rcv_wscale:4), (delivery_rate_app_limited:1 | fastopen_client_fail:2)
TCP_INFO_HEAD = struct.Struct("=BBBBBBBB")
TCP_INFO_LEN = 232  # read generously; the kernel copies min(len, sizeof(struct tcp_info))
# tcpi_bytes_sent, tcpi_bytes_retrans (__u64 each, at this offset): bytes put on the wire,
# so new data sent = delta(sent) - delta(retrans), unlike snd_nxt which repair can move.
TCP_INFO_BYTES_SENT_OFFSET = 200
TCP_INFO_BYTES_SENT = struct.Struct("=QQ")

# --- include/uapi/asm-generic/socket.h -------------------------------------------------------
# Like SO_SNDBUF/SO_RCVBUF but ignore net.core.[rw]mem_max (need CAP_NET_ADMIN). The kernel
# stores min(val, INT_MAX / 2) * 2, so the largest buffer a socket can have is INT_MAX - 1.
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SOCK_BUF_MAX = 2**31 - 2

# --- include/uapi/asm-generic/sockios.h + linux/sockios.h ----------------------------------
SIOCINQ = 0x541B  # FIONREAD: bytes in the receive queue
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in the send queue (unacked + unsent)
SIOCOUTQNSD = 0x894B  # bytes in the send queue not yet sent

# --- include/uapi/linux/in.h ----------------------------------------------------------------
IP_FREEBIND = 15
IP_TRANSPARENT = 19

# --- include/uapi/linux/tls.h ---------------------------------------------------------------
TLS_TX = 1
TLS_RX = 2
# cmsg types at SOL_TLS: send a record of another content type / the type of a received one
TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304

TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

# struct tls_crypto_info { __u16 version; __u16 cipher_type; }
TLS_CRYPTO_INFO = struct.Struct("=HH")


class TlsCipherLayout:
    """Field sizes of one struct tls12_crypto_info_<cipher>: header, iv, key, salt, rec_seq."""

    def __init__(self, name: str, cipher_type: int, iv: int, key: int, salt: int, rec_seq: int):
        self.name = name
        self.cipher_type = cipher_type
        self.iv = iv
        self.key = key
        self.salt = salt
        self.rec_seq = rec_seq
        # The kernel struct orders the fields: info, iv, key, salt, rec_seq.
        self.struct = struct.Struct(f"=HH{iv}s{key}s{salt}s{rec_seq}s")

    @property
    def size(self) -> int:
        return self.struct.size


TLS_CIPHERS: dict[int, TlsCipherLayout] = {
    TLS_CIPHER_AES_GCM_128: TlsCipherLayout("aes-gcm-128", TLS_CIPHER_AES_GCM_128, 8, 16, 4, 8),
    TLS_CIPHER_AES_GCM_256: TlsCipherLayout("aes-gcm-256", TLS_CIPHER_AES_GCM_256, 8, 32, 4, 8),
    TLS_CIPHER_CHACHA20_POLY1305: TlsCipherLayout(
        "chacha20-poly1305", TLS_CIPHER_CHACHA20_POLY1305, 12, 32, 0, 8
    ),
}
