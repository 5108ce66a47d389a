/* SPDX-License-Identifier: MIT */
/*
 * main.c - Jailhouse entry of the MCP2515 CAN cell on a Raspberry Pi 4: the
 * MCP2515 bridge (fast-reply rules) plus the virtio-can driver on the cell's
 * ivshmem link (protocol 0x8024), as hal/hosted/inmate_main.c wires them for
 * the hosted build.
 *
 * Command line (jailhouse cell load <cell> mcp2515-can.bin -s "..." -a 0x1000):
 *   mcp-osc=HZ        crystal on the HAT, REQUIRED (read the HC-49 marking:
 *                     8000000, 12000000 or 16000000)
 *   can-bitrate=BPS   default 500000
 *   can-mode=N        0 normal (default), 1 loopback, 2 listen-only
 *   spi-hz=HZ         highest SPI clock allowed, default 8000000 (the MCP2515
 *                     takes 10 MHz at most: 20 % margin)
 *   core-hz=HZ        VPU core clock feeding SPI0 in operation, default
 *                     500000000 (core_freq_min=500 in config.txt pins it)
 *   core-max-hz=HZ    the highest the core clock may ever run, default
 *                     550000000 (the Pi 4's core_freq with 4Kp60 HDMI); the
 *                     divider is computed for it, so SCLK stays <= spi-hz
 *                     whatever the firmware does with the core clock
 *   pinmux=0|1        mux GPIO 8-11 to SPI0 / GPIO 25 to input here, default 1
 *   err-poll-us=US    housekeeping poll interval, default 10000
 *   rules=TEXT        fast-reply rules, ';'-separated, see core/fastreply.h
 *   stats-s=S         log statistics every S seconds, 0 = never (default 0);
 *                     every log line goes into a RAM ring that is written
 *                     to the UART only while the CAN side is idle
 *   virtio=0|1        attach the virtio-can driver to the ivshmem device with
 *                     protocol 0x8024, default 1; without it (or without the
 *                     device) frames no rule answers are counted and dropped
 *   restart-ms=MS     restart the MCP2515 this long after a bus-off,
 *                     0 = never, default 100 (Linux's restart-ms); with
 *                     virtio also the delay of the START after a BUSOFF the
 *                     device reports
 *   txq=N rxq=N       virtio-can TX / RX ring sizes, 0 = default (128 / 64),
 *                     at most 128, rounded down to a power of two
 *   timeout-ms=MS     bound of each wait for the backend during bring-up,
 *                     default 1000 (the bridge is polled while waiting)
 *   vcon=0|1          the log and a command line on a virtio-console: the
 *                     ivshmem device with protocol 0x8003 (a second link, its
 *                     BAR0 at 0xff001000), default 0.  With it the log goes to
 *                     that console instead of the UART (printk'd start-up
 *                     messages still go to the UART); without the device the
 *                     UART stays the log's console.  Commands: help, stats,
 *                     rules, log on [S] | log off (core/virtio_console.h)
 * Numbers that do not parse or are out of range stop the cell with a message
 * naming the parameter.  Jailhouse's cmdline_parse_* match a parameter name
 * as a prefix of a word, so no name here is the prefix of another (nor of
 * the library's con-*).
 *
 * Interrupts are not used: the cell owns its core and polls the MCP2515 and
 * the shared memory on every pass (the ivshmem INTx stays disabled in the GIC).
 */
#include <inmate.h> /* first: see hal_rpi4.c */

#include "bridge.h"
#include "hal.h"
#include "hal_rpi4.h"
#include "ivshmem_rpi4.h"
#include "logring.h"
#include "shared_layout.h"
#include "util.h"
#include "virtio_can.h"
#include "virtio_console.h"

#define CMDLINE_SIZE 1024
#define RULES_MAX 900u
#define CONSOLE_BAR0 0xFF001000ul /* the console link's register page, next to virtio-can's */

CMDLINE_BUFFER(CMDLINE_SIZE);

