/* SPDX-License-Identifier: MIT */
/* simlink.c - sim hub peer for the hosted inmate; see simlink.h and sim-link.md. */
#define _GNU_SOURCE /* ppoll, MSG_CMSG_CLOEXEC */

#include "simlink.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "hal.h"

#define MAX_HUB_MESSAGES 256 /* handled per simlink_process_hub call */

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void drop_peer(struct simlink *s, uint32_t peer)
{
	for (uint32_t v = 0; v < IVL_MAX_VECTORS; v++)
		close_fd(&s->fds[peer][v]);
	s->nfds[peer] = 0;
}

/*
 * Receive more of one message.  Returns 1 with *value and *fd when a message is
 * complete, 0 when more bytes are needed (EAGAIN), or a negative errno
 * (-EPIPE at end of stream, -EPROTO for two fds in one message).
 */
static int recv_part(struct simlink *s, int flags, int64_t *value, int *fd)
{
	union {
		struct cmsghdr hdr;
		char buf[CMSG_SPACE(sizeof(int) * 4)];
	} ctl;
	struct iovec iov = { .iov_base = &s->rxbuf[s->rxlen], .iov_len = 8 - s->rxlen };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.buf,
			      .msg_controllen = sizeof(ctl.buf) };
	ssize_t n = recvmsg(s->sock, &msg, flags | MSG_CMSG_CLOEXEC);
	bool extra_fd = false;

	if (n < 0)
		return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -errno;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);

		for (size_t i = 0; i < nfd; i++) {
			int got;

			memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (s->rxfd < 0) {
				s->rxfd = got;
			} else {
				close(got);
				extra_fd = true;
			}
		}
	}
	if (msg.msg_flags & MSG_CTRUNC)
		extra_fd = true;
	if (extra_fd) {
		close_fd(&s->rxfd);
		s->rxlen = 0;
		return -EPROTO;
	}
	if (n == 0)
		return -EPIPE;
	s->rxlen += (size_t)n;
	if (s->rxlen < 8)
		return 0;
	uint64_t v = 0;

	for (int i = 7; i >= 0; i--)
		v = v << 8 | s->rxbuf[i];
	*value = (int64_t)v;
	*fd = s->rxfd;
	s->rxfd = -1;
	s->rxlen = 0;
	return 1;
}

/* Blocking receive of one whole message, for the handshake. */
static int recv_msg(struct simlink *s, uint64_t deadline_ms, int64_t *value, int *fd)
{
	for (;;) {
		uint64_t now = mono_ms();
		struct pollfd p = { .fd = s->sock, .events = POLLIN };

		if (now >= deadline_ms)
			return -ETIMEDOUT;
		int r = poll(&p, 1, (int)(deadline_ms - now));

		if (r < 0 && errno != EINTR)
			return -errno;
		if (r <= 0)
			continue;
		r = recv_part(s, MSG_DONTWAIT, value, fd);
		if (r != 0)
			return r;
	}
}

/* An eventfd of peer (join), or its leave (fd < 0). */
static void peer_message(struct simlink *s, int64_t peer, int fd)
{
	if (peer < 0 || (uint64_t)peer >= s->max_peers) {
		s->hub_errors++;
		close_fd(&fd);
		return;
	}
	uint32_t p = (uint32_t)peer;

	if (fd < 0) {
		if (p != s->id) {
			drop_peer(s, p);
			s->leaves++;
		}
		return;
	}
	if (s->nfds[p] >= s->vectors)
		drop_peer(s, p); /* a new incarnation of that ID */
	if (s->nfds[p] == 0u && p != s->id)
		s->joins++;
	s->fds[p][s->nfds[p]++] = fd;
}

void simlink_process_hub(struct simlink *s)
{
	for (int i = 0; i < MAX_HUB_MESSAGES && s->hub_open; i++) {
		int64_t value;
		int fd = -1;
		int r = recv_part(s, MSG_DONTWAIT, &value, &fd);

		if (r == 0)
			return;
		if (r < 0) {
			if (r == -EPROTO) {
				s->hub_errors++;
				continue;
			}
			/* hub gone: the link keeps working with the fds we hold */
			hal_log("simlink: hub connection closed (%s)", strerror(-r));
			s->hub_open = false;
			return;
		}
		peer_message(s, value, fd);
	}
}

/* ---- registers ------------------------------------------------------------ */

