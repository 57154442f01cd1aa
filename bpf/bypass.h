/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between bypass.bpf.c and echod/kernel/bypass.py, bypass_paths.py: defined only here. */
#ifndef ECHOD_BYPASS_H
#define ECHOD_BYPASS_H

/* Capacity of the bypass sockhash: both ends of every same-host connection to echod. */
#define BYPASS_MAX_SOCKETS 524288
/* Capacity of the listeners map: echod's listening addresses (the self-check's included). */
#define BYPASS_MAX_LISTENERS 256

/* What a listener's connections do (the value of bypass_listeners). */
#define BYPASS_SETTING_USER 1   /* both directions: sk_msg to the peer's ingress */
#define BYPASS_SETTING_KERNEL 2 /* the short circuit: client sends to the server's egress */

/* A connection's path, in its sockets' bypass_paths storage and in bypass_links. The server
 * end's is decided as it is established. The client end's stays undecided (its sends go
 * through TCP) until it may take its server end's path; then neither changes. */
#define BYPASS_PATH_UNDECIDED 0
#define BYPASS_PATH_TCP 1     /* through TCP/IP, as without the bypass */
#define BYPASS_PATH_INGRESS 2 /* each send redirected to the peer socket's receive queue */
#define BYPASS_PATH_SHORT 3   /* client sends redirected to the server socket's send queue */
/* bypass_links only: the client end is in the sockhash, its server end not yet. */
#define BYPASS_LINK_CLIENT 4

/* Which socket this is, in its bypass_paths storage. */
#define BYPASS_ROLE_SERVER 1   /* accepted by echod's listener */
#define BYPASS_ROLE_CLIENT 2   /* connected to echod's listening address */
#define BYPASS_ROLE_LISTENER 3 /* echod's listener, marked by user space: its children inherit
                                * the mark (BPF_F_CLONE), which is how sock_ops knows a server
                                * end is echod's and not another server's on the same port */

/* An undecided client end that has sent this much through TCP stays on TCP for good. */
#define BYPASS_UNDECIDED_MAX (1ULL << 30)

/* The sockhash key: one end of a TCP connection as that end sees it. IPv4 addresses are
 * stored v4-mapped (::ffff:a.b.c.d), so an AF_INET client and an AF_INET6 dual-stack
 * listener's socket name each other alike; ports in host order. */
struct bypass_key {
	__u64 netns; /* network namespace cookie: 127.0.0.1 in two namespaces is two hosts */
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u32 local_port;
	__u32 remote_port;
};

/* A listening address of echod's (the bypass_listeners key). A wildcard bind is stored with
 * the family's any-address: :: for IPv6, ::ffff:0.0.0.0 for IPv4. */
struct bypass_listener {
	__u64 netns;
	__u32 ip[4];
	__u32 port; /* host order */
	__u32 pad;  /* zero */
};

/* A socket's bypass_paths storage. */
struct bypass_sock {
	__u32 role; /* BYPASS_ROLE_* */
	__u32 path; /* BYPASS_PATH_* */
	/* Client end, while its path is undecided: bytes it has sent through TCP, and how far
	 * the echo of them has been seen arriving. When the second reaches the first, every byte
	 * sent so far has passed the server socket's send queue: nothing can be overtaken. */
	__u64 sent;
	__u64 echoed;
};

/* One per-CPU value of the "bypass_counters" map (a one-slot PERCPU_ARRAY). */
struct bypass_counters {
	__u64 server_sockets;     /* server ends sock_ops put in the sockhash */
	__u64 client_sockets;     /* client ends sock_ops put in the sockhash */
	__u64 insert_failures;    /* ends sock_ops could not put there (no storage, map full) */
	__u64 bypassed_conns;     /* client ends that took the bypass */
	__u64 tcp_conns;          /* connections left on TCP/IP for good: no local client end in
	                           * the map (another host, another cgroup), a server end gone
	                           * before the client could take the bypass, or a client that
	                           * never caught up with its echo */
	__u64 ingress_msgs;       /* sends redirected to the peer's receive queue */
	__u64 ingress_bytes;
	__u64 short_msgs;         /* client sends redirected to the server socket's send queue */
	__u64 short_bytes;
	__u64 tcp_msgs;           /* sends of watched sockets that went through TCP/IP */
	__u64 tcp_bytes;
	__u64 redirect_failures;  /* sends of a bypassed connection whose peer was gone: sent by TCP */
	__u64 deferred_conns;     /* client ends whose first send went through TCP because the bypass
	                           * could not take it yet (a server end not yet accepted) */
	__u64 late_bypassed_conns; /* of those, ones that took the bypass later (in bypassed_conns) */
};

#endif
