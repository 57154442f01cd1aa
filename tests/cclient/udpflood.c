// SPDX-License-Identifier: GPL-2.0
/*
 * A C UDP echo flood client, the reference for `echoctl bench --udp`: THREADS threads, each
 * with one connected UDP socket to HOST:PORT, keeping WINDOW datagrams of SIZE bytes in flight
 * with sendmmsg/recvmmsg for SECONDS. Every datagram carries its thread and sequence number and
 * a payload derived from them; every reply is checked. Prints one JSON object: datagrams/s
 * echoed, sent, received, lost (never back), duplicates, mismatches. Exit status 1 on a
 * mismatch, a duplicate or a failed socket call.
 *
 *   udpflood HOST PORT SIZE WINDOW THREADS SECONDS
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define MAXSIZE 65507

static const char *host, *port;
static int size, window, threads;
static double seconds;
static volatile int go;

struct res { uint32_t index; long sent, received, dup, bad; };

static long now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }

static void fill(unsigned char *p, uint32_t thread, uint64_t seq) {
	memcpy(p, &thread, 4);
	memcpy(p + 4, &seq, 8);
	for (int i = 12; i < size; i++) p[i] = (unsigned char)(seq * 31 + thread * 7 + i);
}

static void *run(void *arg) {
	struct res *r = arg;
	uint32_t me = r->index;
	struct addrinfo hints = { .ai_socktype = SOCK_DGRAM }, *ai;
	if (getaddrinfo(host, port, &hints, &ai)) { fprintf(stderr, "getaddrinfo failed\n"); exit(1); }
	int fd = socket(ai->ai_family, SOCK_DGRAM, 0), buf = 8 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
	if (connect(fd, ai->ai_addr, ai->ai_addrlen)) { perror("connect"); exit(1); }
	freeaddrinfo(ai);
	uint64_t cap = 1 << 26;  /* sequence numbers seen: one bit each */
	unsigned char *seen = calloc(cap / 8, 1), *out = malloc((size_t)BATCH * size);
	unsigned char *in = malloc((size_t)BATCH * MAXSIZE), *want = malloc(size);
	struct mmsghdr om[BATCH], im[BATCH];
	struct iovec oi[BATCH], ii[BATCH];
	for (int i = 0; i < BATCH; i++) {
		oi[i] = (struct iovec){ out + (size_t)i * size, (size_t)size };
		ii[i] = (struct iovec){ in + (size_t)i * MAXSIZE, MAXSIZE };
		om[i] = (struct mmsghdr){ .msg_hdr = { .msg_iov = &oi[i], .msg_iovlen = 1 } };
		im[i] = (struct mmsghdr){ .msg_hdr = { .msg_iov = &ii[i], .msg_iovlen = 1 } };
	}
	while (!go) ;
	uint64_t seq = 0;
	long outstanding = 0;  /* sent and not back; reset after a 10 ms silence (those are lost) */
	long end = now_ns() + (long)(seconds * 1e9), quiet_until = 0;
	for (;;) {
		long t = now_ns();
		int sending = t < end;
		if (!sending && !quiet_until) quiet_until = t + 500000000L;  /* 0.5 s for the last replies */
		if (!sending && t > quiet_until) break;
		if (sending && outstanding < window) {
			int n = window - outstanding < BATCH ? (int)(window - outstanding) : BATCH;
			for (int i = 0; i < n; i++) fill(out + (size_t)i * size, me, seq + i);
			int k = sendmmsg(fd, om, n, MSG_DONTWAIT);
			if (k < 0 && errno != EAGAIN && errno != ECONNREFUSED) { perror("sendmmsg"); exit(1); }
			if (k > 0) { seq += k; r->sent += k; outstanding += k; }
		}
		int k = recvmmsg(fd, im, BATCH, MSG_DONTWAIT, NULL);
		if (k < 0 && errno != EAGAIN && errno != ECONNREFUSED) { perror("recvmmsg"); exit(1); }
		if (k <= 0) {
			/* Nothing to read: wait only when nothing more may be sent. */
			struct pollfd p = { fd, POLLIN, 0 };
			if ((!sending || outstanding >= window) && poll(&p, 1, 10) == 0 && outstanding >= window)
				outstanding = 0;  /* 10 ms of silence with a full window: the rest is lost */
			continue;
		}
		for (int i = 0; i < k; i++) {
			unsigned char *d = in + (size_t)i * MAXSIZE;
			uint32_t th; uint64_t s;
			if ((int)im[i].msg_len != size) { r->bad++; continue; }
			memcpy(&th, d, 4); memcpy(&s, d + 4, 8);
			fill(want, me, s);
			if (th != me || s >= cap || memcmp(d, want, size)) { r->bad++; continue; }
			if (seen[s / 8] & (1 << (s % 8))) { r->dup++; continue; }
			seen[s / 8] |= 1 << (s % 8);
			r->received++;
			if (outstanding > 0) outstanding--;
		}
	}
	close(fd);
	return NULL;
}

int main(int argc, char **argv) {
	if (argc != 7) { fprintf(stderr, "usage: udpflood HOST PORT SIZE WINDOW THREADS SECONDS\n"); return 2; }
	host = argv[1]; port = argv[2]; size = atoi(argv[3]); window = atoi(argv[4]);
	threads = atoi(argv[5]); seconds = atof(argv[6]);
	if (size < 12 || size > MAXSIZE || window < 1 || threads < 1 || seconds <= 0) { fprintf(stderr, "bad arguments\n"); return 2; }
	struct res *rs = calloc(threads, sizeof(*rs));
	pthread_t *ts = calloc(threads, sizeof(*ts));
	for (int i = 0; i < threads; i++) {
		rs[i].index = (uint32_t)i;
		pthread_create(&ts[i], NULL, run, &rs[i]);
	}
	long t0 = now_ns();
	go = 1;
	struct res total = { 0 };
	for (int i = 0; i < threads; i++) {
		pthread_join(ts[i], NULL);
		total.sent += rs[i].sent; total.received += rs[i].received;
		total.dup += rs[i].dup; total.bad += rs[i].bad;
	}
	double took = (now_ns() - t0) / 1e9 - 0.5;
	printf("{\"datagrams_per_s\": %.0f, \"sent\": %ld, \"received\": %ld, \"lost\": %ld, "
	       "\"duplicates\": %ld, \"mismatches\": %ld}\n",
	       total.received / (took > seconds ? seconds : took), total.sent, total.received,
	       total.sent - total.received, total.dup, total.bad);
	return total.dup || total.bad;
}
