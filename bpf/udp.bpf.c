// SPDX-License-Identifier: GPL-2.0
/*
 * UDP echo (RFC 862) at the ingress of a device, through TCX: a datagram to echod's port is
 * turned around where it arrives and sent back out of the same device, never reaching a socket.
 *
 * Turning it around swaps the Ethernet addresses (when the device has an Ethernet header; lo
 * has one, with zero MACs), the IP addresses and the UDP ports. No checksum changes: the IPv4
 * header checksum and the UDP checksum are one's-complement sums of 16-bit words, whose order
 * does not matter, and each swap exchanges whole words within what one sum covers (the UDP
 * pseudo-header holds both addresses). A CHECKSUM_COMPLETE skb's sum stays right for the same
 * reason, and a CHECKSUM_PARTIAL one's seed (the pseudo-header's sum) too.
 *
 * Left to the stack, untouched: IP fragments, IPv4 with options, IPv6 with an extension header
 * before UDP, GSO packets, and datagrams whose length disagrees with their IP header; echod's
 * user-mode socket (if it listens) answers those. A fragmented datagram is counted once, by its
 * first fragment (the later ones carry no port). Dropped and counted: datagrams from port 0,
 * from echod's own port or from a port of udp_drop_ports (another echo, chargen, daytime...:
 * two services answering each other forever), from a source outside the allow list, and over
 * the source's rate.
 *
 * Anything not ours returns TCX_NEXT rather than TC_ACT_OK: on a device with more than one
 * TCX program (another echod's, Cilium's), TC_ACT_OK would end the chain and hide the packet
 * from the programs after ours. With none after ours, TCX_NEXT passes it to the stack.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <stddef.h>

#include "udp.h"

/* enum tcx_action_base (linux/bpf.h of 6.6; the build's headers are older): run the next
 * program on the device, or pass to the stack after the last. */
#define TCX_NEXT TC_ACT_UNSPEC
#define PACKET_HOST 0 /* linux/if_packet.h */
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define UDP_TOKEN 1000000000ULL /* one datagram in a bucket's units: a second's refill is rate */
#define NSEC_PER_SEC 1000000000ULL

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct udp_config);
} udp_config SEC(".maps");

/* Source ports never answered (host order) -> 1. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, UDP_MAX_DROP_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} udp_drop_ports SEC(".maps");

/* The allow list, consulted when udp_config.allow is set. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, UDP_MAX_ALLOW);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct udp_prefix);
	__type(value, __u32);
} udp_allow SEC(".maps");

/* echod's own addresses, consulted for a family whose UDP_CHECK_* bit is set. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, UDP_MAX_ADDRS);
	__type(key, struct udp_addr);
	__type(value, __u32);
} udp_addrs SEC(".maps");

/* The devices user space attached the program to -> UDP_L2_*. Not listed: not touched. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, UDP_MAX_DEVICES);
	__type(key, __u32);
	__type(value, __u32);
} udp_devices SEC(".maps");

/* A token bucket per source address. LRU: a flood of sources evicts the idle ones, and an
 * evicted source starts again with a full bucket. Updated without a lock (an LRU hash cannot
 * hold a bpf_spin_lock): two CPUs taking from one bucket at once may let one more through. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, UDP_MAX_SOURCES);
	__type(key, struct udp_addr);
	__type(value, struct udp_bucket);
} udp_buckets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct udp_counters);
} udp_counters SEC(".maps");

static __always_inline struct udp_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&udp_counters, &zero);
}

/* Add n to one counter through a lookup of its own (see bypass.bpf.c's COUNT: a pointer plus
 * an offset chosen by a branch is refused to a loader without CAP_PERFMON). */
#define COUNT(field, n)                                                                    \
	do {                                                                               \
		struct udp_counters *__c = counters();                                     \
		asm volatile("" : "+r"(__c));                                              \
		if (__c)                                                                   \
			__c->field += (n);                                                 \
	} while (0)