static struct bridge br;
static struct vcan vc;
static struct ivshmem_rpi4 ivlink;
static struct vcon con;
static struct ivshmem_rpi4 conlink;
static struct bridge_hooks vcan_hooks; /* the driver's own hooks, wrapped below */
static char rules_buf[RULES_MAX + 2];  /* +1 to detect truncation, +1 NUL */
static uint32_t relayed_unhandled;
static uint32_t restart_ms;
static uint64_t restart_at_ns;         /* without virtio: next MCP2515 restart */
static bool can_bus_off;
static bool pci_ready;                 /* pci_init() done (once for both links) */

/* ---- command line ------------------------------------------------------ */

/*
 * An integer parameter.  cmdline_parse_int returns its default for a value
 * that is not a number, so a present parameter is parsed with two different
 * defaults: a typo is reported instead of silently becoming the default.
 */
static bool param_int(const char *name, long long def, long long lo, long long hi,
		      long long *out)
{
	char probe[2];

	if (cmdline_parse_str(name, probe, sizeof(probe), NULL) == NULL) {
		*out = def;
		return true;
	}
	long long a = cmdline_parse_int(name, 0), b = cmdline_parse_int(name, 1);

	if (a != b) {
		printk("mcp2515-can: %s= needs a number\n", name);
		return false;
	}
	if (a < lo || a > hi) {
		printk("mcp2515-can: %s=%lld is out of range %lld..%lld\n", name, a, lo, hi);
		return false;
	}
	*out = a;
	return true;
}

static bool param_bool(const char *name, bool def, bool *out)
{
	char probe[2];

	if (cmdline_parse_str(name, probe, sizeof(probe), NULL) == NULL) {
		*out = def;
		return true;
	}
	bool a = cmdline_parse_bool(name, false), b = cmdline_parse_bool(name, true);

	if (a != b) {
		printk("mcp2515-can: %s= must be 0 or 1\n", name);
		return false;
	}
	*out = a;
	return true;
}

/*
 * A command line longer than the buffer has run over into .bss (the loader
 * does not know the size): no NUL within CMDLINE_SIZE bytes.  Read through a
 * volatile pointer: the compiler knows the buffer as zero-initialised.
 */
static bool cmdline_fits(void)
{
	const volatile char *p = cmdline;

	for (unsigned int i = 0; i < CMDLINE_SIZE; i++)
		if (p[i] == '\0')
			return true;
	return false;
}

/* ---- bridge hooks ------------------------------------------------------ */

/*
 * Relay hook while the virtio-can driver is not attached.  Runs inside the
 * RX path: it only counts (the stats line reports the count), never logs.
 */
static void relay_dropped(void *ctx, const struct can_msg *m)
{
	(void)ctx;
	(void)m;
	relayed_unhandled++;
}

static void log_state(enum mcp2515_state s)
{
	hal_log("can: state %s", mcp2515_state_name(s));
}

/* State hook without virtio: log, and schedule the restart after a bus-off. */
static void state_local(void *ctx, enum mcp2515_state s)
{
	(void)ctx;
	log_state(s);
	if (s == MCP2515_BUS_OFF && !can_bus_off)
		restart_at_ns = hal_now_ns() + (uint64_t)restart_ms * 1000000ull;
	can_bus_off = s == MCP2515_BUS_OFF;
}

/* State hook with virtio: log, then the driver's own (it restarts the chip). */
static void state_virtio(void *ctx, enum mcp2515_state s)
{
	log_state(s);
	vcan_hooks.state(ctx, s);
}

/* Without virtio the driver's bus-off restart is done here. */
static void restart_local(void)
{
	if (!can_bus_off || restart_ms == 0u || hal_now_ns() < restart_at_ns)
		return;
	restart_at_ns = hal_now_ns() + (uint64_t)restart_ms * 1000000ull; /* if it fails */
	int rc = bridge_start(&br);

	if (rc == MCP2515_OK)
		hal_log("can: restarted after bus-off");
	else
		hal_log("can: restart after bus-off failed: %s", mcp2515_strerror(rc));
}

