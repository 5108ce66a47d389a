/* SPDX-License-Identifier: MIT */
/*
 * util.h - the few libc-like helpers freestanding core code needs.
 *
 * Named util_* so they never collide with the C library of the hosted
 * build or with the Jailhouse inmate library's own mem and str functions.
 */
#ifndef RTOS_INMATE_UTIL_H
#define RTOS_INMATE_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define UTIL_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

void *util_memcpy(void *dst, const void *src, size_t n);
void *util_memset(void *dst, int c, size_t n);
int util_memcmp(const void *a, const void *b, size_t n);
size_t util_strnlen(const char *s, size_t max);

/* Value of one hex digit, or -1. */
int util_hexval(char c);

/*
 * Small vsnprintf: %% %c %s %d %i %u %x %X %p, flags '0' and '-', a decimal
 * width, length modifiers l, ll, z.  Always NUL-terminates when size > 0.
 * Returns the length the full output has (without the NUL), as snprintf
 * does, so a result >= size means truncated.  An unknown conversion is
 * copied as-is.
 */
int util_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
int util_snprintf(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif /* RTOS_INMATE_UTIL_H */
