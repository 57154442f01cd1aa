// SPDX-License-Identifier: GPL-2.0
/*
 * Same-host bypass: a sock_ops program puts both ends of each local TCP connection to one of
 * echod's listening addresses into a sockhash, and an sk_msg program hands their sends straight
 * to the other end, skipping TCP/IP, netfilter and loopback.
 *
 * Two settings, per listening address (bypass_listeners), which user space keeps equal to its
 * mode:
 * - user: every send goes to the peer's receive queue (BPF_F_INGRESS), both directions;
 *   echod's user-space echo reads and writes the bytes (istio-tcpip-bypass's experiment).
 * - kernel, the short circuit: a client's send goes to the *server* socket's send queue
 *   (flags 0), so the server socket transmits the bytes back over TCP: its receive path and
 *   the sk_skb verdict are skipped. Server sends go through TCP as usual.
 *
 * Only echod's connections: a server end is taken only if it is a child of a listener user
 * space marked (the mark is cloned into each child), so another server on the same port
 * number, or a more specific bind of another server beside echod's wildcard one, is never
 * touched; a client end only if it connects to one of echod's listening addresses, or to
 * echod's port on a local address when echod binds the wildcard.
 *
 * A connection's path never changes once taken: bytes of one direction that took two paths
 * could overtake each other. The server end's path is fixed as it is established, from the
 * setting then, and user space reads it (bypass_paths) to serve the connection accordingly.
 * The client end's sends go through TCP until it may take that path:
 * - the ingress path at once, if it has sent nothing yet;
 * - the short circuit only once the echo of every byte it sent through TCP has been seen
 *   arriving (bypass_ingress counts it). That proves echod accepted the server socket (a
 *   redirect into a socket not yet accepted fails the client's send with EINVAL on some
 *   kernels), and that those bytes have left the server's send queue, so the redirected ones
 *   queue behind them.
 * A client whose server end is not in the map stays on TCP/IP for good, where echod's normal
 * path echoes it.
 */
#include <linux/bpf.h>
#include <linux/in.h>
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