/* ---- the ivshmem link ---------------------------------------------------- */

/*
 * Look for the device on bus 0 first: pci_init maps bus 0 only (and the Pi 4
 * root cell has pci_mmconfig_end_bus 0), while pci_find_device, which
 * ivshmem_rpi4_open uses, scans on up to bdf 0xFFFF when nothing matches and
 * would fault at bus 1.  With the device present on bus 0 the scan stops
 * there.
 */
static int find_ivshmem_bus0(uint16_t protocol)
{
	const uint32_t want = (uint32_t)IVV_PCI_CLASS_BASE << 24 | (uint32_t)protocol << 8;

	for (unsigned int bdf = 0; bdf < 0x100u; bdf++) {
		if (pci_read_config((uint16_t)bdf, PCI_CFG_VENDOR_ID, 2) != IVV_PCI_VENDOR ||
		    pci_read_config((uint16_t)bdf, PCI_CFG_DEVICE_ID, 2) != IVV_PCI_DEVICE)
			continue;
		if ((pci_read_config((uint16_t)bdf, 0x08, 4) & 0xFFFFFF00u) == want)
			return (int)bdf;
	}
	return -1;
}

/*
 * The ivshmem device of one link: the virtual PCI scanned once for both links, the device of
 * ``proto`` on bus 0 found and mapped (``bar0``: where its registers go, 0 = the default).
 * False, with one line naming ``what`` and why (``tail`` appended), when it cannot be used.
 */
static bool open_link(struct ivshmem_rpi4 *link, uint16_t proto, unsigned long bar0,
		      const char *what, const char *tail)
{
	if (comm_region->pci_mmconfig_base == 0) {
		printk("mcp2515-can: %s off: the cell has no virtual PCI (no mmconfig base in the "
		       "comm region); add the ivshmem device to the cell config%s\n", what, tail);
		return false;
	}
	if (!pci_ready)
		pci_init();
	pci_ready = true;
	int bdf = find_ivshmem_bus0(proto);

	if (bdf < 0) {
		printk("mcp2515-can: %s off: no ivshmem device 110a:4106 with protocol 0x%x on "
		       "bus 0 of this cell%s\n", what, proto, tail);
		return false;
	}
	if (ivshmem_rpi4_open(link, proto, bar0) != 0) {
		printk("mcp2515-can: %s off: ivshmem device %02x:%02x.%x unusable%s\n", what,
		       bdf >> 8, (bdf >> 3) & 0x1f, bdf & 7, tail);
		return false;
	}
	return true;
}

static bool virtio_attach(const struct vcan_config *vcfg)
{
	if (!open_link(&ivlink, IVV_CAN_PROTOCOL_FRONTEND, 0, "virtio-can", ""))
		return false;
	int rc = vcan_init(&vc, &br, &ivlink.link, vcfg);

	if (rc != VIO_OK) {
		printk("mcp2515-can: virtio-can off: %s\n", vio_strerror(rc));
		return false;
	}
	/* vcan_init installed the driver's hooks; keep them, log state changes too */
	vcan_hooks = br.hooks;
	struct bridge_hooks h = vcan_hooks;

	h.state = state_virtio;
	bridge_set_hooks(&br, &h);
	printk("mcp2515-can: virtio-can driver on ivshmem ID %u, waiting for the backend "
	       "(protocol 0x%x)\n", (unsigned int)ivlink.link.id, IVV_CAN_PROTOCOL_BACKEND);
	return true;
}

