/* SPDX-License-Identifier: MIT */
/*
 * virtio_console.h - the inmate's virtio-console DRIVER (frontend, port 0,
 * VIRTIO 1.2 5.3) on an ivshmem link of its own (protocol 0x8003): the cell's
 * log goes out on it and a small command line comes in.
 *
 *   log ring (core/logring.c, filled by hal_log)
 *        -> transmitq (queue 1): buffers of VCON_TX_SLOT bytes, "\n" sent as
 *           "\r\n" (unless a CR came right before it); taken only by vcon_poll, which the platform's main loop
 *           calls only while the CAN side is idle (INT high, nothing due)
 *   receiveq (queue 0): VCON_RX_SLOT-byte buffers, always posted
 *        -> line editor (echo, backspace, ^C/^U, CR, LF or CRLF ends a line,
 *           VCON_LINE_MAX characters, other bytes ignored)
 *        -> commands: help, stats, rules, log on [S] | log off
 *           answers go into the log ring, so they reach the console in order
 *           with the log lines; one command per pass at most
 *
 * Output is bounded and never waited for: when nobody drains the console
 * (the backend takes no transmit buffers, the link is down) the log ring
 * fills and hal_log drops whole lines with a counter (logring.h); echo bytes
 * that do not fit are dropped and counted too.  Input the backend sends faster
 * than the idle passes take it stays in its rings (the backend then stops
 * reading its host side).  Only VERSION_1 (and the transport's
 * ACCESS_PLATFORM / ORDER_PLATFORM) are negotiated; SIZE when offered, only
 * to read cols/rows; no MULTIPORT, no EMERG_WRITE.
 *
 * Life cycle as virtio_can.h: DOWN -> bring-up (bounded, the bridge is
 * polled while waiting) -> LIVE; the backend leaving READY -> leave and
 * retry; NEEDS_RESET or a broken ring -> reset and bring-up again, backing
 * off exponentially.  The line editor and the commands are pure and run
 * without a link (vcon_feed), for the unit tests.
 */
#ifndef RTOS_INMATE_VIRTIO_CONSOLE_H
#define RTOS_INMATE_VIRTIO_CONSOLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "bridge.h"
#include "ivshmem_link.h"
#include "virtio_can.h"
#include "virtio_ivshmem.h"

#define VCON_LINE_MAX 80u  /* longest command line, in characters */
#define VCON_TX_SLOT 256u  /* bytes per transmit buffer */
#define VCON_RX_SLOT 64u   /* bytes per receive buffer */
#define VCON_RX_PER_POLL 4u /* receive steps per pass; at most one command runs */

/* ---- the line editor (pure) ---------------------------------------------- */

enum vcon_ed_result {
	VCON_ED_NONE = 0, /* nothing complete yet */
	VCON_ED_LINE,     /* ed->line holds a complete line (NUL-terminated) */
	VCON_ED_OVERLONG, /* a line longer than VCON_LINE_MAX ended: refused */
};

struct vcon_editor {
	char line[VCON_LINE_MAX + 1u];
	uint16_t len;
	bool overlong;  /* characters were lost: the line is refused when it ends */
	bool last_cr;   /* the previous byte was CR: a LF right after it is part of it */
	bool done;      /* the last byte completed a line: start afresh */
};

/*
 * One input byte.  Echo bytes (at most 4) go to echo (*echo_len of them).  Printable
 * ASCII is taken while the line has room, BS/DEL erase one character, ^C and
 * ^U drop the line, CR, LF and CRLF end it; anything else is ignored.
 */
enum vcon_ed_result vcon_edit(struct vcon_editor *ed, uint8_t c, char *echo, size_t *echo_len);

/* ---- the driver ------------------------------------------------------------ */

struct vcon_config {
	uint16_t rxq_size;   /* wanted ring sizes, 0 = 16 */
	uint16_t txq_size;
	uint64_t timeout_ns; /* per transaction wait, 0 = default */
	uint32_t retry_min_ms, retry_max_ms; /* back-off, 0 = 20 / 2000 */
	/* optional: events for the platform (hosted: stdout lines) */
	void (*on_event)(void *ctx, const char *event, const char *detail);
	void *event_ctx;
	/* optional: a copy of every byte sent to the console (hosted: stderr) */
	void (*tee)(void *ctx, const char *p, size_t n);
	void *tee_ctx;
};

enum vcon_state {
	VCON_DOWN = 0,
	VCON_LEAVING,
	VCON_LIVE,
};

struct vcon_stats {
	uint32_t attaches, detaches, resets, ring_faults;
	uint32_t tx_bufs;       /* transmit buffers sent */
	uint64_t tx_bytes;      /* bytes in them */
	uint32_t rx_bufs;       /* receive buffers the device filled */
	uint32_t rx_bytes;
	uint32_t rx_empty;      /* ... handed back with nothing in them */
	uint32_t lines;         /* command lines run */
	uint32_t overlong;      /* lines refused: too long */
	uint32_t unknown;       /* unknown commands */
	uint32_t ignored;       /* input bytes the editor ignored */
};

struct vcon {
	struct vcon_config cfg;
	struct bridge *br;       /* commands; polled while waiting for the backend */
	const struct vcan *vcan; /* optional: its counters in `stats` */
	struct vio_dev vio;
	enum vcon_state state;
	bool in_bringup;
	struct vio_queue *rxq, *txq;
	uint32_t rx_base, tx_base;
	uint16_t nrx, ntx;
	uint16_t tx_free[VQ_MAX_SIZE];
	uint16_t tx_nfree;
	bool out_cr; /* the last byte sent was CR: a LF after it gets no CR of its own */
	uint8_t tx_busy[VQ_MAX_SIZE];
	bool size_valid;
	uint16_t cols, rows;
	struct vcon_editor ed;
	uint8_t in[VCON_RX_SLOT]; /* a receive buffer's bytes not fed to the editor yet */
	uint8_t in_len, in_pos;
	uint64_t retry_at_ns, live_since_ns, left_at_ns;
	uint32_t retry_ms;
	uint64_t log_period_ns, next_log_ns; /* `log on`: stats every period */
	struct vcon_stats stats;
};

/*
 * Bind to a console link (protocol 0x8003) and the bridge (vcan may be NULL).
 * VIO_OK or a vio_rc for an unusable link.
 */
int vcon_init(struct vcon *c, struct bridge *br, const struct vcan *vcan,
	      const struct ivshmem_link *link, const struct vcon_config *cfg);

/*
 * Does vcon_poll have something to do?  Cheap (shared-memory loads only), so
 * a main loop asks this before it pays for the idle check.
 */
bool vcon_pending(const struct vcon *c);

/*
 * One pass; call ONLY while the CAN side is idle.  Attaches when possible,
 * takes input (at most VCON_RX_PER_POLL buffers) and runs complete lines,
 * hands log bytes to free transmit buffers, logs stats when `log on` is due,
 * recovers from faults.  Returns the number of things done.
 */
int vcon_poll(struct vcon *c);

/* Input bytes through the editor and the commands, without a link (tests). */
void vcon_feed(struct vcon *c, const uint8_t *p, size_t n);

/* Run one command line (its answer goes into the log ring). */
void vcon_command(struct vcon *c, const char *line);

/* Leave the link (STATE 0); for a clean exit. */
void vcon_shutdown(struct vcon *c);

const char *vcon_state_name(enum vcon_state s);

#endif /* RTOS_INMATE_VIRTIO_CONSOLE_H */
