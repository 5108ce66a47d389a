/* SPDX-License-Identifier: MIT */
/*
 * hosted_can.c - the inmate's CAN side as a Linux program, driven by the
 * Python MCP2515 simulator (tests/inmate).  It runs exactly the portable
 * core (core/bridge.c, core/fastreply.c, drivers/mcp2515.c) on the hosted
 * HAL; only this file is test scaffolding.
 *
 * Usage:
 *   hosted_can --socket PATH --osc HZ --bitrate BPS [--rules TEXT]
 *              [--mode normal|loopback|listen] [--err-poll-us N]
 *              [--init-only] [--no-start] [--max-ms N] [--quiet]
 *              [--stats-ms N] [--log-relay] [--tx-timeout-us N]
 *
 * Log lines (hal_log) go into the RAM ring of core/logring.c and are drained
 * to stderr, UART_CHUNK bytes at a time, only when the CAN side is idle, as
 * the Jailhouse cell does.  --stats-ms logs the statistics line that often;
 * --log-relay logs every relayed frame from the RX callback (the worst case
 * the ring is for: the line is formatted there, written out later).
 *
 * Events on stdout, one per line:
 *   READY cnf1=.. cnf2=.. cnf3=.. brp=.. ntq=.. sp=..
 *   INITERR rc=<n> <text>          (exit 2)     RULEERR rc=<n> <text> (exit 3)
 *   RELAY id=<hex> ext=<0|1> rtr=<0|1> len=<n> data=<hex|->
 *   TXDONE tag=<n> ok=<0|1>        STATE <name>
 *   SENT tag=<n> rc=<n>            DONE <cmd> rc=<n>
 *   STATS key=value ...            BYE
 * Commands on stdin, one per line:
 *   send <id-hex> <s|x>[r] <len> <hex|-> <tag>
 *   start | stop | stats | quit
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "hal.h"
#include "hal_hosted.h"
#include "bridge.h"
#include "logring.h"

#define UART_CHUNK 8u /* the Pi's mini UART TX FIFO */

static struct bridge im;
static bool log_relay;

static void hexstr(const uint8_t *d, size_t n, char *out, size_t size)
{
	size_t p = 0;

	if (n == 0) {
		snprintf(out, size, "-");
		return;
	}
	for (size_t i = 0; i < n && p + 3 <= size; i++)
		p += (size_t)snprintf(&out[p], size - p, "%02X", d[i]);
}

static void on_relay(void *ctx, const struct can_msg *m)
{
	char data[2 * CAN_MSG_MAX_LEN + 2];

	(void)ctx;
	hexstr(m->data, (m->flags & CAN_MSG_F_RTR) ? 0 : m->len, data, sizeof(data));
	if (log_relay)
		hal_log("relay: id=%x len=%u", (unsigned int)m->id, (unsigned int)m->len);
	printf("RELAY id=%X ext=%u rtr=%u len=%u data=%s\n", (unsigned int)m->id,
	       (m->flags & CAN_MSG_F_EXT) ? 1u : 0u, (m->flags & CAN_MSG_F_RTR) ? 1u : 0u,
	       (unsigned int)m->len, data);
	fflush(stdout);
}

static void on_tx_done(void *ctx, uint32_t tag, bool ok)
{
	(void)ctx;
	printf("TXDONE tag=%u ok=%u\n", (unsigned int)tag, ok ? 1u : 0u);
	fflush(stdout);
}

static void on_state(void *ctx, enum mcp2515_state s)
{
	(void)ctx;
	printf("STATE %s\n", mcp2515_state_name(s));
	fflush(stdout);
}

