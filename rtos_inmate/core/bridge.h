/* SPDX-License-Identifier: MIT */
/*
 * bridge.h - portable wiring of the CAN cell: MCP2515 driver -> fast-reply
 * table -> relay hook.  Platform entry points (hal/<platform>/) fill an
 * bridge_config from their command line, call bridge_init and then
 * bridge_poll in their main loop.
 *
 * Hooks for the virtio-can side (written separately):
 *  - relay:    every received frame no rule answered (bridge_set_hooks);
 *  - tx:       frames from Linux go to bridge_send(tag); completion comes
 *              back through the tx_done hook with the same tag;
 *  - state:    controller state changes (BUS_OFF -> virtio status BUSOFF);
 *  - control:  bridge_start / bridge_stop (virtio START / STOP).
 */
#ifndef RTOS_INMATE_BRIDGE_H
#define RTOS_INMATE_BRIDGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "can_msg.h"
#include "fastreply.h"
#include "mcp2515.h"

struct bridge_hooks {
	void (*relay)(void *ctx, const struct can_msg *m);
	void (*tx_done)(void *ctx, uint32_t tag, bool ok);
	void (*state)(void *ctx, enum mcp2515_state s);
	void *ctx;
};

struct bridge_config {
	struct mcp2515_config can;
	const char *rules; /* rule text, may be NULL or empty */
	size_t rules_len;
	bool autostart;    /* start the controller at init */
};

struct bridge {
	struct mcp2515 can;
	struct fr_table rules;
	struct bridge_hooks hooks;
	uint32_t relay_dropped; /* relayed frames with no relay hook set */
};

/*
 * Parse the rules, initialise the chip, optionally start it.  Rule errors
 * are reported through hal_log with the offending offset and returned as
 * the (negative) fr_rc; chip errors as mcp2515_rc.  *rule_err tells which.
 */
int bridge_init(struct bridge *br, const struct bridge_config *cfg,
		const struct bridge_hooks *hooks, bool *rule_err);

void bridge_set_hooks(struct bridge *br, const struct bridge_hooks *hooks);

int bridge_start(struct bridge *br);
int bridge_stop(struct bridge *br);
int bridge_send(struct bridge *br, const struct can_msg *m, uint32_t tag);
int bridge_poll(struct bridge *br);
uint64_t bridge_next_deadline_ns(const struct bridge *br);

/* hal_log one summary line of driver and rule statistics. */
void bridge_log_stats(const struct bridge *br);

#endif /* RTOS_INMATE_BRIDGE_H */
