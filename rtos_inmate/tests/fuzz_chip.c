/* SPDX-License-Identifier: MIT */
/*
 * fuzz_chip.c - the HAL for the libFuzzer harnesses: an MCP2515 whose
 * volatile answers come from the fuzzer's input.
 *
 * Registers the driver writes (configuration, CANCTRL) read back as written,
 * so bring-up succeeds and every input reaches the RX path; what a real chip
 * would change on its own (READ STATUS, the RX buffers, EFLG, CANINTF, TEC,
 * REC and the INT pin) is taken from the input once fuzz_chip_feed() armed
 * it.  An exhausted input reads as zeros and an idle INT pin.  SPI never
 * fails; time advances 1 us per call, so no wait can hang.
 */
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "hal.h"
#include "mcp2515_regs.h"

void fuzz_chip_reset(void);
void fuzz_chip_feed(const uint8_t *data, size_t size);
size_t fuzz_chip_left(void);
uint32_t fuzz_chip_tx_count(void);

#define CANCTRL_AFTER_RESET 0x87u /* datasheet reset value: config mode, CLKOUT /8 */

static uint8_t regs[128];
static const uint8_t *in;
static size_t in_len, in_pos;
static uint64_t now_ns;
static uint32_t tx_count;

void fuzz_chip_reset(void)
{
	memset(regs, 0, sizeof(regs));
	regs[MCP_CANSTAT] = MCP_MODE_CONFIG;
	regs[MCP_CANCTRL] = CANCTRL_AFTER_RESET;
	in = NULL;
	in_len = in_pos = 0;
	tx_count = 0;
}

void fuzz_chip_feed(const uint8_t *data, size_t size)
{
	in = data;
	in_len = size;
	in_pos = 0;
}

size_t fuzz_chip_left(void)
{
	return in_len - in_pos;
}

uint32_t fuzz_chip_tx_count(void)
{
	return tx_count;
}

static uint8_t next_byte(void)
{
	return in_pos < in_len ? in[in_pos++] : 0u;
}

static uint8_t read_reg(uint8_t addr)
{
	addr &= 0x7Fu;
	if (in != NULL && (addr == MCP_EFLG || addr == MCP_CANINTF || addr == MCP_TEC ||
			   addr == MCP_REC))
		return next_byte();
	return regs[addr];
}

static void write_reg(uint8_t addr, uint8_t val)
{
	addr &= 0x7Fu;
	regs[addr] = val;
	if (addr == MCP_CANCTRL) /* the mode request takes effect at once */
		regs[MCP_CANSTAT] = (uint8_t)((regs[MCP_CANSTAT] & ~MCP_OPMOD_MASK) |
					      (val & MCP_OPMOD_MASK));
}

int hal_spi_transfer(const uint8_t *tx, uint8_t *rx_out, size_t n)
{
	uint8_t rx[HAL_SPI_MAX_XFER];

	if (tx == NULL || n == 0 || n > HAL_SPI_MAX_XFER)
		return -1;
	memset(rx, 0, n);
	switch (tx[0]) {
	case MCP_INSTR_RESET:
		memset(regs, 0, sizeof(regs));
		regs[MCP_CANSTAT] = MCP_MODE_CONFIG;
		regs[MCP_CANCTRL] = CANCTRL_AFTER_RESET;
		break;
	case MCP_INSTR_READ:
		for (size_t i = 2; i < n; i++)
			rx[i] = read_reg((uint8_t)(tx[1] + i - 2));
		break;
	case MCP_INSTR_WRITE:
		for (size_t i = 2; i < n; i++)
			write_reg((uint8_t)(tx[1] + i - 2), tx[i]);
		break;
	case MCP_INSTR_BIT_MODIFY:
		if (n >= 4)
			write_reg(tx[1], (uint8_t)((regs[tx[1] & 0x7Fu] & ~tx[2]) | (tx[2] & tx[3])));
		break;
	case MCP_INSTR_READ_STATUS:
	case MCP_INSTR_RX_STATUS:
		if (in != NULL) {
			uint8_t st = next_byte();

			for (size_t i = 1; i < n; i++)
				rx[i] = st;
		}
		break;
	case MCP_INSTR_READ_RXB0_SIDH:
	case MCP_INSTR_READ_RXB1_SIDH:
	case MCP_INSTR_READ_RXB0_D0:
	case MCP_INSTR_READ_RXB1_D0:
		for (size_t i = 1; i < n; i++)
			rx[i] = next_byte(); /* any bytes: DLC > 8, odd SIDL/EID bits */
		break;
	case MCP_INSTR_RTS_TXB0:
	case MCP_INSTR_RTS_TXB1:
		tx_count++;
		break;
	default: /* LOAD TX BUFFER and friends: nothing to answer */
		break;
	}
	if (rx_out != NULL) /* NULL: the driver does not want the answer */
		memcpy(rx_out, rx, n);
	return 0;
}

bool hal_int_asserted(void)
{
	return in != NULL && (next_byte() & 1u) != 0u;
}

bool hal_int_wait(uint64_t timeout_ns)
{
	now_ns += timeout_ns;
	return false;
}

uint64_t hal_now_ns(void)
{
	now_ns += 1000u;
	return now_ns;
}

void hal_delay_us(uint32_t us)
{
	now_ns += (uint64_t)us * 1000u;
}

void hal_log(const char *fmt, ...)
{
	(void)fmt;
}
