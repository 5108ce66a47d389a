/* SPDX-License-Identifier: MIT */
/*
 * inmate_main.c - the whole CAN cell as a Linux process: the portable core
 * (MCP2515 driver, fast-reply rules, bridge, virtio-can driver on the
 * ivshmem link) on the hosted HALs: SPI and INT from the Python MCP2515
 * simulator (hal_hosted.c), the ivshmem link from a sim hub (simlink.c).
 *
 * Usage (the options mirror the Jailhouse cell's command line):
 *   hosted_inmate --spi SOCKET --link SOCKET --osc HZ --bitrate BPS
 *                 [--rule TEXT]... [--restart-ms N] [--txq N] [--rxq N]
 *                 [--err-poll-us N] [--timeout-ms N] [--link-id N]
 *                 [--console SOCKET] [--max-ms N] [--quiet]
 *
 * --console SOCKET joins a second sim hub as the virtio-console driver (ID 1,
 * protocol 0x8003; core/virtio_console.h): the log then goes to that console
 * (a copy still to stderr) instead of the simulator's UART, and the console
 * takes commands (help, stats, rules, log on|off).  Without it the log is
 * drained to stderr and the UART as before.
 *
 * Events on stdout, one per line:
 *   READY cnf1=.. cnf2=.. cnf3=.. id=<link id> protocol=0x....
 *   EV <name> [detail]       from the virtio-can driver (LINK_UP, LINK_DOWN,
 *                            LINK_RESET, STARTED, CAN_BUSOFF, CAN_RESTARTED,
 *                            BUSOFF_REPORTED, DEVICE_BUSOFF, ...)
 *   STATS key=value ...      on "stats" and at exit
 *   BYE
 * Commands on stdin (optional; end of input is not a quit): stats | quit.
 * SIGTERM / SIGINT end the program cleanly (the link is left with STATE 0).
 * Exit status: 0 ok, 1 connection failure, 2 CAN init error, 3 rule error,
 * 4 link unusable, 64 usage.
 */
#define _GNU_SOURCE

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bridge.h"
#include "hal.h"
#include "hal_hosted.h"
#include "logring.h"
#include "simlink.h"
#include "virtio_can.h"
#include "virtio_console.h"

#define RULES_MAX 2048u
#define IDLE_MIN_NS 20000u   /* first idle wait after activity */
#define IDLE_MAX_NS 500000u  /* longest idle wait on the link's eventfds */

static struct bridge br;
static struct vcan vc;
static struct simlink link_;
static struct vcon con;
static struct simlink con_link_;
static bool con_on;
static volatile sig_atomic_t stop_signal;

static void on_signal(int sig)
{
	stop_signal = sig;
}

static void on_event(void *ctx, const char *ev, const char *detail)
{
	(void)ctx;
	printf("EV %s%s%s\n", ev, detail[0] ? " " : "", detail);
	fflush(stdout);
}

static void on_console_event(void *ctx, const char *ev, const char *detail)
{
	(void)ctx;
	printf("EV CONSOLE_%s%s%s\n", ev, detail[0] ? " " : "", detail);
	fflush(stdout);
}

/* What goes to the console, also on stderr (the log stays readable there). */
static void console_tee(void *ctx, const char *p, size_t n)
{
	(void)ctx;
	fwrite(p, 1, n, stderr);
	fflush(stderr);
}

