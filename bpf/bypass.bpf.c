// SPDX-License-Identifier: GPL-2.0
/*
 * Same-host bypass: a sock_ops program puts both ends of each local TCP connection to one of
 * echod's ports into a sockhash, and an sk_msg program hands each send of theirs straight to
 * the other end, skipping TCP/IP, netfilter and loopback.
 *
 * Two settings, per watched port (bypass_ports), which user space keeps equal to its mode:
 * - user: every send goes to the peer's receive queue (BPF_F_INGRESS), both directions;
 *   echod's user-space echo reads and writes the bytes (istio-tcpip-bypass's experiment).
 * - kernel, the short circuit: a client's send goes to the *server* socket's send queue
 *   (flags 0), so the server socket transmits the bytes back over TCP: its receive path and
 *   the sk_skb verdict are skipped. Server sends go through TCP as usual.
 *
 * A connection's path never changes once taken: bytes of one direction that took two paths
 * could overtake each other. The server end's path is fixed as it is established, from the
 * setting then, and user space reads it (bypass_paths) to serve the connection accordingly.
 * The client end learns it through bypass_links at its first send. A client that sends
 * before its server end is established, or whose server end is not in the map, stays on
 * TCP/IP for good, where echod's normal path echoes it.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "bypass.h"

#define AF_INET 2
#define AF_INET6 10

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, BYPASS_MAX_SOCKETS);
	__type(key, struct bypass_key);
	__type(value, __u64);
} bypass_sockets SEC(".maps");

/* echod's listening ports (host order) -> BYPASS_SETTING_*. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BYPASS_MAX_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} bypass_ports SEC(".maps");

struct bypass_sock {
	__u32 role; /* BYPASS_ROLE_* */
	__u32 path; /* BYPASS_PATH_* */
};

/* Per socket, freed with it: which end it is, and its connection's path. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct bypass_sock);
} bypass_paths SEC(".maps");

/*
 * A client end's key -> BYPASS_LINK_CLIENT when it is established, then its server end's
 * path when that one is; the client end takes it (and deletes it) at its first send. LRU: an
 * entry of a client that never sent is evicted in time, and one evicted early only leaves a
 * connection on TCP.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, BYPASS_MAX_SOCKETS);
	__type(key, struct bypass_key);
	__type(value, __u32);
} bypass_links SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bypass_counters);
} bypass_counters SEC(".maps");

/*
 * A context field read as it stands: without the barrier clang merges the IPv4 and IPv6
 * reads into one load through a moved ctx pointer, which the verifier refuses.
 */
#define CTX(field)                                                                         \
	({                                                                                 \
		__u32 __v = (field);                                                       \
		asm volatile("" : "+r"(__v));                                              \
		__v;                                                                       \
	})

static __always_inline struct bypass_counters *counters(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&bypass_counters, &zero);
}

/*
 * Add n to one counter, through a lookup of its own: clang must not turn two counters into
 * one pointer plus an offset chosen by a branch, which the verifier refuses to a loader
 * without CAP_PERFMON (the unit has CAP_BPF and CAP_NET_ADMIN only).
 */
#define COUNT(field, n)                                                                    \
	do {                                                                               \
		struct bypass_counters *__c = counters();                                  \
		asm volatile("" : "+r"(__c));                                              \
		if (__c)                                                                   \
			__c->field += (n);                                                 \
	} while (0)

/* An IPv4 address as ::ffff:a.b.c.d (network order words). */
static __always_inline void mapped(__u32 *ip, __u32 ip4)
{
	ip[0] = 0;
	ip[1] = 0;
	ip[2] = bpf_htonl(0x0000ffff);
	ip[3] = ip4;
}

/* The other end's key: local and remote swapped. */
static __always_inline void swapped(struct bypass_key *out, struct bypass_key *in)
{
	out->netns = in->netns;
	__builtin_memcpy(out->local_ip, in->remote_ip, sizeof(out->local_ip));
	__builtin_memcpy(out->remote_ip, in->local_ip, sizeof(out->remote_ip));
	out->local_port = in->remote_port;
	out->remote_port = in->local_port;
}

