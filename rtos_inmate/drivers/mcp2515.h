/* SPDX-License-Identifier: MIT */
/*
 * mcp2515.h - freestanding MCP2515 driver for a polling bare-metal inmate.
 *
 * Design points (see rtos_inmate/README.md for the reasoning):
 *  - Only RX0IE drives the INT pin.  INT low is confirmed with READ STATUS
 *    (2 B) before RXB0 is read, so a spurious low (noise, a glitch) never
 *    re-reads a stale RXB0: INT -> READ STATUS (2 B) -> READ RX BUFFER
 *    (14 B) -> LOAD TX BUFFER (9 B with the header TXB1 already holds,
 *    14 B with a new one) -> RTS (1 B) = 26 (31) SPI bytes for an 8-byte
 *    reply.
 *  - RXB1 (rollover) and TX completion are polled with READ STATUS (2 B)
 *    right after each received frame and while a TX is in flight; EFLG
 *    (3 B) when a TX outlasts the longest frame (bus-off can only follow
 *    failed transmissions) and at a slow housekeeping interval.  Routine
 *    polls look at the INT pin first and yield to a waiting frame.
 *  - TXB0 carries the FIFO traffic one frame at a time (TXP 0), so those
 *    frames leave in order; a software FIFO holds the rest.  TXB1 (TXP 3,
 *    the highest) carries only fast replies: a reply never waits behind a
 *    FIFO frame that keeps losing arbitration or gets no ACK.  A single
 *    "urgent" slot holds a reply while TXB1 is busy.
 *  - A frame whose TXREQ stays set longer than the TX timeout is aborted
 *    (TXREQ cleared) and reported (tx_done ok = false, tx_timeouts).
 *  - Bus-off (EFLG.TXBO) puts the chip in configuration mode, cancels every
 *    pending TX and reports MCP2515_BUS_OFF; mcp2515_start() recovers.
 *  - Every wait on the chip is bounded by a timeout.
 *
 * Not thread-safe; call everything from one execution context.
 */
#ifndef RTOS_INMATE_MCP2515_H
#define RTOS_INMATE_MCP2515_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "can_msg.h"

/* Software TX FIFO depth (power of two). */
#define MCP2515_TXQ_LEN 16u

/* Result codes: 0 is success, everything else is negative. */
enum mcp2515_rc {
	MCP2515_OK = 0,
	MCP2515_E_INVAL = -1,   /* bad argument or frame */
	MCP2515_E_TIMING = -2,  /* oscillator/bitrate combination impossible */
	MCP2515_E_SPI = -3,     /* HAL SPI transfer failed */
	MCP2515_E_TIMEOUT = -4, /* chip did not reach the requested mode */
	MCP2515_E_NODEV = -5,   /* no MCP2515 answering (probe/readback) */
	MCP2515_E_STATE = -6,   /* controller stopped, bus-off or not initialised */
	MCP2515_E_FULL = -7,    /* TX FIFO or urgent slot full */
};

enum mcp2515_state {
	MCP2515_STOPPED = 0,  /* configuration mode, no TX/RX */
	MCP2515_ERROR_ACTIVE, /* started, TEC/REC < 96 */
	MCP2515_ERROR_WARNING,
	MCP2515_ERROR_PASSIVE,
	MCP2515_BUS_OFF, /* TXBO seen; chip parked in config mode until start */
};

enum mcp2515_opmode {
	MCP2515_MODE_NORMAL = 0,
	MCP2515_MODE_LOOPBACK,
	MCP2515_MODE_LISTEN_ONLY,
};

/* Limits the timing search enforces (datasheet). */
#define MCP2515_OSC_MIN_HZ 1000000u
#define MCP2515_OSC_MAX_HZ 25000000u
#define MCP2515_BITRATE_MIN 5000u
#define MCP2515_BITRATE_MAX 1000000u
#define MCP2515_NTQ_MIN 8u
#define MCP2515_NTQ_MAX 25u
#define MCP2515_SP_MIN_PERMILLE 750u
#define MCP2515_SP_MAX_PERMILLE 875u

