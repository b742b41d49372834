/*
 * Protobuf codec for the LocalMessage subset of proto/xo/v1/local.proto; see xo_local_codec.h.
 * Each message is described by a table of (field number, kind, struct offset), so encoding and
 * decoding share one description and stay in step with the .proto.
 */
#include "xo_local_codec.h"

#include <string.h>

enum { WIRE_VARINT = 0, WIRE_I64 = 1, WIRE_LEN = 2, WIRE_I32 = 5 };
enum { KIND_U64, KIND_U32, KIND_BOOL, KIND_BYTES, KIND_FLOW, KIND_OPT_U64 };
enum { FLOW_CLIENT = 1, FLOW_VIP = 2, ENDPOINT_ADDR = 1, ENDPOINT_PORT = 2 };
#define VARINT_MAX_BYTES 10
#define VARINT_PAYLOAD_BITS 7
#define VARINT_MORE 0x80u
#define VARINT_PAYLOAD 0x7fu
#define TAG_WIRE_BITS 3
#define TAG_WIRE_MASK 7u

typedef struct {
    uint8_t num;
    uint8_t kind;
    size_t off;
} field_t;

#define F(num, kind, member) { num, kind, offsetof(xo_local_msg_t, member) }
#define END { 0, 0, 0 }

static const field_t hello[] = { F(1, KIND_BYTES, app), F(2, KIND_BOOL, flag), END };
static const field_t hello_reply[] = {
    F(1, KIND_BOOL, flag), F(2, KIND_BYTES, detail), F(3, KIND_BYTES, agent),
    F(4, KIND_BOOL, ktls), END };
static const field_t offload[] = {
    F(1, KIND_U64, request_id), F(2, KIND_BYTES, target), F(3, KIND_BYTES, preread),
    F(4, KIND_BYTES, app_state), F(5, KIND_BYTES, app), F(6, KIND_OPT_U64, expected_bytes),
    END };
static const field_t offload_result[] = {
    F(1, KIND_U64, request_id), F(2, KIND_BOOL, flag), F(3, KIND_BYTES, handoff_id),
    F(4, KIND_U32, reason), F(5, KIND_BYTES, detail), END };
static const field_t handed_in[] = {
    F(1, KIND_BYTES, handoff_id), F(2, KIND_FLOW, client), F(3, KIND_BYTES, preread),
    F(4, KIND_BYTES, app_state), END };
static const field_t give_back[] = {
    F(1, KIND_BYTES, handoff_id), F(2, KIND_BYTES, preread), F(3, KIND_BYTES, app_state), END };
static const field_t give_back_result[] = {
    F(1, KIND_BYTES, handoff_id), F(2, KIND_BOOL, flag), F(3, KIND_BYTES, detail), END };
static const field_t returned[] = {
    F(1, KIND_BYTES, handoff_id), F(2, KIND_FLOW, client), F(3, KIND_U32, reason),
    F(4, KIND_BYTES, preread), F(5, KIND_BYTES, app_state), END };

static const field_t *const messages[XO_MSG_MAX + 1] = {
    NULL, hello, hello_reply, offload, offload_result, handed_in, give_back, give_back_result,
    returned };

/* ---- sizes ---------------------------------------------------------------------------- */

static size_t varint_size(uint64_t v)
{
    size_t n = 1;

    while (v >> VARINT_PAYLOAD_BITS) {
        v >>= VARINT_PAYLOAD_BITS;
        n++;
    }
    return n;
}

static size_t len_field_size(size_t len)
{
    return 1 + varint_size(len) + len; /* field numbers here are < 16: a one-byte tag */
}

static size_t endpoint_size(const xo_endpoint_t *ep)
{
    size_t n = 0;

    if (ep->addr.len) {
        n += len_field_size(ep->addr.len);
    }
    if (ep->port) {
        n += 1 + varint_size(ep->port);
    }
    return n;
}

static int endpoint_set(const xo_endpoint_t *ep)
{
    return ep->addr.len != 0 || ep->port != 0;
}

static size_t flow_size(const xo_local_msg_t *msg)
{
    size_t n = 0;

    if (endpoint_set(&msg->client)) {
        n += len_field_size(endpoint_size(&msg->client));
    }
    if (endpoint_set(&msg->vip)) {
        n += len_field_size(endpoint_size(&msg->vip));
    }
    return n;
}

