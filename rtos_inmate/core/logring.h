/* SPDX-License-Identifier: MIT */
/*
 * logring.h - diagnostics out of the real-time path.
 *
 * hal_log() on every platform formats its line into this RAM ring and
 * returns: no UART, no busy-wait.  The platform's main loop takes bytes out
 * with logring_take() only when the CAN side is idle (INT high, nothing
 * due: see logring_idle) and hands them to its console a few at a time
 * (the UART FIFO's worth on the Pi: no waiting on the wire).  A line that
 * does not fit is dropped whole and counted; the next line that fits is
 * preceded by a "[log: N lines dropped]" note.
 *
 * One producer and one consumer in the same execution context: not
 * interrupt- or thread-safe, like the rest of the core.
 */
#ifndef RTOS_INMATE_LOGRING_H
#define RTOS_INMATE_LOGRING_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define LOGRING_SIZE 4096u /* power of two */
#define LOGRING_LINE 160u  /* longest line, newline included */

struct logring_stats {
	uint32_t lines;         /* lines accepted */
	uint32_t dropped;       /* lines dropped: the ring was full */
	uint64_t bytes_out;     /* bytes taken by the console */
	uint32_t raw_dropped;   /* logring_write() bytes dropped: the ring was full */
};

/* Format one line (a newline is appended) into the ring. */
void logring_vput(const char *fmt, va_list ap);

/* logring_vput with the arguments given directly. */
void logring_put(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Raw bytes (no newline added: a console's echo), all or nothing; false and
 * counted in raw_dropped when they do not fit.
 */
bool logring_write(const char *p, size_t n);

/* Up to max bytes from the ring into out; returns how many. */
size_t logring_take(char *out, size_t max);

/* Bytes waiting. */
size_t logring_pending(void);

/*
 * The drain rule the main loops share: bytes wait, the INT pin is high and
 * the next timed work of the CAN side is not due yet.
 */
bool logring_idle(bool int_asserted, uint64_t now_ns, uint64_t next_deadline_ns);

const struct logring_stats *logring_get_stats(void);

/* Empty the ring and its counters (tests). */
void logring_reset(void);

#endif /* RTOS_INMATE_LOGRING_H */
