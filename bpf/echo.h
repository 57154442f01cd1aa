/* SPDX-License-Identifier: GPL-2.0 */
/* Shared between echo.bpf.c and echod/sockmap.py: the only place these are defined. */
#ifndef ECHOD_ECHO_H
#define ECHOD_ECHO_H

/* Capacity of the sockhash: the daemon refuses kernel mode beyond this many connections. */
#define ECHO_MAX_SOCKETS 65536

/* Slots of the "echo_settings" array map. */
#define ECHO_SETTING_PASSTHRU 0 /* non-zero: some sockets are in echo_passthru; look them up */
#define ECHO_SETTINGS_MAX 1

/* One per-CPU value of the "echo_counters" map (a one-slot PERCPU_ARRAY). */
struct echo_counters {
	__u64 redirected_packets; /* skbs sent back out of the socket they came from */
	__u64 redirected_bytes;
	__u64 passed_packets;     /* skbs that fell through to user space (both reasons below) */
	__u64 passed_bytes;
	__u64 missed_packets;     /* of those, skbs whose redirect missed (not a pass-through socket) */
	__u64 missed_bytes;
};

#endif