struct mcp2515_timing {
	uint8_t brp;  /* register value: TQ = 2 * (brp + 1) / Fosc */
	uint8_t ntq;  /* time quanta per bit: 1 + prop + ps1 + ps2 */
	uint8_t prop; /* 1..8 */
	uint8_t ps1;  /* 1..8 */
	uint8_t ps2;  /* 2..8 */
	uint8_t sjw;  /* 1..4, < ps2 */
	uint8_t cnf1, cnf2, cnf3;
	uint16_t sp_permille; /* sample point */
};

/*
 * Pure: find BRP and segments for an exact bitrate with 8..25 TQ per bit and
 * a sample point in 75..87.5 %, preferring the sample point nearest 87.5 %,
 * then more TQ.  sjw 0 means 1.  Returns MCP2515_OK or MCP2515_E_TIMING
 * (MCP2515_E_INVAL for out-of-range arguments).
 */
int mcp2515_calc_timing(uint32_t osc_hz, uint32_t bitrate, uint8_t sjw,
			struct mcp2515_timing *out);

struct mcp2515_config {
	uint32_t osc_hz;     /* crystal on the board: 8, 12 or 16 MHz typically */
	uint32_t bitrate;    /* bit/s */
	uint8_t sjw;         /* 0 = default (1) */
	enum mcp2515_opmode mode;
	uint32_t err_poll_us; /* housekeeping poll interval; 0 = default 10000 */
	uint32_t tx_timeout_us; /* abort a frame pending this long; 0 = default */
};

struct mcp2515_callbacks {
	/* A received frame (called from mcp2515_poll). */
	void (*rx)(void *ctx, const struct can_msg *m);
	/* A frame queued with mcp2515_send left the chip (ok) or was cancelled. */
	void (*tx_done)(void *ctx, uint32_t tag, bool ok);
	/* The controller state changed. */
	void (*state)(void *ctx, enum mcp2515_state s);
	void *ctx;
};

struct mcp2515_stats {
	uint32_t rx_frames;
	uint32_t tx_frames;      /* completed on the wire, FIFO and urgent */
	uint32_t tx_urgent;      /* of which fast replies */
	uint32_t tx_cancelled;   /* FIFO frames dropped by stop / bus-off */
	uint32_t rx_overflows;   /* RXnOVR events seen */
	uint32_t bus_off;        /* bus-off events */
	uint32_t error_warning;  /* entries into warning */
	uint32_t error_passive;  /* entries into passive */
	uint32_t spi_xfers;
	uint32_t spi_errors;
	uint64_t spi_bytes;
	uint32_t txb_header_hits; /* LOAD TX BUFFER started at D0 (header cached) */
	/* SPI bytes from seeing INT asserted to the RTS of the fast reply */
	uint32_t fast_spi_bytes_last;
	uint32_t fast_spi_bytes_max;
	uint32_t fast_replies_timed;
	uint32_t tx_timeouts;    /* frames aborted by the TX timeout */
	uint32_t spurious_int;   /* INT low with no RX flag set */
	uint32_t urgent_dropped; /* fast replies refused: TXB1 and the slot busy */
};

/* One hardware TX buffer as the driver tracks it. */
struct mcp2515_txb {
	bool busy;      /* TXREQ set by our RTS, completion not seen yet */
	bool aborting;  /* TX timeout: TXREQ cleared, outcome not read yet */
	bool fifo;      /* holds a FIFO frame (tag valid) */
	bool hdr_valid;
	uint32_t tag;
	uint8_t hdr[5]; /* SIDH SIDL EID8 EID0 DLC last loaded */
	uint64_t start_ns;
};

#define MCP2515_TXB_FIFO 0u   /* TXB0, TXP 0 */
#define MCP2515_TXB_URGENT 1u /* TXB1, TXP 3 */

struct mcp2515_txent {
	struct can_msg msg;
	uint32_t tag;
};