static size_t body_size(const xo_local_msg_t *msg)
{
    const field_t *f;
    const char *base = (const char *) msg;
    size_t n = 0;

    for (f = messages[msg->type]; f->num; f++) {
        switch (f->kind) {
        case KIND_U64: {
            uint64_t v = *(const uint64_t *) (base + f->off);
            n += v ? 1 + varint_size(v) : 0;
            break;
        }
        case KIND_U32: {
            uint32_t v = *(const uint32_t *) (base + f->off);
            n += v ? 1 + varint_size(v) : 0;
            break;
        }
        case KIND_BOOL:
            n += *(const int *) (base + f->off) ? 2 : 0;
            break;
        case KIND_OPT_U64: {
            const xo_opt_u64_t *o = (const xo_opt_u64_t *) (base + f->off);
            n += o->set ? 1 + varint_size(o->value) : 0;
            break;
        }
        case KIND_BYTES: {
            const xo_bytes_t *b = (const xo_bytes_t *) (base + f->off);
            n += b->len ? len_field_size(b->len) : 0;
            break;
        }
        case KIND_FLOW:
            n += msg->has_flow ? len_field_size(flow_size(msg)) : 0;
            break;
        }
    }
    return n;
}

size_t xo_local_encoded_size(const xo_local_msg_t *msg)
{
    if (msg->type <= XO_MSG_NONE || msg->type > XO_MSG_MAX) {
        return 0;
    }
    return len_field_size(body_size(msg));
}

/* ---- encoding ------------------------------------------------------------------------- */

static uint8_t *put_varint(uint8_t *p, uint64_t v)
{
    while (v >> VARINT_PAYLOAD_BITS) {
        *p++ = (uint8_t) ((v & VARINT_PAYLOAD) | VARINT_MORE);
        v >>= VARINT_PAYLOAD_BITS;
    }
    *p++ = (uint8_t) v;
    return p;
}

static uint8_t *put_tag(uint8_t *p, unsigned num, unsigned wire)
{
    return put_varint(p, (uint64_t) num << TAG_WIRE_BITS | wire);
}

static uint8_t *put_bytes(uint8_t *p, unsigned num, const uint8_t *data, size_t len)
{
    p = put_tag(p, num, WIRE_LEN);
    p = put_varint(p, len);
    if (len) {
        memcpy(p, data, len);
    }
    return p + len;
}

static uint8_t *put_endpoint(uint8_t *p, unsigned num, const xo_endpoint_t *ep)
{
    p = put_tag(p, num, WIRE_LEN);
    p = put_varint(p, endpoint_size(ep));
    if (ep->addr.len) {
        p = put_bytes(p, ENDPOINT_ADDR, ep->addr.data, ep->addr.len);
    }
    if (ep->port) {
        p = put_tag(p, ENDPOINT_PORT, WIRE_VARINT);
        p = put_varint(p, ep->port);
    }
    return p;
}

static uint8_t *put_flow(uint8_t *p, unsigned num, const xo_local_msg_t *msg)
{
    p = put_tag(p, num, WIRE_LEN);
    p = put_varint(p, flow_size(msg));
    if (endpoint_set(&msg->client)) {
        p = put_endpoint(p, FLOW_CLIENT, &msg->client);
    }
    if (endpoint_set(&msg->vip)) {
        p = put_endpoint(p, FLOW_VIP, &msg->vip);
    }
    return p;
}