/* echod's listening addresses -> BYPASS_SETTING_*. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, BYPASS_MAX_LISTENERS);
	__type(key, struct bypass_listener);
	__type(value, __u32);
} bypass_listeners SEC(".maps");

/* Per socket, freed with it: which end it is, its connection's path, and an undecided client
 * end's progress. A listener's mark is cloned into every child it accepts. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct bypass_sock);
} bypass_paths SEC(".maps");

/*
 * A client end's key -> BYPASS_LINK_CLIENT when it is established, then its server end's
 * path when that one is; the client end takes it (and deletes it) once its path is decided.
 * LRU: an entry of a client that never sent is evicted in time, and one evicted early only
 * leaves a connection on TCP.
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

static __always_inline int is_mapped(__u32 *ip)
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int same_ip(__u32 *a, __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* 127.0.0.0/8 or ::1. */
static __always_inline int loopback(__u32 *ip)
{
	if (is_mapped(ip))
		return (bpf_ntohl(ip[3]) >> 24) == 127;
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
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

/*
 * The setting of the listening address ip:port, if it is echod's: the exact address, or the
 * family's wildcard. `any` is set when only the wildcard matched.
 */
static __always_inline __u32 *listener_setting(__u64 netns, __u32 *ip, __u32 port, int *any)
{
	struct bypass_listener l = {};
	__u32 *setting;

	l.netns = netns;
	l.port = port;
	__builtin_memcpy(l.ip, ip, sizeof(l.ip));
	setting = bpf_map_lookup_elem(&bypass_listeners, &l);
	*any = 0;
	if (setting)
		return setting;
	if (is_mapped(ip))
		l.ip[3] = 0; /* ::ffff:0.0.0.0 */
	else
		__builtin_memset(l.ip, 0, sizeof(l.ip));
	*any = 1;
	return bpf_map_lookup_elem(&bypass_listeners, &l);
}

/* ---------------------------------------------------------------------------------------- */
/* sock_ops: insert both ends of a local connection to echod as it is established */

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

/* Put sk in the sockhash with its storage set; 0 (counted) when either fails. */
static __always_inline int insert(struct bpf_sock_ops *ops, struct bypass_sock *me,
				   struct bypass_key *key, __u32 role, __u32 path)
{
	if (!me || bpf_sock_hash_update(ops, &bypass_sockets, key, BPF_NOEXIST)) {
		COUNT(insert_failures, 1);
		return 0;
	}
	me->role = role;
	me->path = path;
	me->sent = 0;
	me->echoed = 0;
	if (role == BYPASS_ROLE_SERVER)
		COUNT(server_sockets, 1);
	else
		COUNT(client_sockets, 1);
	return 1;
}

/* A connection one of echod's listeners accepted: bypass it if its client end is in the map. */
static __always_inline void server_end(struct bpf_sock_ops *ops)
{
	struct bypass_key key = {}, client = {};
	struct bpf_sock *sk = ops->sk;
	struct bypass_sock *me;
	__u32 path, *link, *setting;
	int any;

	if (!sk)
		return;
	/* Only a child of a listener user space marked carries the mark. */
	me = bpf_sk_storage_get(&bypass_paths, sk, 0, 0);
	if (!me || me->role != BYPASS_ROLE_LISTENER)
		return;
	me->role = BYPASS_ROLE_SERVER;
	me->path = BYPASS_PATH_TCP;
	if (ops_key(ops, &key))
		return;
	setting = listener_setting(key.netns, key.local_ip, key.local_port, &any);
	if (!setting)
		return; /* the listener is no longer followed: as without the bypass */
	swapped(&client, &key);
	link = bpf_map_lookup_elem(&bypass_links, &client);
	if (!link || *link != BYPASS_LINK_CLIENT) {
		/* Another host, or a client outside the cgroup: TCP/IP, as without the bypass. */
		COUNT(tcp_conns, 1);
		return;
	}
	path = *setting == BYPASS_SETTING_KERNEL ? BYPASS_PATH_SHORT : BYPASS_PATH_INGRESS;
	if (!insert(ops, me, &key, BYPASS_ROLE_SERVER, path))
		path = BYPASS_PATH_TCP;
	bpf_map_update_elem(&bypass_links, &client, &path, BPF_EXIST);
}

/* A connection to one of echod's listening addresses: the client end waits in the map. */
static __always_inline void client_end(struct bpf_sock_ops *ops)
{
	struct bypass_key key = {};
	struct bypass_sock *me;
	__u32 link = BYPASS_LINK_CLIENT;
	int any;

	if (ops_key(ops, &key))
		return;
	if (!listener_setting(key.netns, key.remote_ip, key.remote_port, &any))
		return;
	/* Data already sent with the SYN (TCP Fast Open) would not be counted: left on TCP. */
	if (ops->bytes_acked > 1 || ops->snd_nxt != ops->snd_una)
		return;
	/* A wildcard bind covers the local addresses alone: a connection to another host's port
	 * of the same number has a source address other than its destination. */
	if (any && !loopback(key.remote_ip) && !same_ip(key.remote_ip, key.local_ip))
		return;
	if (!ops->sk)
		return;
	me = bpf_sk_storage_get(&bypass_paths, ops->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (insert(ops, me, &key, BYPASS_ROLE_CLIENT, BYPASS_PATH_UNDECIDED))
		bpf_map_update_elem(&bypass_links, &key, &link, BPF_ANY);
}

SEC("sockops")
int bypass_sockops(struct bpf_sock_ops *ops)
{
	/* Every TCP connection in the cgroup subtree passes here: touch only echod's. */
	if (ops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		server_end(ops);
	else if (ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		client_end(ops);
	return 1;
}

/* ---------------------------------------------------------------------------------------- */
/* cgroup_skb ingress: how far an undecided client end has seen its echo arrive */

struct tcp_words {
	__u32 ports;
	__u32 seq;
	__u32 ack_seq;
	__u8 doff_res; /* the data offset in the high nibble */
	__u8 flags;
	__u16 window;
};

/*
 * Every packet that arrives for a socket of the cgroup subtree passes here, before TCP takes
 * it: one storage lookup for a socket that is not an undecided client end. For one that is,
 * a packet that carries bytes from rcv_nxt on proves the server has sent the echo up to its
 * end (whatever becomes of the packet itself): bytes_received plus what it adds.
 */
SEC("cgroup_skb/ingress")
int bypass_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct bpf_tcp_sock *tp;
	struct bypass_sock *me;
	struct tcp_words th;
	__u32 l3, seq, end, rcv_nxt;
	__u8 next, ihl;
	__u64 seen;

	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	me = bpf_sk_storage_get(&bypass_paths, sk, 0, 0);
	if (!me || me->role != BYPASS_ROLE_CLIENT || me->path != BYPASS_PATH_UNDECIDED)
		return 1;
	if (skb->protocol == bpf_htons(0x0800)) { /* ETH_P_IP */
		if (bpf_skb_load_bytes(skb, 0, &ihl, 1) || bpf_skb_load_bytes(skb, 9, &next, 1))
			return 1;
		l3 = (ihl & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(0x86DD)) { /* ETH_P_IPV6 */
		if (bpf_skb_load_bytes(skb, 6, &next, 1))
			return 1;
		l3 = 40; /* extension headers: no evidence taken (the client stays undecided) */
	} else {
		return 1;
	}
	if (next != IPPROTO_TCP || l3 < 20 || l3 > 60)
		return 1;
	if (bpf_skb_load_bytes(skb, l3, &th, sizeof(th)))
		return 1;
	tp = bpf_tcp_sock(sk);
	if (!tp)
		return 1;
	seq = bpf_ntohl(th.seq);
	end = seq + skb->len - l3 - (th.doff_res >> 4) * 4;
	rcv_nxt = tp->rcv_nxt;
	/* In order (seq <= rcv_nxt), and carrying something new (end > rcv_nxt). */
	if ((__s32)(seq - rcv_nxt) > 0 || (__s32)(end - rcv_nxt) <= 0)
		return 1;
	seen = tp->bytes_received + (end - rcv_nxt);
	if (seen > me->echoed)
		me->echoed = seen;
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

/* An undecided client end stays on TCP for good. */
static __always_inline int tcp_for_good(struct bypass_sock *me, struct bypass_key *mine,
					__u32 len)
{
	me->path = BYPASS_PATH_TCP;
	bpf_map_delete_elem(&bypass_links, mine);
	COUNT(tcp_conns, 1);
	return tcp(len);
}

/* Not yet: this send goes through TCP, and the path is decided at a later one. */
static __always_inline int not_yet(struct bypass_sock *me, __u32 len)
{
	if (me->sent == 0)
		COUNT(deferred_conns, 1);
	me->sent += len;
	return tcp(len);
}

/* A send of a client end whose path is undecided: take its server end's path if it may. */
static __always_inline int undecided(struct sk_msg_md *msg, struct bypass_sock *me,
				     struct bypass_key *peer, __u32 len)
{
	struct bypass_key mine = {};
	__u32 path, *link;

/*
 * ECHOD_EAGER (tests/early_redirect.py only) builds the short circuit as first written: taken
 * at a client's first send, whether or not echod has accepted the server socket yet.
 */
#ifdef ECHOD_FAULT
	/* Fault injection, for the self-check's own tests: a kernel that refuses a client's first
	 * send (the client sees EACCES). The shipped object is built without it. */
	if (me->sent == 0)
		return SK_DROP;
#endif
	swapped(&mine, peer);
	link = bpf_map_lookup_elem(&bypass_links, &mine);
	/* Evicted (LRU), or the server end refused or failed its insert. */
	if (!link || *link == BYPASS_PATH_TCP || me->sent >= BYPASS_UNDECIDED_MAX)
		return tcp_for_good(me, &mine, len);
	path = *link;
	if (path != BYPASS_PATH_INGRESS && path != BYPASS_PATH_SHORT)
		return not_yet(me, len); /* the server end is not established yet */
	if (me->sent == 0) {
		/* The ingress path takes a socket not yet accepted; the short circuit may not. */
#ifndef ECHOD_EAGER
		if (path == BYPASS_PATH_SHORT)
			return not_yet(me, len);
#endif
	} else if (me->echoed < me->sent) {
		return not_yet(me, len); /* some of what went through TCP may still be on its way */
	}
	if (bpf_msg_redirect_hash(msg, &bypass_sockets, peer, redirect_flags(path)) != SK_PASS)
		return tcp_for_good(me, &mine, len); /* the server end has gone already */
	if (me->sent)
		COUNT(late_bypassed_conns, 1);
	me->path = path;
	bpf_map_delete_elem(&bypass_links, &mine);
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
		return undecided(msg, me, &peer, len);
	if (bpf_msg_redirect_hash(msg, &bypass_sockets, &peer, redirect_flags(path)) != SK_PASS) {
		/* The peer left the map (it closed): the bytes go the way a closed peer's would. */
		COUNT(redirect_failures, 1);
		return tcp(len);
	}
	return redirected(path, len);
}

char LICENSE[] SEC("license") = "GPL";
