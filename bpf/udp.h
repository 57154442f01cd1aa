/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between udp.bpf.c and echod/kernel/udp.py: the only place these are defined. */
#ifndef ECHOD_UDP_H
#define ECHOD_UDP_H

/* Capacities of the maps user space fills. */
#define UDP_MAX_DROP_PORTS 64  /* source ports that are never answered (udp_drop_ports) */
#define UDP_MAX_ALLOW 1024     /* allow-list prefixes (udp_allow) */
#define UDP_MAX_ADDRS 256      /* echod's own addresses (udp_addrs) */
#define UDP_MAX_DEVICES 256    /* devices the program is attached to (udp_devices) */
#define UDP_MAX_SOURCES 65536  /* rate-limit buckets, one per source address (LRU) */

/* udp_config.check_dest: the destination must be in udp_addrs, per family. A family whose
 * bit is clear is answered on any address (echod binds its wildcard, or none of it). */
#define UDP_CHECK_V4 1
#define UDP_CHECK_V6 2

/* udp_devices' value: how the device's packets begin at TC ingress. */
#define UDP_L2_NONE 0     /* at the IP header (tun, wireguard) */
#define UDP_L2_ETHERNET 1 /* at an Ethernet header (lo has one, with zero MACs) */

/* A source's bucket holds this many seconds of its rate: the burst is rate x this. */
#define UDP_BURST_SECONDS 1

/* The one value of the "udp_config" array; every field in host order. */
struct udp_config {
	__u32 port;       /* echod's UDP port; 0: not configured, the program touches nothing */
	__u32 check_dest; /* UDP_CHECK_* */
	__u32 rate;       /* datagrams per second per source address; 0: unlimited */
	__u32 allow;      /* 1: the source address must match a prefix in udp_allow */
};

/* An address as the key of udp_addrs and udp_buckets: IPv4 as ::ffff:a.b.c.d, network order. */
struct udp_addr {
	__u32 ip[4];
};

/* The key of the udp_allow LPM trie: an IPv4 prefix is stored v4-mapped, its length + 96. */
struct udp_prefix {
	__u32 prefixlen;
	__u32 ip[4];
};

/* A source's token bucket; one datagram costs UDP_TOKEN (1e9), a second adds rate x 1e9. */
struct udp_bucket {
	__u64 tokens;
	__u64 stamp_ns; /* bpf_ktime_get_ns() of the last refill */
};

/* One per-CPU value of the "udp_counters" map (a one-slot PERCPU_ARRAY). */
struct udp_counters {
	__u64 echoed_packets; /* datagrams sent back out of the device they came in on */
	__u64 echoed_bytes;   /* their UDP payload bytes */
	__u64 passed_packets; /* datagrams to echod's port (and address) left to the stack: fragmented
	                       * (counted by the first fragment), IPv4 with options, a length that
	                       * disagrees with the IP header, a source that is not unicast, GSO;
	                       * and IPv6 packets with an extension header other than a fragment
	                       * header, whatever their port (it is not read) */
	__u64 dropped_loop;   /* from port 0, echod's own port or a port in udp_drop_ports */
	__u64 dropped_allow;  /* from a source the allow list does not name */
	__u64 dropped_rate;   /* over the source's rate */
};

#endif
