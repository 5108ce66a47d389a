/* SPDX-License-Identifier: MIT */
/*
 * fuzz_mcp2515.c - libFuzzer harness: the MCP2515 RX path and the fast-reply
 * rules behind it, fed by a chip whose RX buffers, status, error flags and
 * INT pin are the fuzzer's input (tests/fuzz_chip.c).
 *
 * Each input: the bridge (driver + rules) is brought up for real, then
 * mcp2515_poll runs until the input is used up.  Every frame the driver
 * hands on must be a frame a classic controller can carry (id in 11/29 bits,
 * len <= 8, only EXT/RTR flags), whatever the chip's bytes said (DLC > 8,
 * odd SIDL/EID bits); ASan/UBSan catch any out-of-bounds or undefined step.
 * "Deep" = at least one frame reached the rules (relayed or answered).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "bridge.h"
#include "can_msg.h"

void fuzz_chip_reset(void);
void fuzz_chip_feed(const uint8_t *data, size_t size);
size_t fuzz_chip_left(void);
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char RULES[] = "7DF:02010D->7E8:03410D$c;123R->123:AA;";
static unsigned long execs, deep, frames, replies;
static bool got;

static void check(const struct can_msg *m)
{
	uint32_t lim = (m->flags & CAN_MSG_F_EXT) ? 0x1FFFFFFFu : 0x7FFu;

	if (m->len > CAN_MSG_MAX_LEN || m->id > lim ||
	    (m->flags & ~(uint8_t)(CAN_MSG_F_EXT | CAN_MSG_F_RTR)) != 0u) {
		fprintf(stderr, "impossible frame: id %x flags %x len %u\n", (unsigned int)m->id,
			(unsigned int)m->flags, (unsigned int)m->len);
		abort();
	}
	got = true;
	frames++;
}

static void on_relay(void *ctx, const struct can_msg *m)
{
	(void)ctx;
	check(m);
}

static void report(void)
{
	printf("fuzz_mcp2515: %lu execs, %lu reached 'frame delivered' (%.1f %%), %lu frames, "
	       "%lu fast replies\n", execs, deep, execs ? 100.0 * (double)deep / (double)execs : 0.0,
	       frames, replies);
	fflush(stdout);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	atexit(report);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct bridge br;
	const struct bridge_config cfg = {
		.can = { .osc_hz = 16000000u, .bitrate = 500000u, .mode = MCP2515_MODE_NORMAL },
		.rules = RULES, .rules_len = sizeof(RULES) - 1u, .autostart = true,
	};
	const struct bridge_hooks hooks = { .relay = on_relay };
	bool rule_err;

	execs++;
	got = false;
	fuzz_chip_reset();
	if (bridge_init(&br, &cfg, &hooks, &rule_err) != 0) {
		fprintf(stderr, "bridge_init failed on the fake chip (rule_err %d)\n", rule_err);
		abort();
	}
	fuzz_chip_feed(data, size);
	uint32_t before = 0;

	for (unsigned int i = 0; i < br.rules.count; i++)
		before += br.rules.rule[i].replied;
	/* bounded: every poll consumes input or finds the pin idle */
	for (unsigned int i = 0; i < 256u && fuzz_chip_left() > 0u; i++) {
		if (mcp2515_get_state(&br.can) == MCP2515_STOPPED ||
		    mcp2515_get_state(&br.can) == MCP2515_BUS_OFF)
			(void)bridge_start(&br); /* restart after bus-off, as the inmate does */
		(void)bridge_poll(&br);
	}
	for (unsigned int i = 0; i < br.rules.count; i++)
		replies += br.rules.rule[i].replied;
	replies -= before;
	if (got)
		deep++;
	return 0;
}