/* ---------------------------------------------------------------------------------------- */
/* sock_ops: insert both ends of a local connection to a watched port as it is established */

static __always_inline int ops_key(struct bpf_sock_ops *ops, struct bypass_key *key)
{
	key->netns = bpf_get_netns_cookie(ops);
	key->local_port = ops->local_port;
	key->remote_port = bpf_ntohl(ops->remote_port);
	if (ops->family == AF_INET) {
		mapped(key->local_ip, CTX(ops->local_ip4));
		mapped(key->remote_ip, CTX(ops->remote_ip4));
		return 0;
	}
	if (ops->family != AF_INET6)
		return -1;
	key->local_ip[0] = CTX(ops->local_ip6[0]);
	key->local_ip[1] = CTX(ops->local_ip6[1]);
	key->local_ip[2] = CTX(ops->local_ip6[2]);
	key->local_ip[3] = CTX(ops->local_ip6[3]);
	key->remote_ip[0] = CTX(ops->remote_ip6[0]);
	key->remote_ip[1] = CTX(ops->remote_ip6[1]);
	key->remote_ip[2] = CTX(ops->remote_ip6[2]);
	key->remote_ip[3] = CTX(ops->remote_ip6[3]);
	return 0;
}

/* Give sk its storage and put it in the sockhash; 0 (counted) when either fails. */
static __always_inline int insert(struct bpf_sock_ops *ops, struct bypass_key *key, __u32 role,
				   __u32 path)
{
	struct bypass_sock *me;
	struct bpf_sock *sk = ops->sk;

	if (!sk)
		return 0;
	me = bpf_sk_storage_get(&bypass_paths, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!me || bpf_sock_hash_update(ops, &bypass_sockets, key, BPF_NOEXIST)) {
		COUNT(insert_failures, 1);
		return 0;
	}
	me->role = role;
	me->path = path;
	if (role == BYPASS_ROLE_SERVER)
		COUNT(server_sockets, 1);
	else
		COUNT(client_sockets, 1);
	return 1;
}

/* A connection echod accepted: bypass it if its client end is in the map, from the setting. */
static __always_inline void server_end(struct bpf_sock_ops *ops, __u32 setting)
{
	struct bypass_key key = {}, client = {};
	__u32 path, *link;

	if (ops_key(ops, &key))
		return;
	swapped(&client, &key);
	link = bpf_map_lookup_elem(&bypass_links, &client);
	if (!link || *link != BYPASS_LINK_CLIENT) {
		/* Another host, or a client outside the cgroup: TCP/IP, as without the bypass. */
		COUNT(tcp_conns, 1);
		return;
	}
	path = setting == BYPASS_SETTING_KERNEL ? BYPASS_PATH_SHORT : BYPASS_PATH_INGRESS;
	if (!insert(ops, &key, BYPASS_ROLE_SERVER, path))
		path = BYPASS_PATH_TCP;
	bpf_map_update_elem(&bypass_links, &client, &path, BPF_EXIST);
}

/* A connection to echod's port: the client end waits in the map for its server end. */
static __always_inline void client_end(struct bpf_sock_ops *ops)
{
	struct bypass_key key = {};
	__u32 link = BYPASS_LINK_CLIENT;

	if (ops_key(ops, &key))
		return;
	if (insert(ops, &key, BYPASS_ROLE_CLIENT, BYPASS_PATH_UNDECIDED))
		bpf_map_update_elem(&bypass_links, &key, &link, BPF_ANY);
}

SEC("sockops")
int bypass_sockops(struct bpf_sock_ops *ops)
{
	__u32 port, *setting;

	/* Every TCP connection in the cgroup subtree passes here: touch only echod's. */
	if (ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		port = ops->local_port;
		setting = bpf_map_lookup_elem(&bypass_ports, &port);
		if (setting)
			server_end(ops, *setting);
	} else if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		port = bpf_ntohl(ops->remote_port);
		if (bpf_map_lookup_elem(&bypass_ports, &port))
			client_end(ops);
	}
	return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* sk_msg: every send of a socket in the sockhash */