static void print_stats(void)
{
	const struct vcan_stats *v = &vc.stats;
	const struct mcp2515_stats *c = &br.can.stats;
	uint32_t matched = 0, replied = 0;

	for (uint32_t i = 0; i < br.rules.count && i < FR_MAX_RULES; i++) {
		matched += br.rules.rule[i].matched;
		replied += br.rules.rule[i].replied;
	}
	printf("STATS link=%s attaches=%u detaches=%u resets=%u ring_faults=%u relay=%u "
	       "relay_fails=%u relay_dropped=%u rx=%u rx_invalid=%u rx_empty=%u rx_sent=%u "
	       "rx_send_fails=%u ctl=%u ctl_fails=%u busoff_reports=%u err_reports=%u "
	       "err_report_fails=%u rx_errframes=%u can_restarts=%u "
	       "transactions=%u timeouts=%u can_state=%s can_rx=%u can_tx=%u urgent=%u "
	       "overflows=%u busoff=%u matched=%u replied=%u fast_max=%u fast_timed=%u "
	       "hub_joins=%u hub_leaves=%u console=%s log_dropped=%u\n",
	       vcan_state_name(vc.state), (unsigned int)v->attaches, (unsigned int)v->detaches,
	       (unsigned int)v->resets, (unsigned int)v->ring_faults,
	       (unsigned int)v->relay_count, (unsigned int)v->relay_fails,
	       (unsigned int)v->relay_dropped, (unsigned int)v->rx_count,
	       (unsigned int)v->rx_invalid, (unsigned int)v->rx_empty, (unsigned int)v->rx_sent,
	       (unsigned int)v->rx_send_fails, (unsigned int)v->ctl_count,
	       (unsigned int)v->ctl_fails, (unsigned int)v->busoff_reports,
	       (unsigned int)v->err_reports, (unsigned int)v->err_report_fails,
	       (unsigned int)v->rx_errframes,
	       (unsigned int)v->can_restarts, (unsigned int)vc.vio.stats.transactions,
	       (unsigned int)vc.vio.stats.timeouts, mcp2515_state_name(br.can.state),
	       (unsigned int)c->rx_frames, (unsigned int)c->tx_frames, (unsigned int)c->tx_urgent,
	       (unsigned int)c->rx_overflows, (unsigned int)c->bus_off, (unsigned int)matched,
	       (unsigned int)replied, (unsigned int)c->fast_spi_bytes_max,
	       (unsigned int)c->fast_replies_timed, (unsigned int)link_.joins,
	       (unsigned int)link_.leaves, con_on ? vcon_state_name(con.state) : "off",
	       (unsigned int)logring_get_stats()->dropped);
	fflush(stdout);
}

static bool parse_u32(const char *s, uint32_t max, uint32_t *out)
{
	char *end;
	unsigned long long v;

	if (s == NULL || *s == '\0')
		return false;
	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno != 0 || *end != '\0' || v > max)
		return false;
	*out = (uint32_t)v;
	return true;
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s --spi SOCKET --link SOCKET --osc HZ --bitrate BPS [--rule TEXT]...\n"
		"          [--restart-ms N] [--txq N] [--rxq N] [--err-poll-us N]\n"
		"          [--timeout-ms N] [--link-id N] [--console SOCKET] [--max-ms N]\n"
		"          [--quiet]\n",
		argv0);
}

static bool add_rule(char *rules, size_t *len, const char *text)
{
	size_t n = strlen(text);

	if (*len + n + 2 > RULES_MAX)
		return false;
	if (*len > 0)
		rules[(*len)++] = ';';
	memcpy(&rules[*len], text, n);
	*len += n;
	rules[*len] = '\0';
	return true;
}

/* Returns false on "quit". */
static bool read_commands(bool *open)
{
	static char line[256];
	static size_t fill;
	struct pollfd p = { .fd = STDIN_FILENO, .events = POLLIN };

	while (*open && poll(&p, 1, 0) > 0) {
		ssize_t r = read(STDIN_FILENO, &line[fill], sizeof(line) - 1 - fill);

		if (r <= 0) {
			*open = false; /* no more commands; keep running */
			return true;
		}
		fill += (size_t)r;
		line[fill] = '\0';
		char *nl;

		while ((nl = strchr(line, '\n')) != NULL) {
			*nl = '\0';
			if (strcmp(line, "quit") == 0)
				return false;
			if (strcmp(line, "stats") == 0)
				print_stats();
			size_t used = (size_t)(nl - line) + 1;

			memmove(line, nl + 1, fill - used + 1);
			fill -= used;
		}
		if (fill == sizeof(line) - 1)
			fill = 0; /* overlong line: dropped */
	}
	return true;
}

