/* SPDX-License-Identifier: MIT */
/*
 * hal_rpi4.c - hal.h on a Jailhouse cell of a Raspberry Pi 4:
 *   SPI   BCM2711 SPI0, CE0, mode 0, polled through the 64-byte FIFO
 *   INT   GPIO 25 level from GPLEV0 (active low), busy-polled
 *   time  CNTPCT / CNTFRQ through the inmate library's timer_get_ticks()
 *   log   hal_log into the RAM ring of core/logring.c; hal_rpi4_log_drain
 *         moves bytes into the console UART's TX FIFO without ever waiting
 *         on it (printk busy-waits per character: 87 us at 115200 baud)
 *
 * Built only inside a Jailhouse tree (make jailhouse JAILHOUSE_DIR=...).
 * <inmate.h> must come first: it typedefs its own bool, which <stdbool.h>
 * (pulled in by our headers) then shadows with the C11 macro.
 */
#include <inmate.h>

#include <stdarg.h>

#include "bcm2711.h"
#include "hal.h"
#include "hal_rpi4.h"
#include "logring.h"
#include "util.h"

#define SPI_TIMEOUT_MIN_NS 1000000ull /* 1 ms on top of the wire time */
#define SPI_MAX_LOOPS 10000000u       /* second bound, should the timer stall */

/* 8250-style console (the Pi 4's mini UART, 32-bit register spacing) */
#define UART_REG_THR 0x00u
#define UART_REG_LSR 0x14u
#define UART_LSR_THRE 0x20u /* the TX FIFO takes at least one more byte */

static void *gpio;
static void *spi0;
static void *uart;
static bool lf_due; /* a CR went out, its LF has not */
static uint64_t tick_hz;
static uint32_t sclk_hz;

static inline void *reg(void *base, uint32_t off)
{
	return (void *)((uintptr_t)base + off);
}

static void gpio_fsel(uint32_t pin, uint32_t fn)
{
	void *r = reg(gpio, GPFSEL0 + 4u * (pin / 10u));
	uint32_t shift = 3u * (pin % 10u);
	uint32_t v = mmio_read32(r);

	v &= ~(GPFSEL_MASK << shift);
	v |= (fn & GPFSEL_MASK) << shift;
	mmio_write32(r, v);
}

int hal_rpi4_init(const struct hal_rpi4_config *cfg, uint32_t *actual_hz)
{
	uint32_t cdiv;

	if (cfg == NULL || cfg->spi_hz == 0 || cfg->spi_hz > 10000000u || cfg->core_hz == 0 ||
	    cfg->core_hz_max < cfg->core_hz)
		return -1;
	/*
	 * Smallest even divider that keeps SCLK <= spi_hz even at the highest
	 * core clock: SPI0 divides the VPU clock, which the firmware may raise
	 * (core_freq) or lower (down to 200 MHz without core_freq_min).
	 */
	cdiv = (cfg->core_hz_max + cfg->spi_hz - 1u) / cfg->spi_hz;
	if (cdiv & 1u)
		cdiv++;
	if (cdiv < SPI_CDIV_MIN)
		cdiv = SPI_CDIV_MIN;
	if (cdiv > SPI_CDIV_MAX)
		return -1;

	tick_hz = timer_get_frequency();
	if (tick_hz == 0)
		return -1;
	gpio = (void *)BCM2711_GPIO_BASE;
	map_range(gpio, BCM2711_MAP_SIZE, MAP_UNCACHED);

	if (cfg->pinmux) {
		/* read-modify-write: nobody else may touch GPFSEL0..2 meanwhile */
		gpio_fsel(PIN_CE0, GPFSEL_ALT0);
		gpio_fsel(PIN_MISO, GPFSEL_ALT0);
		gpio_fsel(PIN_MOSI, GPFSEL_ALT0);
		gpio_fsel(PIN_SCLK, GPFSEL_ALT0);
		gpio_fsel(PIN_CAN_INT, GPFSEL_INPUT);
	}
	/* idle: TA off, CE0, mode 0 (CPOL = CPHA = 0), CS active low, FIFOs clear */
	void *base = (void *)BCM2711_SPI0_BASE;

	mmio_write32(reg(base, SPI_CS), SPI_CS_CLEAR_RX | SPI_CS_CLEAR_TX);
	mmio_write32(reg(base, SPI_CLK), cdiv);
	sclk_hz = cfg->core_hz / cdiv;
	spi0 = base; /* last: hal_spi_transfer refuses to run before this */
	if (actual_hz != NULL)
		*actual_hz = sclk_hz;
	return 0;
}

uint64_t hal_now_ns(void)
{
	uint64_t t = timer_get_ticks();

	if (tick_hz == 0) /* before hal_rpi4_init: no division by zero */
		return 0;
	/* split so that nothing overflows: (t % f) * 1e9 < f * 1e9 < 2^64 */
	return (t / tick_hz) * 1000000000ull + ((t % tick_hz) * 1000000000ull) / tick_hz;
}