/* The peer's key: this end's key with local and remote swapped. */
static __always_inline void peer_key(struct sk_msg_md *msg, struct bypass_key *key)
{
	key->netns = bpf_get_netns_cookie(msg);
	key->local_port = bpf_ntohl(msg->remote_port);
	key->remote_port = msg->local_port;
	if (msg->family == AF_INET) {
		mapped(key->local_ip, CTX(msg->remote_ip4));
		mapped(key->remote_ip, CTX(msg->local_ip4));
		return;
	}
	key->local_ip[0] = CTX(msg->remote_ip6[0]);
	key->local_ip[1] = CTX(msg->remote_ip6[1]);
	key->local_ip[2] = CTX(msg->remote_ip6[2]);
	key->local_ip[3] = CTX(msg->remote_ip6[3]);
	key->remote_ip[0] = CTX(msg->local_ip6[0]);
	key->remote_ip[1] = CTX(msg->local_ip6[1]);
	key->remote_ip[2] = CTX(msg->local_ip6[2]);
	key->remote_ip[3] = CTX(msg->local_ip6[3]);
}

static __always_inline int tcp(__u32 len)
{
	COUNT(tcp_msgs, 1);
	COUNT(tcp_bytes, len);
	return SK_PASS;
}

static __always_inline int redirected(__u32 path, __u32 len)
{
	if (path == BYPASS_PATH_INGRESS) {
		COUNT(ingress_msgs, 1);
		COUNT(ingress_bytes, len);
	} else {
		COUNT(short_msgs, 1);
		COUNT(short_bytes, len);
	}
	return SK_PASS;
}

static __always_inline __u64 redirect_flags(__u32 path)
{
	return path == BYPASS_PATH_INGRESS ? BPF_F_INGRESS : 0;
}

/* A client end's first send: take the path its server end was given, if it was given one. */
static __always_inline int first_send(struct sk_msg_md *msg, struct bypass_sock *me,
				      struct bypass_key *peer, __u32 len)
{
	struct bypass_key mine = {};
	__u32 path = BYPASS_PATH_TCP, *link;

	swapped(&mine, peer);
	link = bpf_map_lookup_elem(&bypass_links, &mine);
	if (link && (*link == BYPASS_PATH_INGRESS || *link == BYPASS_PATH_SHORT))
		path = *link;
	if (link)
		bpf_map_delete_elem(&bypass_links, &mine);
	/*
	 * No path given: the server end is not echod's on this host, or not established yet.
	 * Its server end, if it is echod's, counts the connection as on TCP when it finds no link.
	 */
	if (path == BYPASS_PATH_TCP) {
		me->path = path;
		return tcp(len);
	}
	if (bpf_msg_redirect_hash(msg, &bypass_sockets, peer, redirect_flags(path)) != SK_PASS) {
		me->path = BYPASS_PATH_TCP; /* the server end has gone already */
		COUNT(tcp_conns, 1);
		return tcp(len);
	}
	me->path = path;
	COUNT(bypassed_conns, 1);
	return redirected(path, len);
}

SEC("sk_msg")
int bypass_msg(struct sk_msg_md *msg)
{
	struct bypass_key peer = {};
	struct bypass_sock *me;
	struct bpf_sock *sk = msg->sk;
	__u32 len = msg->size;
	__u32 path;

	if (!sk)
		return tcp(len);
	me = bpf_sk_storage_get(&bypass_paths, sk, 0, 0);
	if (!me)
		return tcp(len);
	path = me->path;
	/* A server end on the short circuit sends through TCP, as the redirected bytes do. */
	if (path == BYPASS_PATH_TCP || (path == BYPASS_PATH_SHORT && me->role == BYPASS_ROLE_SERVER))
		return tcp(len);
	peer_key(msg, &peer);
	if (path == BYPASS_PATH_UNDECIDED)
		return first_send(msg, me, &peer, len);
	if (bpf_msg_redirect_hash(msg, &bypass_sockets, &peer, redirect_flags(path)) != SK_PASS) {
		/* The peer left the map (it closed): the bytes go the way a closed peer's would. */
		COUNT(redirect_failures, 1);
		return tcp(len);
	}
	return redirected(path, len);
}

char LICENSE[] SEC("license") = "GPL";
