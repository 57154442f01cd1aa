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

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct echo_counters);
} echo_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, ECHO_SETTINGS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} echo_settings SEC(".maps");

/*
 * Sockets that moved from kernel to user echo while data may be in flight. They stay in
 * echo_sockets, because removing a socket frees its psock queues with any bytes in them, and
 * the verdict hands their skbs to user space instead, in order behind any redirect queued before.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, ECHO_MAX_SOCKETS);
	__type(key, __u64); /* socket cookie */
	__type(value, __u8);
} echo_passthru SEC(".maps");

/*
 * Each path looks the counters up itself: when both share one pointer, clang selects the field
 * by pointer arithmetic, which the verifier refuses without CAP_PERFMON (we run with CAP_BPF).
 */
static __always_inline int pass(__u32 len)
{
	__u32 zero = 0;
	struct echo_counters *c = bpf_map_lookup_elem(&echo_counters, &zero);

	if (c) {
		c->passed_packets++;
		c->passed_bytes += len;
	}
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

SEC("sk_skb/stream_verdict")
int echo_verdict(struct __sk_buff *skb)
{
	__u32 slot = ECHO_SETTING_PASSTHRU;
	__u32 *passthru = bpf_map_lookup_elem(&echo_settings, &slot);
	__u64 cookie = bpf_get_socket_cookie(skb);
	__u32 len = skb->len;

	/* The flag keeps the hash lookup off the fast path while no socket is passing through. */
	if (passthru && *passthru && bpf_map_lookup_elem(&echo_passthru, &cookie))
		return pass(len);
	/* A miss (the socket is being removed) lets the skb through to user space, which echoes it. */
	if (bpf_sk_redirect_hash(skb, &echo_sockets, &cookie, 0) != SK_PASS)
		return missed(len);
	return redirected(len);
}

char LICENSE[] SEC("license") = "GPL";