int main(int argc, char **argv)
{
	const char *spi = NULL, *link_path = NULL, *console_path = NULL;
	static char rules[RULES_MAX];
	size_t rules_len = 0;
	uint32_t osc = 0, bitrate = 0, err_poll_us = 0, max_ms = 3600000u, restart_ms = 100;
	uint32_t txq = 0, rxq = 0, timeout_ms = 1000, link_id = 1;
	int rc;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;
		bool ok = true, takes = true;

		if (strcmp(a, "--spi") == 0 && v)
			spi = v;
		else if (strcmp(a, "--link") == 0 && v)
			link_path = v;
		else if (strcmp(a, "--console") == 0 && v)
			console_path = v;
		else if (strcmp(a, "--osc") == 0)
			ok = parse_u32(v, UINT32_MAX, &osc);
		else if (strcmp(a, "--bitrate") == 0)
			ok = parse_u32(v, UINT32_MAX, &bitrate);
		else if ((strcmp(a, "--rule") == 0 || strcmp(a, "--rules") == 0) && v)
			ok = add_rule(rules, &rules_len, v);
		else if (strcmp(a, "--restart-ms") == 0)
			ok = parse_u32(v, 600000u, &restart_ms);
		else if (strcmp(a, "--txq") == 0)
			ok = parse_u32(v, VQ_MAX_SIZE, &txq);
		else if (strcmp(a, "--rxq") == 0)
			ok = parse_u32(v, VQ_MAX_SIZE, &rxq);
		else if (strcmp(a, "--err-poll-us") == 0)
			ok = parse_u32(v, UINT32_MAX, &err_poll_us);
		else if (strcmp(a, "--timeout-ms") == 0)
			ok = parse_u32(v, 600000u, &timeout_ms) && timeout_ms > 0;
		else if (strcmp(a, "--link-id") == 0)
			ok = parse_u32(v, 1u, &link_id);
		else if (strcmp(a, "--max-ms") == 0)
			ok = parse_u32(v, 86400000u, &max_ms);
		else if (strcmp(a, "--quiet") == 0) {
			hal_hosted_set_quiet(true);
			takes = false;
		} else
			ok = false;
		if (!ok) {
			usage(argv[0]);
			return 64;
		}
		if (takes)
			i++;
	}
	if (spi == NULL || link_path == NULL) {
		usage(argv[0]);
		return 64;
	}

	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	rc = hal_hosted_open(spi);
	if (rc < 0) {
		fprintf(stderr, "cannot connect to the MCP2515 at %s: %s\n", spi, strerror(-rc));
		return 1;
	}
	rc = simlink_open(&link_, link_path, link_id, 5000);
	if (rc < 0) {
		fprintf(stderr, "cannot join the ivshmem hub at %s: %s\n", link_path,
			simlink_strerror(rc));
		hal_hosted_close();
		return 1;
	}

	struct bridge_config cfg;
	bool rule_err = false;

	memset(&cfg, 0, sizeof(cfg));
	cfg.can.osc_hz = osc;
	cfg.can.bitrate = bitrate;
	cfg.can.err_poll_us = err_poll_us;
	cfg.can.mode = MCP2515_MODE_NORMAL;
	cfg.rules = rules;
	cfg.rules_len = rules_len;
	cfg.autostart = true;
	rc = bridge_init(&br, &cfg, NULL, &rule_err);
	if (rc != 0) {
		if (rule_err)
			printf("RULEERR rc=%d %s\n", rc, fr_strerror(rc));
		else
			printf("INITERR rc=%d %s\n", rc, mcp2515_strerror(rc));
		fflush(stdout);
		simlink_close(&link_);
		hal_hosted_close();
		return rule_err ? 3 : 2;
	}

	const struct vcan_config vcfg = {
		.txq_size = (uint16_t)txq,
		.rxq_size = (uint16_t)rxq,
		.restart_ms = restart_ms,
		.timeout_ns = (uint64_t)timeout_ms * 1000000ull,
		.on_event = on_event,
	};

	rc = vcan_init(&vc, &br, &link_.link, &vcfg);
	if (rc != VIO_OK) {
		printf("LINKERR rc=%d %s\n", rc, vio_strerror(rc));
		fflush(stdout);
		simlink_close(&link_);
		hal_hosted_close();
		return 4;
	}
	if (console_path != NULL) {
		const struct vcon_config ccfg = {
			.timeout_ns = (uint64_t)timeout_ms * 1000000ull,
			.on_event = on_console_event,
			.tee = console_tee,
		};

		rc = simlink_open(&con_link_, console_path, 1, 5000);
		if (rc < 0) {
			fprintf(stderr, "cannot join the console's ivshmem hub at %s: %s\n",
				console_path, simlink_strerror(rc));
			vcan_shutdown(&vc);
			simlink_close(&link_);
			hal_hosted_close();
			return 1;
		}
		rc = vcon_init(&con, &br, &vc, &con_link_.link, &ccfg);
		if (rc != VIO_OK) {
			printf("LINKERR console rc=%d %s\n", rc, vio_strerror(rc));
			fflush(stdout);
			vcan_shutdown(&vc);
			simlink_close(&con_link_);
			simlink_close(&link_);
			hal_hosted_close();
			return 4;
		}
		con_on = true;
	}
	printf("READY cnf1=%02X cnf2=%02X cnf3=%02X id=%u protocol=0x%04X\n",
	       (unsigned int)br.can.timing.cnf1, (unsigned int)br.can.timing.cnf2,
	       (unsigned int)br.can.timing.cnf3, (unsigned int)link_.id,
	       (unsigned int)link_.protocol);
	fflush(stdout);

	bool stdin_open = true, run = true;
	uint64_t end = hal_now_ns() + (uint64_t)max_ms * 1000000ull;
	uint64_t idle_ns = 0;

	while (run && !stop_signal && hal_hosted_ok() && hal_now_ns() < end) {
		int work = 0;

		rc = bridge_poll(&br);
		if (rc < 0) {
			printf("POLLERR rc=%d %s\n", rc, mcp2515_strerror(rc));
			fflush(stdout);
		} else {
			work += rc;
		}
		work += vcan_poll(&vc);
		if (stdin_open)
			run = read_commands(&stdin_open);
		/* log lines (hal_log fills a RAM ring) only when the CAN side is idle; one
		 * simulator round trip per drain, so a line at a time (the Pi's UART FIFO
		 * takes 8 bytes, but its drain costs no round trip) */
		if (con_on) {
			/* the console (log out, commands in) under the same idle rule */
			if (vcon_pending(&con) && !hal_int_asserted() &&
			    hal_now_ns() < bridge_next_deadline_ns(&br))
				work += vcon_poll(&con);
		} else if (logring_pending() > 0 &&
			   logring_idle(hal_int_asserted(), hal_now_ns(),
					bridge_next_deadline_ns(&br))) {
			work += (int)(hal_hosted_log_drain(64u) > 0);
		}
		if (work > 0) {
			idle_ns = 0;
			continue;
		}
		/* idle: sleep on the link's eventfds, a little longer each time */
		idle_ns = idle_ns == 0 ? IDLE_MIN_NS : idle_ns * 2u;
		if (idle_ns > IDLE_MAX_NS)
			idle_ns = IDLE_MAX_NS;
		uint64_t now = hal_now_ns(), dl = bridge_next_deadline_ns(&br);
		uint64_t wait = idle_ns;

		if (dl <= now)
			wait = 0;
		else if (dl - now < wait)
			wait = dl - now;
		if (wait > 0 && ivl_wait(&link_.link, wait) > 0)
			idle_ns = 0;
	}
	vcan_shutdown(&vc);
	if (con_on) {
		vcon_shutdown(&con);
		simlink_close(&con_link_);
	}
	print_stats();
	printf("BYE\n");
	fflush(stdout);
	simlink_close(&link_);
	hal_hosted_close();
	return 0;
}