static void ring(struct simlink *s, uint32_t peer, uint32_t vector)
{
	const uint64_t one = 1;

	if (peer >= s->max_peers || vector >= s->nfds[peer])
		return;
	if (write(s->fds[peer][vector], &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is saturated, an interrupt is pending anyway */
	}
}

static void op_set_state(void *ctx, uint32_t value)
{
	struct simlink *s = ctx;
	uint32_t old = ivl_own_state(&s->link);

	shm_st32(&s->link.state_table, 4u * (size_t)s->id, value);
	if (old == value)
		return;
	shm_fence();
	simlink_process_hub(s);
	for (uint32_t p = 0; p < s->max_peers; p++)
		if (p != s->id)
			ring(s, p, 0);
}

static void op_doorbell(void *ctx, uint32_t peer, uint32_t vector)
{
	struct simlink *s = ctx;

	if (peer >= s->max_peers || vector >= s->vectors)
		return; /* Jailhouse drops these too */
	if (s->nfds[peer] <= vector)
		simlink_process_hub(s); /* maybe its join is still queued */
	ring(s, peer, vector);
}

static void drain_own(struct simlink *s)
{
	uint64_t count;

	/* a read empties an eventfd counter; the bound only stops a peer that keeps ringing */
	for (uint32_t v = 0; v < s->nfds[s->id]; v++)
		for (int i = 0; i < 16; i++)
			if (read(s->fds[s->id][v], &count, sizeof(count)) != (ssize_t)sizeof(count))
				break;
}

static void op_set_int_control(void *ctx, bool enabled)
{
	struct simlink *s = ctx;

	if (enabled && !s->int_control)
		drain_own(s); /* what arrived while disabled is lost, as on Jailhouse */
	s->int_control = enabled;
}

static int op_wait(void *ctx, uint64_t timeout_ns)
{
	struct simlink *s = ctx;
	struct pollfd p[IVL_MAX_VECTORS + 1];
	uint32_t n = 0, own = s->nfds[s->id];
	struct timespec ts = { .tv_sec = (time_t)(timeout_ns / 1000000000u),
			       .tv_nsec = (long)(timeout_ns % 1000000000u) };
	int mask = 0;

	for (uint32_t v = 0; v < own; v++)
		p[n++] = (struct pollfd){ .fd = s->fds[s->id][v], .events = POLLIN };
	if (s->hub_open)
		p[n++] = (struct pollfd){ .fd = s->sock, .events = POLLIN };
	int r = ppoll(p, n, &ts, NULL);

	if (r < 0)
		return errno == EINTR ? 0 : -errno;
	for (uint32_t v = 0; v < own; v++) {
		uint64_t count;

		if (!(p[v].revents & POLLIN))
			continue;
		if (read(s->fds[s->id][v], &count, sizeof(count)) == (ssize_t)sizeof(count) &&
		    count > 0u && s->int_control)
			mask |= 1 << v;
	}
	if (s->hub_open && n > own && (p[own].revents & (POLLIN | POLLHUP | POLLERR)))
		simlink_process_hub(s);
	return mask;
}

static const struct ivshmem_link_ops simlink_ops = {
	.set_state = op_set_state,
	.doorbell = op_doorbell,
	.set_int_control = op_set_int_control,
	.wait = op_wait,
};

/* ---- open / close ----------------------------------------------------------- */

static void reset(struct simlink *s)
{
	memset(s, 0, sizeof(*s));
	s->sock = -1;
	s->rxfd = -1;
	for (uint32_t p = 0; p < SIMLINK_MAX_PEERS; p++)
		for (uint32_t v = 0; v < IVL_MAX_VECTORS; v++)
			s->fds[p][v] = -1;
}

static int handshake(struct simlink *s, int64_t requested_id, uint64_t deadline)
{
	uint8_t req[8];
	int64_t v, geo[6];
	int fd = -1, shm_fd = -1, rc;
	struct stat st;

	for (int i = 0; i < 8; i++)
		req[i] = (uint8_t)(((uint64_t)requested_id >> (8 * i)) & 0xFFu);
	if (send(s->sock, req, sizeof(req), MSG_NOSIGNAL) != (ssize_t)sizeof(req))
		return -errno;
	rc = recv_msg(s, deadline, &v, &fd);
	if (rc < 0)
		return rc;
	close_fd(&fd);
	if (v != SIMLINK_HUB_VERSION) {
		hal_log("simlink: hub speaks version %lld, not %d", (long long)v,
			SIMLINK_HUB_VERSION);
		return -EPROTO;
	}
	rc = recv_msg(s, deadline, &v, &fd);
	if (rc < 0)
		return rc;
	close_fd(&fd);
	if (v < 0)
		return v >= -4095 ? (int)v : -EPROTO; /* -EBUSY, -EINVAL from the hub */
	if (v >= SIMLINK_MAX_PEERS)
		return -EPROTO;
	s->id = (uint32_t)v;
	rc = recv_msg(s, deadline, &v, &shm_fd);
	if (rc < 0)
		return rc;
	if (v != -1 || shm_fd < 0) {
		close_fd(&shm_fd);
		return -EPROTO;
	}
	for (int i = 0; i < 6; i++) {
		rc = recv_msg(s, deadline, &geo[i], &fd);
		if (rc < 0 || fd >= 0) {
			close_fd(&fd);
			close_fd(&shm_fd);
			return rc < 0 ? rc : -EPROTO;
		}
	}
	/* max_peers, vectors, state_table_size, rw_size, output_size, protocol */
	if (geo[0] < 2 || geo[0] > (int64_t)SIMLINK_MAX_PEERS || geo[1] < 1 ||
	    geo[1] > (int64_t)IVL_MAX_VECTORS || geo[2] < 4 * geo[0] ||
	    geo[2] > (int64_t)SIMLINK_MAX_SECTION || geo[3] < 0 ||
	    geo[3] > (int64_t)SIMLINK_MAX_SECTION || geo[4] < 0 ||
	    geo[4] > (int64_t)SIMLINK_MAX_SECTION || geo[5] < 0 || geo[5] > 0xFFFF ||
	    (int64_t)s->id >= geo[0]) {
		hal_log("simlink: impossible geometry from the hub");
		close_fd(&shm_fd);
		return -EPROTO;
	}
	s->max_peers = (uint32_t)geo[0];
	s->vectors = (uint32_t)geo[1];
	s->state_table_size = (uint64_t)geo[2];
	s->rw_size = (uint64_t)geo[3];
	s->output_size = (uint64_t)geo[4];
	s->protocol = (uint32_t)geo[5];
	s->map_len = (size_t)(s->state_table_size + s->rw_size + s->max_peers * s->output_size);
	if (fstat(shm_fd, &st) < 0 || (uint64_t)st.st_size < s->map_len) {
		hal_log("simlink: shared memory smaller than its layout");
		close_fd(&shm_fd);
		return -EPROTO;
	}
	s->map = mmap(NULL, s->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, shm_fd, 0);
	close_fd(&shm_fd);
	if (s->map == MAP_FAILED) {
		s->map = NULL;
		return -errno;
	}
	/* eventfds: every connected peer's, then ours last */
	for (int guard = 0; s->nfds[s->id] < s->vectors && guard < 4096; guard++) {
		rc = recv_msg(s, deadline, &v, &fd);
		if (rc < 0)
			return rc;
		peer_message(s, v, fd);
	}
	if (s->nfds[s->id] < s->vectors)
		return -EPROTO;
	return 0;
}

int simlink_open(struct simlink *s, const char *path, int64_t requested_id,
		 uint32_t timeout_ms)
{
	struct sockaddr_un addr;
	int rc;

	if (s == NULL || path == NULL)
		return -EINVAL;
	reset(s);
	if (strlen(path) >= sizeof(addr.sun_path))
		return -ENAMETOOLONG;
	s->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s->sock < 0)
		return -errno;
	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path, path, strlen(path) + 1);
	if (connect(s->sock, (const struct sockaddr *)&addr, sizeof(addr)) < 0) {
		rc = -errno;
		simlink_close(s);
		return rc;
	}
	s->hub_open = true;
	rc = handshake(s, requested_id, mono_ms() + timeout_ms);
	if (rc < 0) {
		simlink_close(s);
		return rc;
	}
	int fl = fcntl(s->sock, F_GETFL);

	if (fl >= 0)
		(void)fcntl(s->sock, F_SETFL, fl | O_NONBLOCK);
	uint8_t *base = s->map;

	s->link = (struct ivshmem_link){
		.id = s->id,
		.max_peers = s->max_peers,
		.vectors = s->vectors,
		.protocol = s->protocol,
		.state_table = { base, (size_t)s->state_table_size },
		.rw = { base + s->state_table_size, (size_t)s->rw_size },
		.ops = &simlink_ops,
		.ctx = s,
	};
	return 0;
}

void simlink_close(struct simlink *s)
{
	if (s == NULL)
		return;
	for (uint32_t p = 0; p < SIMLINK_MAX_PEERS; p++)
		drop_peer(s, p);
	close_fd(&s->rxfd);
	if (s->map != NULL)
		munmap(s->map, s->map_len);
	s->map = NULL;
	close_fd(&s->sock);
	s->hub_open = false;
}

const char *simlink_strerror(int rc)
{
	if (rc == -EPROTO)
		return "hub protocol violation";
	return strerror(rc < 0 ? -rc : rc);
}
