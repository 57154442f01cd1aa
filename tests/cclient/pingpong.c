// SPDX-License-Identifier: GPL-2.0
/*
 * A C ping-pong client for `python -m tests.cpaths`: CONNS threads, one connection each to
 * 127.0.0.1:PORT, each sending SIZE random bytes and reading them back for SECONDS. Prints one
 * JSON object (req/s, requests, mismatches, p50 and p99 latency); every echoed byte is
 * compared with what was sent. Exit status 1 on a mismatch or a failed socket call.
 *
 * With a fifth argument `crr`, each request is a connection of its own: connect, send SIZE
 * bytes, read them back, close (qps is then connections per second, and the latency is the
 * whole connection's).
 *
 *     pingpong PORT CONNS SIZE SECONDS [crr]
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port, size, conns, crr;
static double seconds;
static volatile int go;
struct res { long n; long bad; long *lat; long cap; };

static long now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000L + t.tv_nsec; }

static int dial(void) {
	int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	if (connect(fd, (void *)&a, sizeof(a))) { perror("connect"); exit(1); }
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

static void *run(void *arg) {
	struct res *r = arg;
	int fd = crr ? -1 : dial();
	char *out = malloc(size), *in = malloc(size);
	unsigned seed = (unsigned)(long)r;
	while (!go) ;
	long end = now_ns() + (long)(seconds * 1e9);
	while (now_ns() < end) {
		for (int i = 0; i < size; i++) out[i] = rand_r(&seed);
		long t0 = now_ns();
		if (crr) fd = dial();
		if (write(fd, out, size) != size) { perror("write"); exit(1); }
		int got = 0;
		while (got < size) { int k = read(fd, in + got, size - got); if (k <= 0) { perror("read"); exit(1); } got += k; }
		if (crr) close(fd);
		long dt = now_ns() - t0;
		if (memcmp(in, out, size)) r->bad++;
		if (r->n < r->cap) r->lat[r->n] = dt;
		r->n++;
	}
	if (!crr) close(fd);
	return NULL;
}

static int cmp(const void *a, const void *b) { long x = *(long *)a, y = *(long *)b; return x < y ? -1 : x > y; }

int main(int argc, char **argv) {
	if (argc < 5) { fprintf(stderr, "usage: pingpong PORT CONNS SIZE SECONDS [crr]\n"); return 2; }
	port = atoi(argv[1]); conns = atoi(argv[2]); size = atoi(argv[3]); seconds = atof(argv[4]);
	crr = argc > 5 && !strcmp(argv[5], "crr");
	pthread_t th[conns]; struct res rs[conns];
	for (int i = 0; i < conns; i++) {
		rs[i] = (struct res){ .cap = 1 << 21 }; rs[i].lat = malloc(sizeof(long) * rs[i].cap);
		pthread_create(&th[i], NULL, run, &rs[i]);
	}
	usleep(200000); go = 1;
	long n = 0, bad = 0, m = 0;
	for (int i = 0; i < conns; i++) { pthread_join(th[i], NULL); n += rs[i].n; bad += rs[i].bad; }
	long *all = malloc(sizeof(long) * (n + 1));
	for (int i = 0; i < conns; i++) { long k = rs[i].n < rs[i].cap ? rs[i].n : rs[i].cap; memcpy(all + m, rs[i].lat, k * sizeof(long)); m += k; }
	qsort(all, m, sizeof(long), cmp);
	printf("{\"qps\": %.0f, \"requests\": %ld, \"mismatches\": %ld, \"p50_us\": %.2f, \"p99_us\": %.2f}\n",
	       n / seconds, n, bad, all[m / 2] / 1000.0, all[(long)(m * 0.99)] / 1000.0);
	return bad != 0;
}
