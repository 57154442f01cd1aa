// SPDX-License-Identifier: GPL-2.0
/*
 * Kernel echo: every skb received on a socket in echo_sockets is redirected to the egress
 * of that same socket, so the payload never reaches user space.
 *
 * Verdict only, no stream parser: echo has no message boundaries to find, and the parser
 * costs about a quarter of the throughput on the machines we measured.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "echo.h"

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, ECHO_MAX_SOCKETS);
	__type(key, __u64); /* socket cookie */
	__type(value, __u64);
} echo_sockets SEC(".maps");

/*
 * Sockets that received data since user space last looked: cookie -> bytes since then (or
 * since the bell last rang for it). User space deletes a key when it has seen the socket
 * quiet; the socket's next packet puts it back and rings the bell.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ECHO_MAX_SOCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64); /* socket cookie */
	__type(value, __u64);
} echo_active SEC(".maps");

/*
 * The doorbell: the cookie of each socket that entered echo_active, and again of one that
 * received another ECHO_BELL_EVERY bytes while in it. A record written into an empty ring
 * wakes the ring's epoll waiters, so the guard learns of new traffic at once and of a flood
 * within a few MiB, and pays nothing while every connection is idle.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, ECHO_BELL_BYTES);
} echo_bell SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct echo_counters);
} echo_counters SEC(".maps");

/*
 * Each path looks the counters up itself: when both share one pointer, clang selects the field
 * by pointer arithmetic, which the verifier refuses without CAP_PERFMON (we run with CAP_BPF).
 *
 * A zero-length skb (a FIN's) gets the same verdict as any other, but is not a request.
 */
static __always_inline int empty(void)
{
	__u32 zero = 0;
	struct echo_counters *c = bpf_map_lookup_elem(&echo_counters, &zero);

	if (c)
		c->empty_packets++;
	return SK_PASS;
}

/* A miss: the socket is leaving the map. User space finds these bytes and echoes them. */
static __always_inline int missed(__u32 len)
{
	__u32 zero = 0;
	struct echo_counters *c = bpf_map_lookup_elem(&echo_counters, &zero);

	if (c) {
		c->passed_packets++;
		c->passed_bytes += len;
		c->missed_packets++;
		c->missed_bytes += len;
	}
	return SK_PASS;
}

static __always_inline int redirected(__u32 len)
{
	__u32 zero = 0;
	struct echo_counters *c = bpf_map_lookup_elem(&echo_counters, &zero);

	if (c) {
		c->redirected_packets++;
		c->redirected_bytes += len;
	}
	return SK_PASS;
}

/* A socket entered echo_active, or received ECHO_BELL_EVERY more: count it, ring the bell. */
static __always_inline void ring(__u64 *cookie)
{
	__u32 zero = 0;
	struct echo_counters *c = bpf_map_lookup_elem(&echo_counters, &zero);

	if (c)
		c->active_marks++;
	/* A full ring is not an error: it is not empty, so its reader has been woken already. */
	bpf_ringbuf_output(&echo_bell, cookie, sizeof(*cookie), 0);
}

/* One lookup per packet; a write to the ring only when the guard should look. */
static __always_inline void mark(__u64 *cookie, __u32 len)
{
	__u64 bytes = len;
	__u64 *seen = bpf_map_lookup_elem(&echo_active, cookie);

	if (!seen) {
		/* Ring even when the set is full: the guard must hear of this socket either way. */
		bpf_map_update_elem(&echo_active, cookie, &bytes, BPF_NOEXIST);
		ring(cookie);
		return;
	}
	/* The verdict runs for one socket at a time (under its lock): no atomics needed. */
	*seen += len;
	if (*seen >= ECHO_BELL_EVERY) {
		*seen = 0;
		ring(cookie);
	}
}

SEC("sk_skb/stream_verdict")
int echo_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u32 len = skb->len;

	mark(&cookie, len);
#ifdef ECHOD_FAULT
	/* Fault injection, for the self-check's own tests: a kernel that loses 1-byte messages.
	 * The shipped object is built without it. */
	if (len == 1)
		return SK_DROP;
#endif

	/* A miss (the socket is being removed) lets the skb through to user space, which echoes it. */
	if (bpf_sk_redirect_hash(skb, &echo_sockets, &cookie, 0) != SK_PASS)
		return len ? missed(len) : empty();
	return len ? redirected(len) : empty();
}

char LICENSE[] SEC("license") = "GPL";