static void print_stats(void)
{
	const struct mcp2515_stats *s = &im.can.stats;

	printf("STATS state=%s rx=%u tx=%u urgent=%u cancelled=%u ovr=%u busoff=%u "
	       "spi_bytes=%llu spi_xfers=%u spi_errors=%u hal_spi_bytes=%llu hdr_hits=%u "
	       "fast_last=%u fast_max=%u fast_timed=%u rx_seen=%u relayed=%u reply_failed=%u "
	       "tx_timeouts=%u spurious_int=%u urgent_dropped=%u warn=%u passive=%u "
	       "log_lines=%u log_dropped=%u log_bytes=%llu",
	       mcp2515_state_name(im.can.state), (unsigned int)s->rx_frames,
	       (unsigned int)s->tx_frames, (unsigned int)s->tx_urgent,
	       (unsigned int)s->tx_cancelled, (unsigned int)s->rx_overflows,
	       (unsigned int)s->bus_off, (unsigned long long)s->spi_bytes,
	       (unsigned int)s->spi_xfers, (unsigned int)s->spi_errors,
	       (unsigned long long)hal_hosted_spi_bytes(), (unsigned int)s->txb_header_hits,
	       (unsigned int)s->fast_spi_bytes_last, (unsigned int)s->fast_spi_bytes_max,
	       (unsigned int)s->fast_replies_timed, (unsigned int)im.rules.rx_seen,
	       (unsigned int)im.rules.relayed, (unsigned int)im.rules.reply_failed,
	       (unsigned int)s->tx_timeouts, (unsigned int)s->spurious_int,
	       (unsigned int)s->urgent_dropped, (unsigned int)s->error_warning,
	       (unsigned int)s->error_passive, (unsigned int)logring_get_stats()->lines,
	       (unsigned int)logring_get_stats()->dropped,
	       (unsigned long long)logring_get_stats()->bytes_out);
	for (uint32_t i = 0; i < im.rules.count; i++)
		printf(" rule%u=%u/%u", (unsigned int)i, (unsigned int)im.rules.rule[i].matched,
		       (unsigned int)im.rules.rule[i].replied);
	printf("\n");
	fflush(stdout);
}

static bool parse_u32(const char *s, int base, uint32_t max, uint32_t *out)
{
	char *end;
	unsigned long v;

	if (s == NULL || *s == '\0')
		return false;
	errno = 0;
	v = strtoul(s, &end, base);
	if (errno != 0 || *end != '\0' || v > max)
		return false;
	*out = (uint32_t)v;
	return true;
}

/* send <id-hex> <s|x>[r] <len> <hex|-> <tag> */
static void cmd_send(char *args)
{
	char *save = NULL;
	char *a_id = strtok_r(args, " ", &save);
	char *a_fl = strtok_r(NULL, " ", &save);
	char *a_len = strtok_r(NULL, " ", &save);
	char *a_hex = strtok_r(NULL, " ", &save);
	char *a_tag = strtok_r(NULL, " ", &save);
	struct can_msg m;
	uint32_t v, tag;

	memset(&m, 0, sizeof(m));
	if (!a_id || !a_fl || !a_len || !a_hex || !a_tag || !parse_u32(a_tag, 10, UINT32_MAX, &tag)) {
		printf("SENT tag=0 rc=%d\n", MCP2515_E_INVAL);
		return;
	}
	if (!parse_u32(a_id, 16, CAN_MSG_EXT_MAX, &m.id) || !parse_u32(a_len, 10, 255, &v)) {
		printf("SENT tag=%u rc=%d\n", (unsigned int)tag, MCP2515_E_INVAL);
		return;
	}
	m.len = (uint8_t)v;
	if (a_fl[0] == 'x')
		m.flags |= CAN_MSG_F_EXT;
	if (strchr(a_fl, 'r') != NULL)
		m.flags |= CAN_MSG_F_RTR;
	if (strcmp(a_hex, "-") != 0) {
		size_t n = strlen(a_hex);

		if (n % 2 != 0 || n / 2 > CAN_MSG_MAX_LEN) {
			printf("SENT tag=%u rc=%d\n", (unsigned int)tag, MCP2515_E_INVAL);
			return;
		}
		for (size_t i = 0; i < n / 2; i++) {
			char b[3] = { a_hex[2 * i], a_hex[2 * i + 1], 0 };

			if (!parse_u32(b, 16, 255, &v)) {
				printf("SENT tag=%u rc=%d\n", (unsigned int)tag, MCP2515_E_INVAL);
				return;
			}
			m.data[i] = (uint8_t)v;
		}
	}
	int rc = bridge_send(&im, &m, tag);

	printf("SENT tag=%u rc=%d\n", (unsigned int)tag, rc);
}

