/* XO TC program pair (clsact ingress + egress, direct action): the per-flow table of
 * PASS / BLOCK / REDIRECT / SNAT described in bpf/xo_tc.h.
 *
 * Compiled by BCC from xo/datapath/program.py, which defines:
 *   XO_MAX_FLOWS                       capacity of the flow table
 *   XO_PIN_FLOWS, XO_PIN_STATS, XO_PIN_COUNTERS   bpffs paths of the three maps
 * Pinned maps outlive the loading process: a restarted agent loads the program again, BCC
 * reopens the pinned maps, and the flows in place are never disturbed.
 *
 * Packets that are not TCP over IPv4/IPv6 (no IPv6 extension headers, no IPv4 fragments), and
 * packets whose 4-tuple has no entry, pass untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#include "xo_tc.h"

#define IP_FRAG_MASK 0x3fff /* MF flag + fragment offset */
#define IP4_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP4_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP4_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))
#define IP6_ADDR_LEN 16
#define IP4_ADDR_LEN 4

BPF_TABLE_PINNED("hash", struct xo_flow_key, struct xo_flow_action, xo_flows, XO_MAX_FLOWS,
                 XO_PIN_FLOWS);
BPF_TABLE_PINNED("hash", struct xo_flow_key, struct xo_flow_stats, xo_stats, XO_MAX_FLOWS,
                 XO_PIN_STATS);
BPF_TABLE_PINNED("array", u32, u64, xo_counters, XO_CNT_MAX, XO_PIN_COUNTERS);

static __always_inline void xo_count(u32 idx)
{
    u64 *c = xo_counters.lookup(&idx);
    if (c)
        lock_xadd(c, 1);
}

/* Fill `key` from the packet; returns the TCP header offset, or -1 if not ours to look at. */
static __always_inline int xo_parse(struct __sk_buff *skb, u8 dir, struct xo_flow_key *key)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;

    if ((void *)(eth + 1) > data_end)
        return -1;
    __builtin_memset(key, 0, sizeof(*key));
    key->dir = dir;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = (void *)(eth + 1);
        if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
            return -1;
        if (ip->frag_off & bpf_htons(IP_FRAG_MASK))
            return -1;
        u32 ihl = ip->ihl * 4;
        if (ihl < sizeof(*ip))
            return -1;
        struct tcphdr *tcp = (void *)ip + ihl;
        if ((void *)(tcp + 1) > data_end)
            return -1;
        key->family = 4;
        key->src[0] = ip->saddr;
        key->dst[0] = ip->daddr;
        key->sport = tcp->source;
        key->dport = tcp->dest;
        return ETH_HLEN + ihl;
    }
    if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = (void *)(eth + 1);
        if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
            return -1;
        struct tcphdr *tcp = (void *)(ip6 + 1);
        if ((void *)(tcp + 1) > data_end)
            return -1;
        key->family = 6;
        __builtin_memcpy(key->src, &ip6->saddr, IP6_ADDR_LEN);
        __builtin_memcpy(key->dst, &ip6->daddr, IP6_ADDR_LEN);
        key->sport = tcp->source;
        key->dport = tcp->dest;
        return ETH_HLEN + sizeof(*ip6);
    }
    return -1;
}

/* Replace an address (`old` -> `new`) at addr_off, fixing the IPv4 header checksum and the
 * TCP checksum (pseudo header) incrementally. Returns 0 or a negative error. */
static __always_inline int xo_set_addr(struct __sk_buff *skb, u8 family, u32 addr_off, u32 l4_off,
                                       u32 *old, u32 *new)
{
    u32 csum_off = l4_off + offsetof(struct tcphdr, check);

    if (family == 4) {
        if (bpf_l4_csum_replace(skb, csum_off, old[0], new[0], BPF_F_PSEUDO_HDR | IP4_ADDR_LEN))
            return -1;
        if (bpf_l3_csum_replace(skb, IP4_CSUM_OFF, old[0], new[0], IP4_ADDR_LEN))
            return -1;
        return bpf_skb_store_bytes(skb, addr_off, new, IP4_ADDR_LEN, 0);
    }
    s64 diff = bpf_csum_diff(old, IP6_ADDR_LEN, new, IP6_ADDR_LEN, 0);
    if (diff < 0)
        return -1;
    if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR))
        return -1;
    return bpf_skb_store_bytes(skb, addr_off, new, IP6_ADDR_LEN, 0);
}

