/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between bypass.bpf.c and echod/bypass.py: the only place these are defined. */
#ifndef ECHOD_BYPASS_H
#define ECHOD_BYPASS_H

/* Capacity of the bypass sockhash: both ends of every same-host connection to echod. */
#define BYPASS_MAX_SOCKETS 524288
/* Capacity of the watched-ports map: echod's listening ports. */
#define BYPASS_MAX_PORTS 64

/* What a watched port's connections do (the value of bypass_ports). */
#define BYPASS_SETTING_USER 1   /* both directions: sk_msg to the peer's ingress */
#define BYPASS_SETTING_KERNEL 2 /* the short circuit: client sends to the server's egress */

/* A connection's path, in its sockets' bypass_paths storage and in bypass_links. The server
 * end's is decided as it is established, the client end's at its first send; neither changes
 * afterwards. */
#define BYPASS_PATH_UNDECIDED 0
#define BYPASS_PATH_TCP 1     /* through TCP/IP, as without the bypass */
#define BYPASS_PATH_INGRESS 2 /* each send redirected to the peer socket's receive queue */
#define BYPASS_PATH_SHORT 3   /* client sends redirected to the server socket's send queue */
/* bypass_links only: the client end is in the sockhash, its server end not yet. */
#define BYPASS_LINK_CLIENT 4

/* Which end of a connection to echod a socket is. */
#define BYPASS_ROLE_SERVER 1 /* accepted by echod's listener */
#define BYPASS_ROLE_CLIENT 2 /* connected to echod's port */

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

/* One per-CPU value of the "bypass_counters" map (a one-slot PERCPU_ARRAY). */
struct bypass_counters {
	__u64 server_sockets;     /* server ends sock_ops put in the sockhash */
	__u64 client_sockets;     /* client ends sock_ops put in the sockhash */
	__u64 insert_failures;    /* ends sock_ops could not put there (no storage, map full) */
	__u64 bypassed_conns;     /* client first sends that took the bypass */
	__u64 tcp_conns;          /* connections left on TCP/IP: no local client end in the map
	                           * (another host, another cgroup), or a client that sent before
	                           * its server end was established */
	__u64 ingress_msgs;       /* sends redirected to the peer's receive queue */
	__u64 ingress_bytes;
	__u64 short_msgs;         /* client sends redirected to the server socket's send queue */
	__u64 short_bytes;
	__u64 tcp_msgs;           /* sends of watched sockets that went through TCP/IP */
	__u64 tcp_bytes;
	__u64 redirect_failures;  /* sends of a bypassed connection whose peer was gone: sent by TCP */
};

#endif
