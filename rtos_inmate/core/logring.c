/* SPDX-License-Identifier: MIT */
/* logring.c - hal_log's RAM ring, drained when idle; see logring.h. */
#include "logring.h"

#include "util.h"

static char ring[LOGRING_SIZE];
static uint32_t head; /* next byte to write (free-running) */
static uint32_t tail; /* next byte to take (free-running) */
static uint32_t dropped_unreported;
static struct logring_stats st;

static size_t space(void)
{
	return LOGRING_SIZE - (size_t)(head - tail);
}

static void put_bytes(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		ring[(head + i) & (LOGRING_SIZE - 1u)] = p[i];
	head += (uint32_t)n;
}

static size_t format_line(char *line, size_t size, const char *fmt, va_list ap)
{
	int n = util_vsnprintf(line, size - 1u, fmt, ap);
	size_t len = n < 0 ? 0u : (size_t)n;

	if (len > size - 2u)
		len = size - 2u; /* truncated: keep the newline */
	line[len++] = '\n';
	return len;
}

static size_t note_line(char *line, size_t size, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	size_t len = format_line(line, size, fmt, ap);
	va_end(ap);
	return len;
}

void logring_vput(const char *fmt, va_list ap)
{
	char line[LOGRING_LINE];
	char note[48];
	size_t len = format_line(line, sizeof(line), fmt, ap);
	size_t nlen = 0;

	if (dropped_unreported != 0u)
		nlen = note_line(note, sizeof(note), "[log: %u lines dropped]",
				 (unsigned int)dropped_unreported);
	if (len + nlen > space()) {
		dropped_unreported++;
		st.dropped++;
		return;
	}
	if (nlen != 0u) {
		put_bytes(note, nlen);
		dropped_unreported = 0;
	}
	put_bytes(line, len);
	st.lines++;
}

void logring_put(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	logring_vput(fmt, ap);
	va_end(ap);
}

bool logring_write(const char *p, size_t n)
{
	if (n > space()) {
		st.raw_dropped += (uint32_t)n;
		return false;
	}
	put_bytes(p, n);
	return true;
}

size_t logring_take(char *out, size_t max)
{
	size_t n = (size_t)(head - tail);

	if (n > max)
		n = max;
	for (size_t i = 0; i < n; i++)
		out[i] = ring[(tail + i) & (LOGRING_SIZE - 1u)];
	tail += (uint32_t)n;
	st.bytes_out += n;
	return n;
}

size_t logring_pending(void)
{
	return (size_t)(head - tail);
}

bool logring_idle(bool int_asserted, uint64_t now_ns, uint64_t next_deadline_ns)
{
	return head != tail && !int_asserted && now_ns < next_deadline_ns;
}

const struct logring_stats *logring_get_stats(void)
{
	return &st;
}

void logring_reset(void)
{
	head = tail = 0;
	dropped_unreported = 0;
	util_memset(&st, 0, sizeof(st));
}
