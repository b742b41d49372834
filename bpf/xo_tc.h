/* XO flow table: the map layout shared by bpf/xo_tc.c and xo/datapath/layout.py.
 *
 * Why one header: the Python side mirrors these structs field by field (ctypes) and checks the
 * sizes against what BCC compiled at every attach; tests/unit/test_datapath_layout.py checks
 * the constants below against xo.datapath.layout. Change both together.
 *
 * Addresses and ports are stored in network byte order, exactly as they are on the wire, so
 * the program compares and copies them without conversion. IPv4 addresses use word 0 of the
 * 16-byte arrays; the other words are zero.
 */
#ifndef XO_TC_H
#define XO_TC_H

/* Actions */
#define XO_ACT_PASS 0     /* count, deliver unchanged */
#define XO_ACT_BLOCK 1    /* count, drop (a connection being captured or restored) */
#define XO_ACT_REDIRECT 2 /* rewrite dst MAC/IP/port + src MAC, redirect out ifindex */
#define XO_ACT_SNAT 3     /* rewrite src IP/port, deliver */

/* Directions (part of the key: ingress and egress entries of one flow are distinct) */
#define XO_DIR_INGRESS 0
#define XO_DIR_EGRESS 1

/* Global counters (array map indexes) */
#define XO_CNT_PASSED 0     /* matched a PASS entry */
#define XO_CNT_BLOCKED 1    /* dropped by a BLOCK entry */
#define XO_CNT_REDIRECTED 2 /* rewritten and redirected */
#define XO_CNT_SNATTED 3    /* source rewritten */
#define XO_CNT_ERRORS 4     /* a rewrite or redirect helper failed: the packet was dropped */
#define XO_CNT_MAX 5

#define XO_MAC_LEN 6

struct xo_flow_key {
    __u32 src[4];
    __u32 dst[4];
    __u16 sport;
    __u16 dport;
    __u8 family; /* 4 or 6 */
    __u8 dir;    /* XO_DIR_* */
    __u8 pad[2];
};

struct xo_flow_action {
    __u32 action;  /* XO_ACT_* */
    __u32 ifindex; /* REDIRECT: out this interface (egress) */
    __u32 addr[4]; /* REDIRECT: new destination; SNAT: new source */
    __u16 port;    /* REDIRECT: new destination port; SNAT: new source port */
    __u8 dst_mac[XO_MAC_LEN]; /* REDIRECT only */
    __u8 src_mac[XO_MAC_LEN]; /* REDIRECT only */
    __u8 pad[2];
};

struct xo_flow_stats {
    __u64 packets;
    __u64 bytes;
};

#endif
