/*
 * A small protobuf codec for proto/xo/v1/local.proto (the app <-> xo agent unix-socket API).
 * nginx links no protobuf library, and the few messages here only need varints and
 * length-delimited fields. Decoding is zero-copy: byte fields point into the input buffer.
 * Plain C (no nginx types), so the unit tests can load it on its own.
 */
#ifndef XO_LOCAL_CODEC_H
#define XO_LOCAL_CODEC_H

#include <stddef.h>
#include <stdint.h>

/* LocalMessage.body oneof field numbers. */
enum xo_local_type {
    XO_MSG_NONE = 0,
    XO_MSG_HELLO = 1,
    XO_MSG_HELLO_REPLY = 2,
    XO_MSG_OFFLOAD = 3,
    XO_MSG_OFFLOAD_RESULT = 4,
    XO_MSG_HANDED_IN = 5,
    XO_MSG_GIVE_BACK = 6,
    XO_MSG_GIVE_BACK_RESULT = 7,
    XO_MSG_RETURNED = 8,
    XO_MSG_MAX = 8
};

/* xo.v1.Reason values the module acts on. */
enum xo_local_reason {
    XO_REASON_UNSPECIFIED = 0,
    XO_REASON_DONE = 1,
    XO_REASON_CLIENT_CLOSED = 2,
    XO_REASON_CLIENT_RESET = 3
};

/* Errors returned (negated) by the codec. */
enum xo_local_error {
    XO_CODEC_OK = 0,
    XO_CODEC_TRUNCATED = 1,
    XO_CODEC_BAD_WIRE_TYPE = 2,
    XO_CODEC_UNKNOWN_TYPE = 3,
    XO_CODEC_NO_SPACE = 4,
    XO_CODEC_BAD_FIELD = 5
};

typedef struct {
    const uint8_t *data;
    size_t len;
} xo_bytes_t;

typedef struct {
    xo_bytes_t addr; /* 4 or 16 bytes, network order */
    uint32_t port;
} xo_endpoint_t;

/* A proto3 `optional uint64`: `set` tells an absent field ("unknown") from a sent 0. */
typedef struct {
    int set;
    uint64_t value;
} xo_opt_u64_t;

/*
 * The union of every message's fields; `type` says which message it is. Field names follow the
 * proto: `flag` is Hello.accept_connections, HelloReply.ok, OffloadResult.accepted and
 * GiveBackResult.ok.
 */
typedef struct {
    enum xo_local_type type;
    uint64_t request_id;
    uint32_t reason;
    int flag;
    int ktls;
    int has_flow;
    xo_bytes_t app;
    xo_bytes_t target;
    xo_bytes_t preread;
    xo_bytes_t app_state;
    xo_bytes_t handoff_id;
    xo_bytes_t detail;
    xo_bytes_t agent;
    xo_endpoint_t client;
    xo_endpoint_t vip;
    xo_opt_u64_t expected_bytes; /* OffloadRequest: bytes the target will send, if known */
} xo_local_msg_t;

/* Bytes xo_local_encode needs for msg (without the 4-byte frame header). */
size_t xo_local_encoded_size(const xo_local_msg_t *msg);

/* Serializes msg as a LocalMessage into out; returns its length or -xo_local_error. */
long xo_local_encode(const xo_local_msg_t *msg, uint8_t *out, size_t cap);

/* Parses a serialized LocalMessage; returns 0 or -xo_local_error. Unknown fields are skipped. */
int xo_local_decode(const uint8_t *in, size_t len, xo_local_msg_t *msg);

/* A static description of a codec error code (positive or negated). */
const char *xo_local_strerror(int err);

#endif