/* The console link: false (and the UART keeps the log) when it cannot be used. */
static bool console_attach(bool with_vcan, uint64_t timeout_ns)
{
	if (!open_link(&conlink, IVV_CONSOLE_PROTOCOL_FRONTEND, CONSOLE_BAR0, "virtio-console",
		       "; the log stays on the UART"))
		return false;
	const struct vcon_config ccfg = { .timeout_ns = timeout_ns };
	int rc = vcon_init(&con, &br, with_vcan ? &vc : NULL, &conlink.link, &ccfg);

	if (rc != VIO_OK) {
		printk("mcp2515-can: virtio-console off: %s\n", vio_strerror(rc));
		return false;
	}
	printk("mcp2515-can: log and commands on virtio-console (ivshmem ID %u), waiting for "
	       "the backend (protocol 0x%x); the UART gets no more log lines\n",
	       (unsigned int)conlink.link.id, IVV_CONSOLE_PROTOCOL_BACKEND);
	return true;
}

static void log_virtio_stats(void)
{
	const struct vcan_stats *v = &vc.stats;

	hal_log("virtio-can: link=%s attaches=%u detaches=%u resets=%u ring_faults=%u "
		"timeouts=%u", vcan_state_name(vc.state), (unsigned int)v->attaches,
		(unsigned int)v->detaches, (unsigned int)v->resets, (unsigned int)v->ring_faults,
		(unsigned int)vc.vio.stats.timeouts);
	hal_log("virtio-can: relay=%u fails=%u dropped=%u rx=%u sent=%u send_fails=%u "
		"invalid=%u busoff_reports=%u restarts=%u", (unsigned int)v->relay_count,
		(unsigned int)v->relay_fails, (unsigned int)v->relay_dropped,
		(unsigned int)v->rx_count, (unsigned int)v->rx_sent, (unsigned int)v->rx_send_fails,
		(unsigned int)v->rx_invalid, (unsigned int)v->busoff_reports,
		(unsigned int)v->can_restarts);
}

/* ---- entry ----------------------------------------------------------------- */