/* What the checks need of a datagram, whichever its family. */
struct dgram {
	struct udp_addr src;
	__u32 sport; /* host order */
	__u32 len;   /* UDP payload bytes */
};

static __always_inline int passed(void)
{
	COUNT(passed_packets, 1);
	return TCX_NEXT;
}

/* Make the first `need` bytes direct-readable; nonzero when the packet is shorter. The caller
 * must take data and data_end again afterwards. */
static __always_inline int room(struct __sk_buff *skb, __u32 need)
{
	if ((void *)(long)skb->data + need <= (void *)(long)skb->data_end)
		return 0;
	return bpf_skb_pull_data(skb, need);
}

static __always_inline void mapped(struct udp_addr *a, __be32 ip4)
{
	a->ip[0] = 0;
	a->ip[1] = 0;
	a->ip[2] = bpf_htonl(0x0000ffff);
	a->ip[3] = ip4;
}

/* Take one datagram's token from the source's bucket; 0 when it has none. */
static __always_inline int take(struct udp_addr *src, __u32 rate)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 cap = (__u64)rate * UDP_TOKEN * UDP_BURST_SECONDS;
	struct udp_bucket *b = bpf_map_lookup_elem(&udp_buckets, src);
	__u64 elapsed, tokens;

	if (!b) {
		struct udp_bucket fresh = { .tokens = cap - UDP_TOKEN, .stamp_ns = now };

		bpf_map_update_elem(&udp_buckets, src, &fresh, BPF_ANY);
		return 1;
	}
	/* Another CPU may have stamped it a moment later than our clock read. */
	elapsed = now > b->stamp_ns ? now - b->stamp_ns : 0;
	if (elapsed > NSEC_PER_SEC * UDP_BURST_SECONDS)
		elapsed = NSEC_PER_SEC * UDP_BURST_SECONDS; /* a full bucket; no overflow below */
	tokens = b->tokens + elapsed * rate;
	if (tokens > cap)
		tokens = cap; /* also after the rate was lowered */
	b->stamp_ns = now;
	if (tokens < UDP_TOKEN) {
		b->tokens = tokens;
		return 0;
	}
	b->tokens = tokens - UDP_TOKEN;
	return 1;
}

/* The guard ports, the allow list and the rate, in that order; counts a drop. */
static __always_inline int admitted(const struct udp_config *cfg, struct dgram *d)
{
	__u32 sport = d->sport;

	if (sport == 0 || sport == cfg->port || bpf_map_lookup_elem(&udp_drop_ports, &sport)) {
		COUNT(dropped_loop, 1);
		return 0;
	}
	if (cfg->allow) {
		struct udp_prefix key = { .prefixlen = 128 };

		__builtin_memcpy(key.ip, d->src.ip, sizeof(key.ip));
		if (!bpf_map_lookup_elem(&udp_allow, &key)) {
			COUNT(dropped_allow, 1);
			return 0;
		}
	}
	if (cfg->rate && !take(&d->src, cfg->rate)) {
		COUNT(dropped_rate, 1);
		return 0;
	}
	return 1;
}

static __always_inline void swap_macs(void *data, const __u32 l2)
{
	struct ethhdr *eth = data;
	unsigned char mac[ETH_ALEN];

	if (!l2)
		return;
	__builtin_memcpy(mac, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac, ETH_ALEN);
}

static __always_inline int echoed(struct __sk_buff *skb, struct udphdr *udp, __u32 len)
{
	__be16 port = udp->source;

#ifdef ECHOD_FAULT
	/* Fault injection, for the self-check's own tests: a kernel that loses 1-byte datagrams.
	 * The shipped object is built without it. */
	if (len == 1)
		return TC_ACT_SHOT;
#endif
	udp->source = udp->dest;
	udp->dest = port;
	COUNT(echoed_packets, 1);
	COUNT(echoed_bytes, len);
	return bpf_redirect(skb->ifindex, 0);
}