long xo_local_encode(const xo_local_msg_t *msg, uint8_t *out, size_t cap)
{
    const field_t *f;
    const char *base = (const char *) msg;
    uint8_t *p = out;

    if (msg->type <= XO_MSG_NONE || msg->type > XO_MSG_MAX) {
        return -XO_CODEC_UNKNOWN_TYPE;
    }
    if (xo_local_encoded_size(msg) > cap) {
        return -XO_CODEC_NO_SPACE;
    }
    p = put_tag(p, (unsigned) msg->type, WIRE_LEN);
    p = put_varint(p, body_size(msg));
    for (f = messages[msg->type]; f->num; f++) {
        switch (f->kind) {
        case KIND_U64: {
            uint64_t v = *(const uint64_t *) (base + f->off);
            if (v) {
                p = put_varint(put_tag(p, f->num, WIRE_VARINT), v);
            }
            break;
        }
        case KIND_U32: {
            uint32_t v = *(const uint32_t *) (base + f->off);
            if (v) {
                p = put_varint(put_tag(p, f->num, WIRE_VARINT), v);
            }
            break;
        }
        case KIND_BOOL:
            if (*(const int *) (base + f->off)) {
                p = put_varint(put_tag(p, f->num, WIRE_VARINT), 1);
            }
            break;
        case KIND_OPT_U64: {
            const xo_opt_u64_t *o = (const xo_opt_u64_t *) (base + f->off);
            if (o->set) { /* present even when 0: a known empty transfer */
                p = put_varint(put_tag(p, f->num, WIRE_VARINT), o->value);
            }
            break;
        }
        case KIND_BYTES: {
            const xo_bytes_t *b = (const xo_bytes_t *) (base + f->off);
            if (b->len) {
                p = put_bytes(p, f->num, b->data, b->len);
            }
            break;
        }
        case KIND_FLOW:
            if (msg->has_flow) {
                p = put_flow(p, f->num, msg);
            }
            break;
        }
    }
    return (long) (p - out);
}

/* ---- decoding ------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} reader_t;

static int get_varint(reader_t *r, uint64_t *v)
{
    unsigned i, shift = 0;

    *v = 0;
    for (i = 0; i < VARINT_MAX_BYTES; i++) {
        if (r->p >= r->end) {
            return -XO_CODEC_TRUNCATED;
        }
        *v |= (uint64_t) (*r->p & VARINT_PAYLOAD) << shift;
        if (!(*r->p++ & VARINT_MORE)) {
            return 0;
        }
        shift += VARINT_PAYLOAD_BITS;
    }
    return -XO_CODEC_BAD_FIELD;
}

static int get_len(reader_t *r, xo_bytes_t *b)
{
    uint64_t len;
    int rc = get_varint(r, &len);

    if (rc) {
        return rc;
    }
    if (len > (uint64_t) (r->end - r->p)) {
        return -XO_CODEC_TRUNCATED;
    }
    b->data = r->p;
    b->len = (size_t) len;
    r->p += len;
    return 0;
}

static int skip_field(reader_t *r, unsigned wire)
{
    uint64_t v;
    xo_bytes_t b;
    size_t width;

    switch (wire) {
    case WIRE_VARINT:
        return get_varint(r, &v);
    case WIRE_LEN:
        return get_len(r, &b);
    case WIRE_I64:
    case WIRE_I32:
        width = wire == WIRE_I64 ? sizeof(uint64_t) : sizeof(uint32_t);
        if ((size_t) (r->end - r->p) < width) {
            return -XO_CODEC_TRUNCATED;
        }
        r->p += width;
        return 0;
    default:
        return -XO_CODEC_BAD_WIRE_TYPE;
    }
}

/* Reads a tag; *num = 0 at the end of input. */
static int get_tag(reader_t *r, unsigned *num, unsigned *wire)
{
    uint64_t tag;
    int rc;

    if (r->p >= r->end) {
        *num = 0;
        return 0;
    }
    rc = get_varint(r, &tag);
    if (rc) {
        return rc;
    }
    *num = (unsigned) (tag >> TAG_WIRE_BITS);
    *wire = (unsigned) (tag & TAG_WIRE_MASK);
    return *num == 0 ? -XO_CODEC_BAD_FIELD : 0;
}

static int decode_endpoint(xo_bytes_t in, xo_endpoint_t *ep)
{
    reader_t r = { in.data, in.data + in.len };
    unsigned num, wire;
    uint64_t v;
    int rc;

    for (;;) {
        if ((rc = get_tag(&r, &num, &wire)) || num == 0) {
            return rc;
        }
        if (num == ENDPOINT_ADDR && wire == WIRE_LEN) {
            rc = get_len(&r, &ep->addr);
        } else if (num == ENDPOINT_PORT && wire == WIRE_VARINT) {
            rc = get_varint(&r, &v);
            ep->port = (uint32_t) v;
        } else if (num == ENDPOINT_ADDR || num == ENDPOINT_PORT) {
            rc = -XO_CODEC_BAD_WIRE_TYPE;
        } else {
            rc = skip_field(&r, wire);
        }
        if (rc) {
            return rc;
        }
    }
}

