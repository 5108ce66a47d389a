/* SPDX-License-Identifier: MIT */
/*
 * hal_stub.c - a HAL with no chip behind it, for the pure unit tests:
 * SPI fails, INT is never asserted, time advances 1 us per call.
 */
#include <stdarg.h>
#include <stdio.h>

#include "hal.h"

static uint64_t fake_ns;

int hal_spi_transfer(const uint8_t *tx, uint8_t *rx, size_t n)
{
	(void)tx;
	(void)rx;
	(void)n;
	return -1;
}

bool hal_int_asserted(void)
{
	return false;
}

bool hal_int_wait(uint64_t timeout_ns)
{
	fake_ns += timeout_ns;
	return false;
}

uint64_t hal_now_ns(void)
{
	fake_ns += 1000u;
	return fake_ns;
}

void hal_delay_us(uint32_t us)
{
	fake_ns += (uint64_t)us * 1000u;
}

void hal_log(const char *fmt, ...)
{
	(void)fmt;
}