/* Whether the datagram whose UDP header starts at `at` (where the program does not read it
 * directly: a variable offset, or past a header) is to echod's port. */
static __always_inline int to_port(struct __sk_buff *skb, __u32 at, const struct udp_config *cfg)
{
	__be16 dport;

	if (bpf_skb_load_bytes(skb, at + offsetof(struct udphdr, dest), &dport, sizeof(dport)))
		return 0;
	return dport == bpf_htons(cfg->port);
}

static __always_inline int echo4(struct __sk_buff *skb, const struct udp_config *cfg,
				 const __u32 l2)
{
	struct dgram d = {};
	struct udphdr *udp;
	struct iphdr *ip;
	void *data, *end;
	__u32 saddr, ulen;
	__be32 addr;

	if (room(skb, l2 + sizeof(*ip)))
		return TCX_NEXT;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	ip = data + l2;
	if ((void *)(ip + 1) > end || ip->version != 4 || ip->protocol != IPPROTO_UDP)
		return TCX_NEXT;
	if (l2 && ((struct ethhdr *)data)->h_proto != bpf_htons(ETH_P_IP))
		return TCX_NEXT; /* a VLAN tag in the packet, say */
	if (bpf_ntohl(ip->daddr) >= 0xe0000000)
		return TCX_NEXT; /* multicast, reserved, broadcast */
	if (cfg->check_dest & UDP_CHECK_V4) {
		struct udp_addr dst;

		mapped(&dst, ip->daddr);
		if (!bpf_map_lookup_elem(&udp_addrs, &dst))
			return TCX_NEXT;
	}
	if (ip->frag_off & bpf_htons(IP_OFFSET))
		return TCX_NEXT; /* a later fragment: no UDP header, no port */
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(IP_MF))) /* options, or a first fragment */
		return to_port(skb, l2 + ip->ihl * 4, cfg) ? passed() : TCX_NEXT;
	if (room(skb, l2 + sizeof(*ip) + sizeof(*udp)))
		return TCX_NEXT;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	ip = data + l2;
	udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end || udp->dest != bpf_htons(cfg->port))
		return TCX_NEXT;
	/* Ours, but not to be turned around: the stack decides what to do with it. */
	ulen = bpf_ntohs(udp->len);
	saddr = bpf_ntohl(ip->saddr);
	if (ulen < sizeof(*udp) || ulen != bpf_ntohs(ip->tot_len) - sizeof(*ip) || !saddr ||
	    saddr >= 0xe0000000 || skb->gso_size)
		return passed();
	mapped(&d.src, ip->saddr);
	d.sport = bpf_ntohs(udp->source);
	d.len = ulen - sizeof(*udp);
	if (!admitted(cfg, &d))
		return TC_ACT_SHOT;
	swap_macs(data, l2);
	addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	return echoed(skb, udp, d.len);
}

/* Extension headers (RFC 8200, the IANA list) but the fragment header: hop-by-hop, routing,
 * AH, destination options, mobility, HIP, shim6, experiments. The UDP header is further on,
 * past headers of their own lengths, and is not read. */
static __always_inline int extension(__u8 n)
{
	return n == 0 || n == 43 || n == 51 || n == 60 || n == 135 || n == 139 || n == 140 ||
	       n == 253 || n == 254;
}

/* The IPv6 fragment header (net/ipv6.h's struct frag_hdr). */
struct frag6 {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset << 3 | M */
	__be32 identification;
};

/* A packet with a fragment header: a datagram to echod's port only if it is the first one
 * and the UDP header comes right after. */
static __always_inline int fragment6(struct __sk_buff *skb, const struct udp_config *cfg,
				     const __u32 l2)
{
	struct frag6 frag;
	__u32 at = l2 + sizeof(struct ipv6hdr);

	if (bpf_skb_load_bytes(skb, at, &frag, sizeof(frag)) ||
	    (frag.frag_off & bpf_htons(0xfff8)) || frag.nexthdr != IPPROTO_UDP)
		return TCX_NEXT;
	return to_port(skb, at + sizeof(frag), cfg) ? passed() : TCX_NEXT;
}