static __always_inline int xo_set_port(struct __sk_buff *skb, u32 port_off, u32 l4_off, u16 old,
                                       u16 new)
{
    u32 csum_off = l4_off + offsetof(struct tcphdr, check);

    if (bpf_l4_csum_replace(skb, csum_off, old, new, sizeof(u16)))
        return -1;
    return bpf_skb_store_bytes(skb, port_off, &new, sizeof(u16), 0);
}

static __always_inline int xo_redirect(struct __sk_buff *skb, struct xo_flow_key *key,
                                       struct xo_flow_action *act, u32 l4_off)
{
    u32 new_addr[4];
    u32 addr_off = key->family == 4 ? IP4_DST_OFF : IP6_DST_OFF;

    __builtin_memcpy(new_addr, act->addr, sizeof(new_addr));
    if (xo_set_addr(skb, key->family, addr_off, l4_off, key->dst, new_addr) ||
        xo_set_port(skb, l4_off + offsetof(struct tcphdr, dest), l4_off, key->dport, act->port) ||
        bpf_skb_store_bytes(skb, 0, act->dst_mac, XO_MAC_LEN, 0) ||
        bpf_skb_store_bytes(skb, XO_MAC_LEN, act->src_mac, XO_MAC_LEN, 0)) {
        xo_count(XO_CNT_ERRORS);
        return TC_ACT_SHOT;
    }
    xo_count(XO_CNT_REDIRECTED);
    return bpf_redirect(act->ifindex, 0);
}

static __always_inline int xo_snat(struct __sk_buff *skb, struct xo_flow_key *key,
                                   struct xo_flow_action *act, u32 l4_off)
{
    u32 new_addr[4];
    u32 addr_off = key->family == 4 ? IP4_SRC_OFF : IP6_SRC_OFF;

    __builtin_memcpy(new_addr, act->addr, sizeof(new_addr));
    if (xo_set_addr(skb, key->family, addr_off, l4_off, key->src, new_addr) ||
        xo_set_port(skb, l4_off + offsetof(struct tcphdr, source), l4_off, key->sport,
                    act->port)) {
        xo_count(XO_CNT_ERRORS);
        return TC_ACT_SHOT;
    }
    xo_count(XO_CNT_SNATTED);
    return TC_ACT_OK;
}

static __always_inline int xo_handle(struct __sk_buff *skb, u8 dir)
{
    struct xo_flow_key key;
    int l4_off = xo_parse(skb, dir, &key);

    if (l4_off < 0)
        return TC_ACT_OK;
    struct xo_flow_action *act = xo_flows.lookup(&key);
    if (!act)
        return TC_ACT_OK;
    struct xo_flow_stats *st = xo_stats.lookup(&key);
    if (st) {
        lock_xadd(&st->packets, 1);
        lock_xadd(&st->bytes, skb->len);
    }
    switch (act->action) {
    case XO_ACT_BLOCK:
        xo_count(XO_CNT_BLOCKED);
        return TC_ACT_SHOT;
    case XO_ACT_REDIRECT:
        return xo_redirect(skb, &key, act, l4_off);
    case XO_ACT_SNAT:
        return xo_snat(skb, &key, act, l4_off);
    default:
        xo_count(XO_CNT_PASSED);
        return TC_ACT_OK;
    }
}

int xo_ingress(struct __sk_buff *skb)
{
    return xo_handle(skb, XO_DIR_INGRESS);
}

int xo_egress(struct __sk_buff *skb)
{
    return xo_handle(skb, XO_DIR_EGRESS);
}
