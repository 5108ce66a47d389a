/* SPDX-License-Identifier: MIT */
/* util.c - freestanding helpers, see util.h. */
#include "util.h"

void *util_memcpy(void *dst, const void *src, size_t n)
{
	uint8_t *d = dst;
	const uint8_t *s = src;

	for (size_t i = 0; i < n; i++)
		d[i] = s[i];
	return dst;
}

void *util_memset(void *dst, int c, size_t n)
{
	uint8_t *d = dst;

	for (size_t i = 0; i < n; i++)
		d[i] = (uint8_t)c;
	return dst;
}

int util_memcmp(const void *a, const void *b, size_t n)
{
	const uint8_t *x = a;
	const uint8_t *y = b;

	for (size_t i = 0; i < n; i++) {
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	}
	return 0;
}

size_t util_strnlen(const char *s, size_t max)
{
	size_t n = 0;

	while (n < max && s[n] != '\0')
		n++;
	return n;
}

int util_hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* Output cursor that never writes past the buffer. */
struct out {
	char *buf;
	size_t size;
	size_t pos;
};

/* Counts every character, stores only what fits (snprintf semantics). */
static void out_ch(struct out *o, char c)
{
	if (o->pos + 1 < o->size)
		o->buf[o->pos] = c;
	o->pos++;
}

static void out_padded(struct out *o, const char *s, size_t len, unsigned width,
		       bool left, char pad)
{
	size_t fill = width > len ? width - len : 0;

	if (!left) {
		for (size_t i = 0; i < fill; i++)
			out_ch(o, pad);
	}
	for (size_t i = 0; i < len; i++)
		out_ch(o, s[i]);
	if (left) {
		for (size_t i = 0; i < fill; i++)
			out_ch(o, ' ');
	}
}

static void out_number(struct out *o, unsigned long long v, bool neg, unsigned base,
		       bool upper, unsigned width, bool left, bool zero)
{
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	char tmp[24]; /* 2^64 has 20 decimal digits, plus sign */
	size_t n = 0;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v != 0 && n < sizeof(tmp) - 1);

	if (zero && !left) {
		/* sign first, then zeros */
		if (neg) {
			out_ch(o, '-');
			if (width > 0)
				width--;
		}
		for (size_t i = n; i < width; i++)
			out_ch(o, '0');
		while (n > 0)
			out_ch(o, tmp[--n]);
		return;
	}
	if (neg)
		tmp[n++] = '-';
	char rev[sizeof(tmp)];
	for (size_t i = 0; i < n; i++)
		rev[i] = tmp[n - 1 - i];
	out_padded(o, rev, n, width, left, ' ');
}

int util_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };

	while (*fmt != '\0') {
		if (*fmt != '%') {
			out_ch(&o, *fmt++);
			continue;
		}
		const char *start = fmt++;
		bool left = false, zero = false;
		unsigned width = 0;
		int lng = 0; /* 0 int, 1 long, 2 long long, 3 size_t */

		for (;; fmt++) {
			if (*fmt == '-')
				left = true;
			else if (*fmt == '0')
				zero = true;
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9' && width < 1000u)
			width = width * 10u + (unsigned)(*fmt++ - '0');
		if (*fmt == 'l') {
			lng = 1;
			if (*++fmt == 'l') {
				lng = 2;
				fmt++;
			}
		} else if (*fmt == 'z') {
			lng = 3;
			fmt++;
		}

		char conv = *fmt;
		if (conv == '\0')
			break;
		fmt++;
		switch (conv) {
		case '%':
			out_ch(&o, '%');
			break;
		case 'c': {
			char c = (char)va_arg(ap, int);
			out_padded(&o, &c, 1, width, left, ' ');
			break;
		}
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (s == NULL)
				s = "(null)";
			out_padded(&o, s, util_strnlen(s, 4096), width, left, ' ');
			break;
		}
		case 'd':
		case 'i': {
			long long v;
			if (lng == 2)
				v = va_arg(ap, long long);
			else if (lng == 1)
				v = va_arg(ap, long);
			else if (lng == 3)
				v = (long long)va_arg(ap, size_t);
			else
				v = va_arg(ap, int);
			/* negate in unsigned arithmetic: no overflow for LLONG_MIN */
			unsigned long long mag = v < 0 ? 0ull - (unsigned long long)v
						       : (unsigned long long)v;
			out_number(&o, mag, v < 0, 10, false, width, left, zero);
			break;
		}
		case 'u':
		case 'x':
		case 'X': {
			unsigned long long v;
			if (lng == 2)
				v = va_arg(ap, unsigned long long);
			else if (lng == 1)
				v = va_arg(ap, unsigned long);
			else if (lng == 3)
				v = va_arg(ap, size_t);
			else
				v = va_arg(ap, unsigned int);
			out_number(&o, v, false, conv == 'u' ? 10u : 16u, conv == 'X', width,
				   left, zero);
			break;
		}
		case 'p': {
			uintptr_t v = (uintptr_t)va_arg(ap, void *);
			out_ch(&o, '0');
			out_ch(&o, 'x');
			out_number(&o, v, false, 16, false, 0, false, false);
			break;
		}
		default:
			/* unknown: copy the directive verbatim */
			while (start < fmt)
				out_ch(&o, *start++);
			break;
		}
	}
	if (size > 0)
		buf[o.pos < size ? o.pos : size - 1] = '\0';
	return o.pos > INT32_MAX ? INT32_MAX : (int)o.pos;
}

int util_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = util_vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
