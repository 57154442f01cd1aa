/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between echo.bpf.c and echod/kernel/echo.py: the only place these are defined. */
#ifndef ECHOD_ECHO_H
#define ECHOD_ECHO_H

/* Capacity of the sockhash (and of echo_active): kernel mode serves at most this many
 * connections at once, across every worker. */
#define ECHO_MAX_SOCKETS 262144

/* Size of the echo_bell ring (a power of two, a multiple of the page size). */
#define ECHO_BELL_BYTES 16384
/* A socket in echo_active rings the bell again after this many more bytes (8 MiB). */
#define ECHO_BELL_EVERY (8ULL << 20)

/* One per-CPU value of the "echo_counters" map (a one-slot PERCPU_ARRAY). */
struct echo_counters {
	__u64 redirected_packets; /* skbs with data sent back out of the socket they came from */
	__u64 redirected_bytes;
	__u64 passed_packets;     /* skbs with data that fell through to user space */
	__u64 passed_bytes;
	__u64 missed_packets;     /* of those, skbs whose redirect missed the sockhash */
	__u64 missed_bytes;
	__u64 empty_packets;      /* zero-length skbs (a FIN's): given the same verdict, counted only here */
	__u64 active_marks;       /* rings tried on echo_bell (counted before the write: a full ring drops it) */
};

#endif
