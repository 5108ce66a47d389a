/* SPDX-License-Identifier: MIT */
/*
 * main.c - Jailhouse entry of the MCP2515 CAN cell on a Raspberry Pi 4.
 *
 * Command line (jailhouse cell load <cell> mcp2515-can.bin -s "..." -a 0x1000):
 *   mcp-osc=HZ        crystal on the HAT, REQUIRED (read the HC-49 marking:
 *                     8000000, 12000000 or 16000000)
 *   can-bitrate=BPS   default 500000
 *   can-mode=N        0 normal (default), 1 loopback, 2 listen-only
 *   spi-hz=HZ         SPI clock, default 10000000 (MCP2515 maximum)
 *   core-hz=HZ        VPU core clock feeding SPI0, default 500000000
 *                     (needs core_freq_min=500 in config.txt)
 *   pinmux=0|1        mux GPIO 8-11 to SPI0 / GPIO 25 to input here, default 1
 *   err-poll-us=US    housekeeping poll interval, default 10000
 *   rules=TEXT        fast-reply rules, ';'-separated, see core/fastreply.h
 *   stats-s=S         print statistics every S seconds, 0 = never (default 10)
 *
 * The relay hook is a placeholder that counts and logs frames until the
 * virtio-can side is wired in (core/virt*, bridge_set_hooks).
 */
#include <inmate.h> /* first: see hal_rpi4.c */

#include "bridge.h"
#include "hal.h"
#include "hal_rpi4.h"
#include "util.h"

#define CMDLINE_SIZE 1024
#define RULES_MAX 900u

CMDLINE_BUFFER(CMDLINE_SIZE);

static struct bridge br;
static char rules_buf[RULES_MAX + 2]; /* +1 to detect truncation, +1 NUL */
static uint32_t relayed_unhandled;

static void relay_placeholder(void *ctx, const struct can_msg *m)
{
	(void)ctx;
	/* rate-limited: the first 16 frames, then every 1024th */
	if (relayed_unhandled < 16u || (relayed_unhandled & 1023u) == 0u)
		hal_log("relay (no virtio yet): id=%x ext=%u rtr=%u len=%u",
			(unsigned int)m->id, (unsigned int)((m->flags & CAN_MSG_F_EXT) != 0u),
			(unsigned int)((m->flags & CAN_MSG_F_RTR) != 0u), (unsigned int)m->len);
	relayed_unhandled++;
}

static void state_changed(void *ctx, enum mcp2515_state s)
{
	(void)ctx;
	hal_log("can: state %s", mcp2515_state_name(s));
}

static bool in_range(long long v, long long lo, long long hi)
{
	return v >= lo && v <= hi;
}

void inmate_main(void)
{
	long long osc = cmdline_parse_int("mcp-osc", 0);
	long long bitrate = cmdline_parse_int("can-bitrate", 500000);
	long long mode = cmdline_parse_int("can-mode", 0);
	long long spi_hz = cmdline_parse_int("spi-hz", 10000000);
	long long core_hz = cmdline_parse_int("core-hz", 500000000);
	long long err_poll_us = cmdline_parse_int("err-poll-us", 0);
	long long stats_s = cmdline_parse_int("stats-s", 10);
	bool pinmux = cmdline_parse_bool("pinmux", true);
	const char *rules = cmdline_parse_str("rules", rules_buf, sizeof(rules_buf), "");
	size_t rules_len = util_strnlen(rules, sizeof(rules_buf));

	printk("mcp2515-can: MCP2515 on SPI0/CE0, INT GPIO 25\n");
	if (osc == 0) {
		printk("mcp2515-can: mcp-osc=HZ is required: read the crystal on the HAT "
		       "(8000000, 12000000 or 16000000)\n");
		return;
	}
	if (!in_range(osc, 1000000, 25000000) || !in_range(bitrate, 5000, 1000000) ||
	    !in_range(mode, 0, 2) || !in_range(spi_hz, 1, 10000000) ||
	    !in_range(core_hz, 1000000, 1000000000) || !in_range(err_poll_us, 0, 1000000) ||
	    !in_range(stats_s, 0, 86400)) {
		printk("mcp2515-can: a parameter is out of range\n");
		return;
	}
	if (rules_len > RULES_MAX) {
		printk("mcp2515-can: rules= longer than %u characters\n", RULES_MAX);
		return;
	}

	const struct hal_rpi4_config hcfg = {
		.spi_hz = (uint32_t)spi_hz, .core_hz = (uint32_t)core_hz, .pinmux = pinmux,
	};
	uint32_t sclk = 0;

	if (hal_rpi4_init(&hcfg, &sclk) != 0) {
		printk("mcp2515-can: SPI clock set-up impossible\n");
		return;
	}
	hal_log("spi0: SCLK %u Hz (core %u Hz)", (unsigned int)sclk, (unsigned int)core_hz);

	struct bridge_config cfg;

	util_memset(&cfg, 0, sizeof(cfg));
	cfg.can.osc_hz = (uint32_t)osc;
	cfg.can.bitrate = (uint32_t)bitrate;
	cfg.can.mode = (enum mcp2515_opmode)mode;
	cfg.can.err_poll_us = (uint32_t)err_poll_us;
	cfg.rules = rules;
	cfg.rules_len = rules_len;
	cfg.autostart = true;

	const struct bridge_hooks hooks = {
		.relay = relay_placeholder, .state = state_changed,
	};
	bool rule_err = false;
	int rc = bridge_init(&br, &cfg, &hooks, &rule_err);

	if (rc != 0) {
		hal_log("mcp2515-can: %s", rule_err ? fr_strerror(rc) : mcp2515_strerror(rc));
		return;
	}

	uint64_t stats_ns = (uint64_t)stats_s * 1000000000ull;
	uint64_t next_stats = hal_now_ns() + stats_ns;

	/* this core belongs to the cell: poll forever */
	uint32_t poll_errors = 0;

	for (;;) {
		rc = bridge_poll(&br);
		if (rc < 0) {
			/* rate-limited: the first 8, then every 4096th */
			if (poll_errors < 8u || (poll_errors & 4095u) == 0u)
				hal_log("mcp2515-can: poll: %s (%u errors)", mcp2515_strerror(rc),
					(unsigned int)(poll_errors + 1u));
			poll_errors++;
		}
		if (stats_ns != 0 && hal_now_ns() >= next_stats) {
			next_stats += stats_ns;
			bridge_log_stats(&br);
		}
	}
}