static int decode_flow(xo_bytes_t in, xo_local_msg_t *msg)
{
    reader_t r = { in.data, in.data + in.len };
    unsigned num, wire;
    xo_bytes_t sub;
    int rc;

    msg->has_flow = 1;
    for (;;) {
        if ((rc = get_tag(&r, &num, &wire)) || num == 0) {
            return rc;
        }
        if ((num == FLOW_CLIENT || num == FLOW_VIP) && wire != WIRE_LEN) {
            return -XO_CODEC_BAD_WIRE_TYPE;
        }
        if (num == FLOW_CLIENT || num == FLOW_VIP) {
            rc = get_len(&r, &sub);
            if (!rc) {
                rc = decode_endpoint(sub, num == FLOW_CLIENT ? &msg->client : &msg->vip);
            }
        } else {
            rc = skip_field(&r, wire);
        }
        if (rc) {
            return rc;
        }
    }
}

static int decode_field(reader_t *r, const field_t *f, unsigned wire, xo_local_msg_t *msg)
{
    char *base = (char *) msg;
    unsigned want = (f->kind == KIND_BYTES || f->kind == KIND_FLOW) ? WIRE_LEN : WIRE_VARINT;
    xo_bytes_t b;
    uint64_t v;
    int rc;

    if (wire != want) {
        return -XO_CODEC_BAD_WIRE_TYPE;
    }
    if (want == WIRE_LEN) {
        rc = get_len(r, &b);
        if (rc) {
            return rc;
        }
        if (f->kind == KIND_FLOW) {
            return decode_flow(b, msg);
        }
        *(xo_bytes_t *) (base + f->off) = b;
        return 0;
    }
    rc = get_varint(r, &v);
    if (rc) {
        return rc;
    }
    switch (f->kind) {
    case KIND_U64:
        *(uint64_t *) (base + f->off) = v;
        break;
    case KIND_U32:
        *(uint32_t *) (base + f->off) = (uint32_t) v;
        break;
    case KIND_OPT_U64:
        ((xo_opt_u64_t *) (base + f->off))->set = 1;
        ((xo_opt_u64_t *) (base + f->off))->value = v;
        break;
    default:
        *(int *) (base + f->off) = v != 0;
        break;
    }
    return 0;
}

static int decode_body(xo_bytes_t in, xo_local_msg_t *msg)
{
    reader_t r = { in.data, in.data + in.len };
    const field_t *f;
    unsigned num, wire;
    int rc;

    for (;;) {
        if ((rc = get_tag(&r, &num, &wire)) || num == 0) {
            return rc;
        }
        for (f = messages[msg->type]; f->num && f->num != num; f++) {
            /* find the field */
        }
        rc = f->num ? decode_field(&r, f, wire, msg) : skip_field(&r, wire);
        if (rc) {
            return rc;
        }
    }
}

int xo_local_decode(const uint8_t *in, size_t len, xo_local_msg_t *msg)
{
    reader_t r = { in, in + len };
    unsigned num, wire;
    xo_bytes_t body;
    int rc;

    memset(msg, 0, sizeof(*msg));
    for (;;) {
        if ((rc = get_tag(&r, &num, &wire))) {
            return rc;
        }
        if (num == 0) {
            return msg->type == XO_MSG_NONE ? -XO_CODEC_UNKNOWN_TYPE : 0;
        }
        if (num > XO_MSG_MAX) {
            rc = skip_field(&r, wire);
        } else if (wire != WIRE_LEN) {
            rc = -XO_CODEC_BAD_WIRE_TYPE;
        } else if (!(rc = get_len(&r, &body))) {
            /* oneof: a later member replaces an earlier one, as in protobuf */
            memset(msg, 0, sizeof(*msg));
            msg->type = (enum xo_local_type) num;
            rc = decode_body(body, msg);
        }
        if (rc) {
            return rc;
        }
    }
}

const char *xo_local_strerror(int err)
{
    static const char *const text[] = {
        "ok", "truncated message", "unexpected wire type", "no known message in LocalMessage",
        "output buffer too small", "malformed field" };

    if (err < 0) {
        err = -err;
    }
    if ((size_t) err >= sizeof(text) / sizeof(text[0])) {
        return "unknown codec error";
    }
    return text[err];
}
