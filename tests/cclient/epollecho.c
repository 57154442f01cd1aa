// SPDX-License-Identifier: GPL-2.0
/*
 * The C reference echo server of `python -m tests.userspeed`: one thread, epoll (level
 * triggered), non-blocking sockets with TCP_NODELAY, on 127.0.0.1:PORT. Each connection echoes
 * what it reads, in order; what the peer does not take yet waits in a per-connection buffer,
 * and reading stops while that holds more than HIGH bytes. After the peer's FIN the rest is
 * written, then the socket is closed. Runs until SIGTERM or SIGINT.
 *
 *     epollecho PORT
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define HIGH (256 * 1024)
#define CHUNK (64 * 1024)

struct conn {
	int fd;
	int eof;
	char *buf;	/* unsent echo: buf[off, len) */
	size_t off, len, cap;
};

static volatile sig_atomic_t stop;
static int ep;

static void on_signal(int sig) { (void)sig; stop = 1; }

static void set_events(struct conn *c) {
	struct epoll_event ev = { .data.ptr = c };
	if (c->len - c->off < HIGH && !c->eof)
		ev.events |= EPOLLIN;
	if (c->len > c->off)
		ev.events |= EPOLLOUT;
	epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void drop(struct conn *c) {
	close(c->fd);	/* also leaves the epoll set */
	free(c->buf);
	free(c);
}

/* Write what the socket takes; -1 on an error. */
static int flush(struct conn *c) {
	while (c->off < c->len) {
		ssize_t k = write(c->fd, c->buf + c->off, c->len - c->off);
		if (k < 0)
			return errno == EAGAIN || errno == EINTR ? 0 : -1;
		c->off += k;
	}
	c->off = c->len = 0;
	return 0;
}

static void serve(struct conn *c, unsigned events) {
	char tmp[CHUNK];
	int was_pending = c->len > c->off;
	if (events & (EPOLLERR | EPOLLHUP) && !(events & EPOLLIN)) {
		drop(c);
		return;
	}
	if (events & EPOLLOUT && flush(c) < 0) {
		drop(c);
		return;
	}
	if (events & EPOLLIN) {
		ssize_t k = read(c->fd, tmp, sizeof(tmp));
		if (k == 0) {
			c->eof = 1;
		} else if (k < 0) {
			if (errno != EAGAIN && errno != EINTR) {
				drop(c);
				return;
			}
		} else {
			ssize_t sent = 0;
			if (c->len == c->off) {	/* the usual case: straight back */
				sent = write(c->fd, tmp, k);
				if (sent < 0) {
					if (errno != EAGAIN && errno != EINTR) {
						drop(c);
						return;
					}
					sent = 0;
				}
			}
			if (sent < k) {
				size_t rest = k - sent;
				if (c->len + rest > c->cap) {
					c->cap = c->len + rest + CHUNK;
					c->buf = realloc(c->buf, c->cap);
					if (!c->buf) {
						perror("realloc");
						exit(1);
					}
				}
				memcpy(c->buf + c->len, tmp + sent, rest);
				c->len += rest;
			}
		}
	}
	if (c->eof && c->len == c->off) {
		drop(c);
		return;
	}
	if (was_pending != (c->len > c->off) || c->eof || c->len - c->off >= HIGH)
		set_events(c);
}

int main(int argc, char **argv) {
	if (argc < 2) {
		fprintf(stderr, "usage: epollecho PORT\n");
		return 2;
	}
	int one = 1, lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])) };
	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (void *)&a, sizeof(a)) || listen(lfd, 4096)) {
		perror("bind/listen");
		return 1;
	}
	struct sigaction sa = { .sa_handler = on_signal };
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	ep = epoll_create1(0);
	struct epoll_event lev = { .events = EPOLLIN, .data.ptr = NULL };
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
	printf("listening on 127.0.0.1:%s\n", argv[1]);
	fflush(stdout);
	struct epoll_event evs[256];
	while (!stop) {
		int n = epoll_wait(ep, evs, 256, 200);
		for (int i = 0; i < n; i++) {
			if (evs[i].data.ptr) {
				serve(evs[i].data.ptr, evs[i].events);
				continue;
			}
			for (;;) {
				int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
				if (fd < 0)
					break;
				setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
				struct conn *c = calloc(1, sizeof(*c));
				c->fd = fd;
				struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
				epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
			}
		}
	}
	return 0;
}