/* Returns false on "quit". */
static bool run_command(char *line)
{
	if (strncmp(line, "send ", 5) == 0) {
		cmd_send(line + 5);
	} else if (strcmp(line, "start") == 0) {
		printf("DONE start rc=%d\n", bridge_start(&im));
	} else if (strcmp(line, "stop") == 0) {
		printf("DONE stop rc=%d\n", bridge_stop(&im));
	} else if (strcmp(line, "stats") == 0) {
		print_stats();
	} else if (strcmp(line, "quit") == 0) {
		return false;
	} else if (line[0] != '\0') {
		printf("DONE unknown rc=-1\n");
	}
	fflush(stdout);
	return true;
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s --socket PATH --osc HZ --bitrate BPS [--rules TEXT]\n"
		"          [--mode normal|loopback|listen] [--err-poll-us N] [--init-only]\n"
		"          [--no-start] [--max-ms N] [--quiet] [--stats-ms N] [--log-relay]\n"
		"          [--tx-timeout-us N]\n",
		argv0);
}

int main(int argc, char **argv)
{
	const char *sock = NULL, *rules = NULL, *mode = "normal";
	uint32_t osc = 0, bitrate = 0, err_poll_us = 0, max_ms = 60000, stats_ms = 0;
	uint32_t tx_timeout_us = 0;
	bool init_only = false, no_start = false;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		bool ok = true;

		if (strcmp(a, "--socket") == 0 && v) {
			sock = v;
			i++;
		} else if (strcmp(a, "--osc") == 0 && v) {
			ok = parse_u32(v, 10, UINT32_MAX, &osc);
			i++;
		} else if (strcmp(a, "--bitrate") == 0 && v) {
			ok = parse_u32(v, 10, UINT32_MAX, &bitrate);
			i++;
		} else if (strcmp(a, "--rules") == 0 && v) {
			rules = v;
			i++;
		} else if (strcmp(a, "--mode") == 0 && v) {
			mode = v;
			i++;
		} else if (strcmp(a, "--err-poll-us") == 0 && v) {
			ok = parse_u32(v, 10, UINT32_MAX, &err_poll_us);
			i++;
		} else if (strcmp(a, "--max-ms") == 0 && v) {
			ok = parse_u32(v, 10, 3600000u, &max_ms);
			i++;
		} else if (strcmp(a, "--stats-ms") == 0 && v) {
			ok = parse_u32(v, 10, 3600000u, &stats_ms);
			i++;
		} else if (strcmp(a, "--tx-timeout-us") == 0 && v) {
			ok = parse_u32(v, 10, UINT32_MAX, &tx_timeout_us);
			i++;
		} else if (strcmp(a, "--log-relay") == 0) {
			log_relay = true;
		} else if (strcmp(a, "--init-only") == 0) {
			init_only = true;
		} else if (strcmp(a, "--no-start") == 0) {
			no_start = true;
		} else if (strcmp(a, "--quiet") == 0) {
			hal_hosted_set_quiet(true);
		} else {
			ok = false;
		}
		if (!ok) {
			usage(argv[0]);
			return 64;
		}
	}
	if (sock == NULL) {
		usage(argv[0]);
		return 64;
	}

	struct bridge_config cfg;

	memset(&cfg, 0, sizeof(cfg));
	cfg.can.osc_hz = osc;
	cfg.can.bitrate = bitrate;
	cfg.can.err_poll_us = err_poll_us;
	cfg.can.tx_timeout_us = tx_timeout_us;
	if (strcmp(mode, "normal") == 0)
		cfg.can.mode = MCP2515_MODE_NORMAL;
	else if (strcmp(mode, "loopback") == 0)
		cfg.can.mode = MCP2515_MODE_LOOPBACK;
	else if (strcmp(mode, "listen") == 0)
		cfg.can.mode = MCP2515_MODE_LISTEN_ONLY;
	else {
		usage(argv[0]);
		return 64;
	}
	cfg.rules = rules;
	cfg.rules_len = rules ? strlen(rules) : 0;
	cfg.autostart = !init_only && !no_start;

	int rc = hal_hosted_open(sock);

	if (rc < 0) {
		fprintf(stderr, "cannot connect to %s: %s\n", sock, strerror(-rc));
		return 1;
	}
	const struct bridge_hooks hooks = {
		.relay = on_relay, .tx_done = on_tx_done, .state = on_state, .ctx = NULL,
	};
	bool rule_err = false;

	rc = bridge_init(&im, &cfg, &hooks, &rule_err);
	if (rc != 0) {
		if (rule_err)
			printf("RULEERR rc=%d %s\n", rc, fr_strerror(rc));
		else
			printf("INITERR rc=%d %s\n", rc, mcp2515_strerror(rc));
		fflush(stdout);
		hal_hosted_close();
		return rule_err ? 3 : 2;
	}
	printf("READY cnf1=%02X cnf2=%02X cnf3=%02X brp=%u ntq=%u sp=%u\n",
	       (unsigned int)im.can.timing.cnf1, (unsigned int)im.can.timing.cnf2,
	       (unsigned int)im.can.timing.cnf3, (unsigned int)im.can.timing.brp,
	       (unsigned int)im.can.timing.ntq, (unsigned int)im.can.timing.sp_permille);
	fflush(stdout);
	if (init_only) {
		hal_hosted_close();
		return 0;
	}

	char line[256];
	size_t fill = 0;
	bool stdin_open = true, run = true;
	uint64_t end = hal_now_ns() + (uint64_t)max_ms * 1000000ull;
	uint64_t stats_ns = (uint64_t)stats_ms * 1000000ull;
	uint64_t next_stats = hal_now_ns() + stats_ns;

	while (run && hal_hosted_ok() && hal_now_ns() < end) {
		rc = bridge_poll(&im);
		if (rc < 0) {
			printf("POLLERR rc=%d %s\n", rc, mcp2515_strerror(rc));
			fflush(stdout);
		}
		if (stats_ns != 0 && hal_now_ns() >= next_stats) {
			next_stats += stats_ns;
			bridge_log_stats(&im); /* into the ring: cheap */
		}
		/* the log only when the CAN side has nothing to do, a FIFO's worth */
		if (logring_pending() > 0 &&
		    logring_idle(hal_int_asserted(), hal_now_ns(), bridge_next_deadline_ns(&im))) {
			(void)hal_hosted_log_drain(UART_CHUNK);
			continue;
		}
		if (stdin_open) {
			struct pollfd pfd = { .fd = STDIN_FILENO, .events = POLLIN };

			while (run && poll(&pfd, 1, 0) > 0) {
				ssize_t r = read(STDIN_FILENO, &line[fill], sizeof(line) - 1 - fill);

				if (r <= 0) {
					stdin_open = false;
					run = false;
					break;
				}
				fill += (size_t)r;
				line[fill] = '\0';
				char *nl;

				while (run && (nl = strchr(line, '\n')) != NULL) {
					*nl = '\0';
					run = run_command(line);
					size_t used = (size_t)(nl - line) + 1;

					memmove(line, nl + 1, fill - used + 1);
					fill -= used;
				}
				if (fill == sizeof(line) - 1)
					fill = 0; /* overlong line: drop it */
			}
		}
		uint64_t now = hal_now_ns();
		uint64_t dl = bridge_next_deadline_ns(&im);
		uint64_t wait = dl > now ? dl - now : 0;

		if (wait > 2000000u)
			wait = 2000000u; /* keep stdin responsive */
		if (wait > 0)
			(void)hal_int_wait(wait);
	}
	print_stats();
	printf("BYE\n");
	fflush(stdout);
	hal_hosted_close();
	return 0;
}