static __always_inline int echo6(struct __sk_buff *skb, const struct udp_config *cfg,
				 const __u32 l2)
{
	struct dgram d = {};
	struct ipv6hdr *ip6;
	struct udphdr *udp;
	void *data, *end;
	__u32 ulen, i;

	if (room(skb, l2 + sizeof(*ip6)))
		return TCX_NEXT;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	ip6 = data + l2;
	if ((void *)(ip6 + 1) > end || ip6->version != 6)
		return TCX_NEXT;
	if (l2 && ((struct ethhdr *)data)->h_proto != bpf_htons(ETH_P_IPV6))
		return TCX_NEXT;
	if (ip6->daddr.in6_u.u6_addr8[0] == 0xff)
		return TCX_NEXT; /* multicast */
	if (cfg->check_dest & UDP_CHECK_V6) {
		struct udp_addr dst;

		__builtin_memcpy(dst.ip, ip6->daddr.in6_u.u6_addr32, sizeof(dst.ip));
		if (!bpf_map_lookup_elem(&udp_addrs, &dst))
			return TCX_NEXT;
	}
	if (ip6->nexthdr == 44)
		return fragment6(skb, cfg, l2);
	if (extension(ip6->nexthdr))
		return passed();
	if (ip6->nexthdr != IPPROTO_UDP || room(skb, l2 + sizeof(*ip6) + sizeof(*udp)))
		return TCX_NEXT;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	ip6 = data + l2;
	udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > end || udp->dest != bpf_htons(cfg->port))
		return TCX_NEXT;
	__builtin_memcpy(d.src.ip, ip6->saddr.in6_u.u6_addr32, sizeof(d.src.ip));
	ulen = bpf_ntohs(udp->len);
	if (ulen < sizeof(*udp) || ulen != bpf_ntohs(ip6->payload_len) || skb->gso_size ||
	    ip6->saddr.in6_u.u6_addr8[0] == 0xff ||
	    !(d.src.ip[0] | d.src.ip[1] | d.src.ip[2] | d.src.ip[3]))
		return passed(); /* a multicast or unspecified source, say */
	d.sport = bpf_ntohs(udp->source);
	d.len = ulen - sizeof(*udp);
	if (!admitted(cfg, &d))
		return TC_ACT_SHOT;
	swap_macs(data, l2);
	for (i = 0; i < 4; i++) {
		__be32 word = ip6->saddr.in6_u.u6_addr32[i];

		ip6->saddr.in6_u.u6_addr32[i] = ip6->daddr.in6_u.u6_addr32[i];
		ip6->daddr.in6_u.u6_addr32[i] = word;
	}
	return echoed(skb, udp, d.len);
}

static __always_inline int echo(struct __sk_buff *skb, const struct udp_config *cfg,
				const __u32 l2)
{
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return echo4(skb, cfg, l2);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return echo6(skb, cfg, l2);
	return TCX_NEXT;
}

SEC("tcx/ingress")
int udp_echo(struct __sk_buff *skb)
{
	__u32 zero = 0, ifindex = skb->ifindex;
	struct udp_config *cfg = bpf_map_lookup_elem(&udp_config, &zero);
	__u32 *l2 = bpf_map_lookup_elem(&udp_devices, &ifindex);

	if (!cfg || !l2 || !cfg->port || skb->pkt_type != PACKET_HOST)
		return TCX_NEXT;
	/* Two copies of the path, each with its header length a constant for the verifier. */
	if (*l2 == UDP_L2_ETHERNET)
		return echo(skb, cfg, ETH_HLEN);
	return echo(skb, cfg, 0);
}

char LICENSE[] SEC("license") = "GPL";
