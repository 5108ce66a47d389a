/* SPDX-License-Identifier: MIT */
/* bridge.c - driver <-> fast-reply <-> relay wiring; see bridge.h. */
#include "bridge.h"

#include "hal.h"
#include "util.h"

static int send_fast(void *ctx, const struct can_msg *m)
{
	struct bridge *br = ctx;

	return mcp2515_send_urgent(&br->can, m) == MCP2515_OK ? 0 : -1;
}

static void relay(void *ctx, const struct can_msg *m)
{
	struct bridge *br = ctx;

	if (br->hooks.relay != NULL)
		br->hooks.relay(br->hooks.ctx, m);
	else
		br->relay_dropped++;
}

static void on_rx(void *ctx, const struct can_msg *m)
{
	struct bridge *br = ctx;

	(void)fr_dispatch(&br->rules, m, send_fast, br, relay, br);
}

static void on_tx_done(void *ctx, uint32_t tag, bool ok)
{
	struct bridge *br = ctx;

	if (br->hooks.tx_done != NULL)
		br->hooks.tx_done(br->hooks.ctx, tag, ok);
}

static void on_state(void *ctx, enum mcp2515_state s)
{
	struct bridge *br = ctx;

	if (br->hooks.state != NULL)
		br->hooks.state(br->hooks.ctx, s);
}

void bridge_set_hooks(struct bridge *br, const struct bridge_hooks *hooks)
{
	if (br == NULL)
		return;
	if (hooks != NULL)
		br->hooks = *hooks;
	else
		util_memset(&br->hooks, 0, sizeof(br->hooks));
}

int bridge_init(struct bridge *br, const struct bridge_config *cfg,
		const struct bridge_hooks *hooks, bool *rule_err)
{
	const struct mcp2515_callbacks cb = {
		.rx = on_rx, .tx_done = on_tx_done, .state = on_state, .ctx = br,
	};
	int rc;

	if (rule_err != NULL)
		*rule_err = false;
	if (br == NULL || cfg == NULL)
		return MCP2515_E_INVAL;
	util_memset(br, 0, sizeof(*br));
	bridge_set_hooks(br, hooks);
	fr_table_init(&br->rules);
	if (cfg->rules != NULL && cfg->rules_len > 0) {
		size_t off = 0;

		rc = fr_table_parse(&br->rules, cfg->rules, cfg->rules_len, &off);
		if (rc != FR_OK) {
			hal_log("rules: %s at offset %u", fr_strerror(rc), (unsigned int)off);
			if (rule_err != NULL)
				*rule_err = true;
			return rc;
		}
	}
	for (uint32_t i = 0; i < br->rules.count; i++) {
		char text[FR_MAX_TEXT];

		if (fr_format_rule(&br->rules.rule[i], text, sizeof(text)) >= 0)
			hal_log("rule %u: %s", (unsigned int)i, text);
	}
	rc = mcp2515_init(&br->can, &cfg->can, &cb);
	if (rc != MCP2515_OK)
		return rc;
	if (br->rules.count > 0) {
		/* the first rule's reply header waits in TXB1 from every start on */
		const struct fr_rule *r0 = &br->rules.rule[0];
		struct can_msg hint;

		util_memset(&hint, 0, sizeof(hint));
		hint.id = r0->reply_id;
		hint.flags = r0->reply_ext ? CAN_MSG_F_EXT : 0u;
		hint.len = r0->reply_len;
		mcp2515_set_urgent_hint(&br->can, &hint);
	}
	if (cfg->autostart)
		return mcp2515_start(&br->can);
	return MCP2515_OK;
}

int bridge_start(struct bridge *br)
{
	return br != NULL ? mcp2515_start(&br->can) : MCP2515_E_INVAL;
}

int bridge_stop(struct bridge *br)
{
	return br != NULL ? mcp2515_stop(&br->can) : MCP2515_E_INVAL;
}

int bridge_send(struct bridge *br, const struct can_msg *m, uint32_t tag)
{
	return br != NULL ? mcp2515_send(&br->can, m, tag) : MCP2515_E_INVAL;
}

int bridge_poll(struct bridge *br)
{
	return br != NULL ? mcp2515_poll(&br->can) : MCP2515_E_INVAL;
}

uint64_t bridge_next_deadline_ns(const struct bridge *br)
{
	return br != NULL ? mcp2515_next_deadline_ns(&br->can) : UINT64_MAX;
}

void bridge_log_stats(const struct bridge *br)
{
	const struct mcp2515_stats *s = &br->can.stats;
	uint32_t matched = 0, replied = 0;

	for (uint32_t i = 0; i < br->rules.count && i < FR_MAX_RULES; i++) {
		matched += br->rules.rule[i].matched;
		replied += br->rules.rule[i].replied;
	}
	hal_log("stats: state=%s rx=%u tx=%u urgent=%u cancelled=%u ovr=%u busoff=%u "
		"spi_bytes=%llu spi_err=%u fast_last=%u fast_max=%u matched=%u replied=%u "
		"reply_failed=%u relayed=%u",
		mcp2515_state_name(br->can.state), (unsigned int)s->rx_frames,
		(unsigned int)s->tx_frames, (unsigned int)s->tx_urgent,
		(unsigned int)s->tx_cancelled, (unsigned int)s->rx_overflows,
		(unsigned int)s->bus_off, (unsigned long long)s->spi_bytes,
		(unsigned int)s->spi_errors, (unsigned int)s->fast_spi_bytes_last,
		(unsigned int)s->fast_spi_bytes_max, (unsigned int)matched,
		(unsigned int)replied, (unsigned int)br->rules.reply_failed,
		(unsigned int)br->rules.relayed);
}