struct mcp2515 {
	struct mcp2515_config cfg;
	struct mcp2515_timing timing;
	struct mcp2515_callbacks cb;
	struct mcp2515_stats stats;
	enum mcp2515_state state;
	/* EFLG at the last state change, and TEC/REC read then (error report) */
	uint8_t eflg_state, tec, rec;
	bool initialised;
	bool int_ok;     /* INT pin seen high with all flags clear at start */
	bool status_due; /* RX budget ran out: READ STATUS on the next poll */

	/* software TX FIFO */
	struct mcp2515_txent txq[MCP2515_TXQ_LEN];
	uint32_t txq_head; /* next to send */
	uint32_t txq_count;

	/* urgent (fast reply) slot */
	struct can_msg urgent;
	bool urgent_valid;

	/* what TXB0 (FIFO) and TXB1 (fast replies) hold */
	struct mcp2515_txb txb[2];
	struct can_msg urgent_hint; /* header preloaded into TXB1 at start */
	bool urgent_hint_valid;
	uint64_t tx_timeout_ns;
	uint32_t spurious_run; /* consecutive spurious INT lows */

	/* polling schedule */
	uint64_t min_frame_ns; /* shortest frame on the wire at this bitrate */
	uint64_t max_frame_ns; /* longest one */
	uint64_t err_poll_ns;
	uint64_t next_err_poll_ns;
	uint64_t next_tx_poll_ns;
	uint64_t next_stuck_check_ns;

	/* fast-path byte accounting (INT path only) */
	bool in_fast;
	uint64_t int_mark;
	uint32_t depth; /* callback nesting guard */
};

/*
 * Reset the chip, verify it answers, program bit timing, accept-all
 * filters and interrupt enables.  Leaves the controller STOPPED (config
 * mode).  cb may be NULL; individual callbacks may be NULL.
 */
int mcp2515_init(struct mcp2515 *d, const struct mcp2515_config *cfg,
		 const struct mcp2515_callbacks *cb);

/* Enter the configured operating mode.  Idempotent; also the bus-off restart. */
int mcp2515_start(struct mcp2515 *d);

/* Back to configuration mode; cancels pending TX.  Idempotent. */
int mcp2515_stop(struct mcp2515 *d);

/*
 * Queue a frame for FIFO transmission; tag comes back in tx_done.
 * MCP2515_E_INVAL for a frame the chip cannot send, MCP2515_E_STATE when not
 * started, MCP2515_E_FULL when the FIFO is full.
 */
int mcp2515_send(struct mcp2515 *d, const struct can_msg *m, uint32_t tag);

/*
 * Send ahead of the FIFO (fast reply) from TXB1 at the highest priority.
 * Loads TXB1 at once when it is idle, which is what keeps a fast reply
 * within its SPI budget.  MCP2515_E_FULL when TXB1 is busy and an urgent
 * frame is already waiting.
 */
int mcp2515_send_urgent(struct mcp2515 *d, const struct can_msg *m);

/*
 * The id, flags and length fast replies will most likely have: its header
 * is loaded into TXB1 at every start, so even the first reply loads only
 * its data bytes.  NULL clears it.
 */
void mcp2515_set_urgent_hint(struct mcp2515 *d, const struct can_msg *m);

/*
 * Service the chip: RX while INT is asserted, TX completion, error flags.
 * Returns the number of events handled (>= 0) or a negative error.
 */
int mcp2515_poll(struct mcp2515 *d);

/* Earliest time mcp2515_poll has timed work to do (idle loops may sleep until). */
uint64_t mcp2515_next_deadline_ns(const struct mcp2515 *d);

enum mcp2515_state mcp2515_get_state(const struct mcp2515 *d);

/*
 * For an error report: whether the transmit side made the current warning or
 * passive state (EFLG TXWAR/TXEP at the last state change; Linux's mcp251x
 * checks TX before RX) and the TEC/REC counters read then.  Read only on a
 * state change, so the fast-reply path never pays for them.
 */
void mcp2515_error_info(const struct mcp2515 *d, bool *tx, uint8_t *tec, uint8_t *rec);
size_t mcp2515_tx_free(const struct mcp2515 *d);
const char *mcp2515_strerror(int rc);
const char *mcp2515_state_name(enum mcp2515_state s);

#endif /* RTOS_INMATE_MCP2515_H */