void inmate_main(void)
{
	long long osc, bitrate, mode, spi_hz, core_hz, core_hz_max, err_poll_us, stats_s;
	long long restart, txq, rxq, timeout_ms;
	bool pinmux, virtio, console;

	printk("mcp2515-can: MCP2515 on SPI0/CE0, INT GPIO 25\n");
	if (!cmdline_fits()) {
		printk("mcp2515-can: the command line is longer than %u characters and "
		       "overwrote the cell's memory: shorten it\n", CMDLINE_SIZE - 1u);
		return;
	}
	if (!param_int("mcp-osc", 0, 0, 25000000, &osc) ||
	    !param_int("can-bitrate", 500000, 5000, 1000000, &bitrate) ||
	    !param_int("can-mode", 0, 0, 2, &mode) ||
	    !param_int("spi-hz", 8000000, 1, 10000000, &spi_hz) ||
	    !param_int("core-hz", 500000000, 1000000, 1000000000, &core_hz) ||
	    !param_int("core-max-hz", 550000000, 1000000, 1000000000, &core_hz_max) ||
	    !param_int("err-poll-us", 0, 0, 1000000, &err_poll_us) ||
	    !param_int("stats-s", 0, 0, 86400, &stats_s) ||
	    !param_int("restart-ms", 100, 0, 600000, &restart) ||
	    !param_int("txq", 0, 0, VQ_MAX_SIZE, &txq) ||
	    !param_int("rxq", 0, 0, VQ_MAX_SIZE, &rxq) ||
	    !param_int("timeout-ms", 1000, 1, 60000, &timeout_ms) ||
	    !param_bool("pinmux", true, &pinmux) || !param_bool("virtio", true, &virtio) ||
	    !param_bool("vcon", false, &console))
		return;
	if (osc == 0) {
		printk("mcp2515-can: mcp-osc=HZ is required: read the crystal on the HAT "
		       "(8000000, 12000000 or 16000000)\n");
		return;
	}
	if (osc < 1000000) {
		printk("mcp2515-can: mcp-osc=%lld is out of range 1000000..25000000\n", osc);
		return;
	}
	const char *rules = cmdline_parse_str("rules", rules_buf, sizeof(rules_buf), "");
	size_t rules_len = util_strnlen(rules, sizeof(rules_buf));

	if (rules_len > RULES_MAX) {
		printk("mcp2515-can: rules= longer than %u characters\n", RULES_MAX);
		return;
	}
	restart_ms = (uint32_t)restart;

	if (core_hz_max < core_hz) {
		printk("mcp2515-can: core-max-hz=%lld is below core-hz=%lld\n", core_hz_max, core_hz);
		return;
	}
	const struct hal_rpi4_config hcfg = {
		.spi_hz = (uint32_t)spi_hz, .core_hz = (uint32_t)core_hz,
		.core_hz_max = (uint32_t)core_hz_max, .pinmux = pinmux,
	};
	uint32_t sclk = 0;

	if (hal_rpi4_init(&hcfg, &sclk) != 0) {
		printk("mcp2515-can: SPI clock set-up impossible\n");
		return;
	}
	hal_rpi4_log_init();
	/* the fast-reply budget at this clock: 9 SCLK per byte (the BCM2711 idles one) */
	hal_log("spi0: SCLK %u Hz at core %u Hz (<= %u Hz at core %u Hz); fast reply "
		"26 B = %u us, 31 B = %u us", (unsigned int)sclk, (unsigned int)core_hz,
		(unsigned int)((uint64_t)sclk * (uint64_t)core_hz_max / (uint64_t)core_hz),
		(unsigned int)core_hz_max, (unsigned int)(26u * 9u * 1000000ull / sclk),
		(unsigned int)(31u * 9u * 1000000ull / sclk));

	struct bridge_config cfg;

	util_memset(&cfg, 0, sizeof(cfg));
	cfg.can.osc_hz = (uint32_t)osc;
	cfg.can.bitrate = (uint32_t)bitrate;
	cfg.can.mode = (enum mcp2515_opmode)mode;
	cfg.can.err_poll_us = (uint32_t)err_poll_us;
	cfg.rules = rules;
	cfg.rules_len = rules_len;
	cfg.autostart = true;

	/* until (unless) the virtio-can driver takes over */
	const struct bridge_hooks hooks = {
		.relay = relay_dropped, .state = state_local,
	};
	bool rule_err = false;
	int rc = bridge_init(&br, &cfg, &hooks, &rule_err);

	if (rc != 0) {
		hal_log("mcp2515-can: %s", rule_err ? fr_strerror(rc) : mcp2515_strerror(rc));
		return;
	}

	if (virtio) {
		const struct vcan_config vcfg = {
			.txq_size = (uint16_t)txq,
			.rxq_size = (uint16_t)rxq,
			.restart_ms = restart_ms,
			.timeout_ns = (uint64_t)timeout_ms * 1000000ull,
		};

		virtio = virtio_attach(&vcfg);
	} else {
		printk("mcp2515-can: virtio=0: fast replies only, other frames are dropped\n");
	}
	if (!virtio)
		printk("mcp2515-can: running without virtio-can; bus-off restart after %u ms\n",
		       (unsigned int)restart_ms);

	if (console)
		console = console_attach(virtio, (uint64_t)timeout_ms * 1000000ull);

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
		if (virtio)
			(void)vcan_poll(&vc);
		else
			restart_local();
		/* the log only when the CAN side is idle: to the virtio-console (which
		 * also takes commands then), or a UART FIFO's worth at most */
		if (console) {
			if (vcon_pending(&con) && !hal_int_asserted() &&
			    hal_now_ns() < bridge_next_deadline_ns(&br))
				(void)vcon_poll(&con);
		} else if (logring_pending() > 0 &&
			   logring_idle(hal_int_asserted(), hal_now_ns(),
					bridge_next_deadline_ns(&br))) {
			(void)hal_rpi4_log_drain(8u);
		}
		if (stats_ns != 0 && hal_now_ns() >= next_stats) {
			next_stats += stats_ns;
			bridge_log_stats(&br);
			if (virtio)
				log_virtio_stats();
			else if (relayed_unhandled != 0u)
				hal_log("relay: %u frames dropped (no virtio-can)",
					(unsigned int)relayed_unhandled);
		}
	}
}