void hal_delay_us(uint32_t us)
{
	uint64_t start = timer_get_ticks();
	uint64_t ticks = ((uint64_t)us * tick_hz + 999999u) / 1000000u;

	while (timer_get_ticks() - start < ticks)
		cpu_relax();
}

int hal_spi_transfer(const uint8_t *tx, uint8_t *rx, size_t n)
{
	void *cs_reg = reg(spi0, SPI_CS);
	void *fifo = reg(spi0, SPI_FIFO);
	size_t ti = 0, ri = 0;
	uint32_t cs;

	if (tx == NULL || n == 0 || n > HAL_SPI_MAX_XFER || spi0 == NULL || sclk_hz == 0)
		return -1;
	/* 4x the nominal wire time plus a fixed margin */
	uint64_t wire_ns = ((uint64_t)n * 8u * 1000000000ull) / sclk_hz;
	uint64_t limit = ((4u * wire_ns + SPI_TIMEOUT_MIN_NS) * tick_hz) / 1000000000ull + 1u;
	uint64_t start = timer_get_ticks();

	/* CS low: start a transfer with empty FIFOs */
	mmio_write32(cs_reg, SPI_CS_CLEAR_RX | SPI_CS_CLEAR_TX | SPI_CS_TA);
	for (uint32_t loops = 0; ri < n; loops++) {
		cs = mmio_read32(cs_reg);
		/* never more than a FIFO's worth in flight */
		while (ti < n && (cs & SPI_CS_TXD) && ti - ri < SPI_FIFO_DEPTH) {
			mmio_write32(fifo, tx[ti++]);
			cs = mmio_read32(cs_reg);
		}
		while (ri < n && (cs & SPI_CS_RXD)) {
			uint8_t v = (uint8_t)(mmio_read32(fifo) & 0xFFu);

			if (rx != NULL)
				rx[ri] = v;
			ri++;
			cs = mmio_read32(cs_reg);
		}
		if (ri < n && (timer_get_ticks() - start > limit || loops > SPI_MAX_LOOPS))
			goto timeout;
	}
	for (uint32_t loops = 0; !(mmio_read32(cs_reg) & SPI_CS_DONE); loops++) {
		if (timer_get_ticks() - start > limit || loops > SPI_MAX_LOOPS)
			goto timeout;
	}
	mmio_write32(cs_reg, 0); /* TA off: CE0 goes high */
	return 0;

timeout:
	mmio_write32(cs_reg, SPI_CS_CLEAR_RX | SPI_CS_CLEAR_TX);
	return -1;
}

bool hal_int_asserted(void)
{
	if (gpio == NULL)
		return false;
	return (mmio_read32(reg(gpio, GPLEV0)) & (1u << PIN_CAN_INT)) == 0u;
}

bool hal_int_wait(uint64_t timeout_ns)
{
	uint64_t start = timer_get_ticks();
	uint64_t ticks;

	if (timeout_ns > 10000000000ull) /* 10 s: keeps the product below 2^64 */
		timeout_ns = 10000000000ull;
	ticks = (timeout_ns / 1000u) * tick_hz / 1000000u;

	do {
		if (hal_int_asserted())
			return true;
		cpu_relax();
	} while (timer_get_ticks() - start < ticks);
	return hal_int_asserted();
}

/* Into the RAM ring only: main.c drains it when the CAN side is idle. */
void hal_log(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	logring_vput(fmt, ap);
	va_end(ap);
}

void hal_rpi4_log_init(void)
{
	/*
	 * The console the hypervisor gave the cell (the root's rpi4 config:
	 * 8250 type, MMIO, 4-byte register distance at 0xfe215040).  Anything
	 * else: the drain falls back to printk, one byte per call.
	 */
	if (comm_region->console.address == 0 ||
	    comm_region->console.type != JAILHOUSE_CON_TYPE_8250 ||
	    !(comm_region->console.flags & JAILHOUSE_CON_REGDIST_4))
		return;
	uart = (void *)(uintptr_t)comm_region->console.address;
	map_range(uart, 0x1000, MAP_UNCACHED);
}

size_t hal_rpi4_log_drain(size_t max)
{
	size_t n = 0;
	char c;

	if (uart == NULL) {
		if (max > 0 && logring_take(&c, 1) == 1) {
			printk("%c", c);
			return 1;
		}
		return 0;
	}
	while (n < max && (mmio_read32(reg(uart, UART_REG_LSR)) & UART_LSR_THRE)) {
		if (lf_due) {
			c = '\n';
			lf_due = false;
		} else {
			if (logring_take(&c, 1) != 1)
				break;
			if (c == '\n') {
				c = '\r'; /* CR LF; the LF takes the next free FIFO slot */
				lf_due = true;
			}
		}
		mmio_write32(reg(uart, UART_REG_THR), (uint32_t)(unsigned char)c);
		n++;
	}
	return n;
}
