/* SPDX-License-Identifier: MIT */
/*
 * hal_hosted.c - hal.h for a Linux process: SPI and the INT pin are served
 * by the Python MCP2515 simulator over a UNIX socket (spi_proto.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "hal_hosted.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "hal.h"
#include "logring.h"
#include "spi_proto.h"

static int sock_fd = -1;
static bool link_ok;
static bool quiet;
static uint64_t spi_bytes;
static bool sim_time; /* a simulator answered HELLO: its clock is the time */

static void link_fail(const char *what, int err)
{
	if (link_ok && !quiet)
		fprintf(stderr, "hal_hosted: %s: %s; link closed\n", what,
			err ? strerror(err) : "protocol error");
	link_ok = false;
	if (sock_fd >= 0) {
		close(sock_fd);
		sock_fd = -1;
	}
}

static int write_all(const uint8_t *p, size_t n)
{
	while (n > 0) {
		ssize_t w = send(sock_fd, p, n, MSG_NOSIGNAL);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static int read_all(uint8_t *p, size_t n)
{
	while (n > 0) {
		ssize_t r = recv(sock_fd, p, n, 0);

		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (r == 0)
			return -EPIPE;
		p += r;
		n -= (size_t)r;
	}
	return 0;
}

/* One request/reply exchange; the reply payload must be exactly rlen bytes. */
static int exchange(uint8_t op, const uint8_t *payload, size_t plen, uint8_t *reply,
		    size_t rlen)
{
	uint8_t msg[SPIP_HDR_LEN + SPIP_MAX_XFER];
	uint8_t hdr[SPIP_HDR_LEN];
	int rc;

	if (!link_ok)
		return -EPIPE;
	if (plen > SPIP_MAX_XFER)
		return -EINVAL;
	msg[0] = op;
	msg[1] = 0;
	msg[2] = (uint8_t)(plen & 0xFFu);
	msg[3] = (uint8_t)(plen >> 8);
	if (plen > 0)
		memcpy(&msg[SPIP_HDR_LEN], payload, plen);
	rc = write_all(msg, SPIP_HDR_LEN + plen);
	if (rc < 0) {
		link_fail("send", -rc);
		return rc;
	}
	rc = read_all(hdr, sizeof(hdr));
	if (rc < 0) {
		link_fail("recv", -rc);
		return rc;
	}
	size_t got = (size_t)hdr[2] | ((size_t)hdr[3] << 8);

	if (hdr[0] != (uint8_t)(op | SPIP_REPLY) || hdr[1] != 0 || got != rlen) {
		link_fail("bad reply header", 0);
		return -EPROTO;
	}
	if (rlen > 0) {
		rc = read_all(reply, rlen);
		if (rc < 0) {
			link_fail("recv", -rc);
			return rc;
		}
	}
	return 0;
}

int hal_hosted_open(const char *socket_path)
{
	struct sockaddr_un addr;
	uint8_t hello[6];
	uint8_t ver[2];
	int rc;

	if (socket_path == NULL || strlen(socket_path) >= sizeof(addr.sun_path))
		return -EINVAL;
	hal_hosted_close();
	sock_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock_fd < 0)
		return -errno;
	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	memcpy(addr.sun_path, socket_path, strlen(socket_path) + 1);
	if (connect(sock_fd, (const struct sockaddr *)&addr, sizeof(addr)) < 0) {
		rc = -errno;
		close(sock_fd);
		sock_fd = -1;
		return rc;
	}
	link_ok = true;
	hello[0] = (uint8_t)(SPIP_MAGIC & 0xFFu);
	hello[1] = (uint8_t)((SPIP_MAGIC >> 8) & 0xFFu);
	hello[2] = (uint8_t)((SPIP_MAGIC >> 16) & 0xFFu);
	hello[3] = (uint8_t)((SPIP_MAGIC >> 24) & 0xFFu);
	hello[4] = (uint8_t)(SPIP_VERSION & 0xFFu);
	hello[5] = (uint8_t)(SPIP_VERSION >> 8);
	rc = exchange(SPIP_OP_HELLO, hello, sizeof(hello), ver, sizeof(ver));
	if (rc < 0)
		return rc;
	if (((unsigned int)ver[0] | ((unsigned int)ver[1] << 8)) != SPIP_VERSION) {
		link_fail("version mismatch", 0);
		return -EPROTO;
	}
	sim_time = true;
	return 0;
}

void hal_hosted_close(void)
{
	hal_hosted_log_flush();
	if (sock_fd >= 0)
		close(sock_fd);
	sock_fd = -1;
	link_ok = false;
}

bool hal_hosted_ok(void)
{
	return link_ok;
}

void hal_hosted_set_quiet(bool q)
{
	quiet = q;
}

uint64_t hal_hosted_spi_bytes(void)
{
	return spi_bytes;
}

/* ---- hal.h ---- */

int hal_spi_transfer(const uint8_t *tx, uint8_t *rx, size_t n)
{
	uint8_t miso[SPIP_MAX_XFER];
	int rc;

	if (tx == NULL || n == 0 || n > SPIP_MAX_XFER)
		return -EINVAL;
	rc = exchange(SPIP_OP_XFER, tx, n, miso, n);
	if (rc < 0)
		return rc;
	spi_bytes += n;
	if (rx != NULL)
		memcpy(rx, miso, n);
	return 0;
}

bool hal_int_asserted(void)
{
	uint8_t level = 1;

	if (exchange(SPIP_OP_INT, NULL, 0, &level, 1) < 0)
		return false;
	return level == 0;
}

bool hal_int_wait(uint64_t timeout_ns)
{
	uint64_t us = timeout_ns / 1000u;
	uint8_t p[4];
	uint8_t level = 1;

	if (timeout_ns == 0)
		return hal_int_asserted();
	if (us > SPIP_MAX_WAIT_US)
		us = SPIP_MAX_WAIT_US;
	if (us == 0)
		us = 1;
	p[0] = (uint8_t)(us & 0xFFu);
	p[1] = (uint8_t)((us >> 8) & 0xFFu);
	p[2] = (uint8_t)((us >> 16) & 0xFFu);
	p[3] = (uint8_t)((us >> 24) & 0xFFu);
	if (exchange(SPIP_OP_WAIT, p, sizeof(p), &level, 1) < 0)
		return false;
	return level == 0;
}

/*
 * The chip's clock, not the host's: with simulated bus time (hwsim/simclock.py)
 * the driver's timers must run on the time the bus runs on.  Without a link,
 * the last time seen (timers then stop; every other call fails fast anyway).
 */
uint64_t hal_now_ns(void)
{
	static uint64_t last;
	uint8_t t[8];

	if (!sim_time) {
		/* programs without a chip (the virtio-only hosted builds) */
		struct timespec ts;

		clock_gettime(CLOCK_MONOTONIC, &ts);
		return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
	}
	if (exchange(SPIP_OP_TIME, NULL, 0, t, sizeof(t)) == 0) {
		uint64_t v = 0;

		for (int i = 7; i >= 0; i--)
			v = (v << 8) | t[i];
		if (v > last)
			last = v;
	}
	return last;
}

void hal_delay_us(uint32_t us)
{
	uint8_t p[4];

	if (!sim_time) {
		struct timespec ts = { .tv_sec = us / 1000000u,
				       .tv_nsec = (long)(us % 1000000u) * 1000L };

		while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
		}
		return;
	}
	if (us > SPIP_MAX_WAIT_US)
		us = SPIP_MAX_WAIT_US;
	p[0] = (uint8_t)(us & 0xFFu);
	p[1] = (uint8_t)((us >> 8) & 0xFFu);
	p[2] = (uint8_t)((us >> 16) & 0xFFu);
	p[3] = (uint8_t)((us >> 24) & 0xFFu);
	(void)exchange(SPIP_OP_DELAY, p, sizeof(p), NULL, 0);
}

/* Into the RAM ring only: the main loop drains it when idle (logring.h). */
void hal_log(const char *fmt, ...)
{
	va_list ap;

	if (quiet)
		return;
	va_start(ap, fmt);
	logring_vput(fmt, ap);
	va_end(ap);
}

size_t hal_hosted_log_drain(size_t max)
{
	char buf[SPIP_MAX_XFER];

	if (max > sizeof(buf))
		max = sizeof(buf);
	size_t n = logring_take(buf, max);

	if (n == 0)
		return 0;
	fwrite(buf, 1, n, stderr);
	fflush(stderr);
	/* the simulator is the UART: it notes what the driver was doing meanwhile */
	(void)exchange(SPIP_OP_UART, (const uint8_t *)buf, n, NULL, 0);
	return n;
}

void hal_hosted_log_flush(void)
{
	char buf[SPIP_MAX_XFER];
	size_t n;

	while ((n = logring_take(buf, sizeof(buf))) > 0)
		fwrite(buf, 1, n, stderr);
	fflush(stderr);
}
