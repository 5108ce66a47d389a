/* SPDX-License-Identifier: MIT */
/*
 * mcp2515.c - MCP2515 driver, see mcp2515.h for the design.
 *
 * Chip facts (DS20001801, cross-checked with Linux mcp251x.c and Zephyr
 * can_mcp2515.c): READ RX BUFFER clears RXnIF when CS rises; RTS starts a
 * transmission (never set TXREQ by a register write); CANSTAT must be read
 * back after every mode request; the configuration registers (CNFn,
 * filters, masks) only take writes in configuration mode; entering
 * configuration mode clears the error counters.
 */
#include "mcp2515.h"

#include "hal.h"
#include "mcp2515_regs.h"
#include "util.h"

#define RESET_SETTLE_US 100u
#define RESET_TIMEOUT_NS 50000000ull /* 50 ms for the chip to show config mode */
#define MODE_TIMEOUT_NS 20000000ull  /* floor of the mode-change timeout, see below */
#define MODE_POLL_US 50u
#define DEFAULT_ERR_POLL_US 10000u /* housekeeping: EFLG + READ STATUS */
#define MAX_ERR_POLL_US 1000000u
#define POLL_RX_BUDGET 8u    /* frames per mcp2515_poll from the INT path */
#define STATUS_RX_BUDGET 4u  /* frames per status service */
#define MIN_FRAME_BITS 47u   /* standard data frame without data, no stuffing */
#define MAX_FRAME_BITS 160u  /* extended 8-byte frame, worst-case stuffing, IFS */
#define MIN_TX_POLL_NS 2000u
#define DEFAULT_TX_TIMEOUT_NS 100000000ull /* 100 ms, see tx_check_timeout */
#define TX_TIMEOUT_FRAMES 8u               /* and at least 8 longest frames */
#define MAX_TX_TIMEOUT_US 10000000u
#define SPURIOUS_INT_LIMIT 64u             /* then INT is not trusted: poll */
#define MAX_DEPTH 3u         /* callback nesting that may still touch SPI */
#define NS_PER_SEC 1000000000ull

/*
 * A mode change waits for the bus to go idle (the chip finishes the frame on
 * the wire).  The longest classic frame is about 160 bit times; at 5 kbit/s
 * that is 32 ms, so the mode timeout is derived from the bitrate below and
 * MODE_TIMEOUT_NS is only the floor.
 */

/* ------------------------------------------------------------------ */
/* SPI primitives                                                       */

static int spi(struct mcp2515 *d, const uint8_t *tx, uint8_t *rx, size_t n)
{
	d->stats.spi_xfers++;
	if (hal_spi_transfer(tx, rx, n) != 0) {
		d->stats.spi_errors++;
		return MCP2515_E_SPI;
	}
	d->stats.spi_bytes += n;
	return MCP2515_OK;
}

static int read_regs(struct mcp2515 *d, uint8_t addr, uint8_t *out, size_t n)
{
	uint8_t tx[2 + MCP_RXB_PAYLOAD + 1];
	uint8_t rx[sizeof(tx)];
	int rc;

	if (n == 0 || n > sizeof(tx) - 2)
		return MCP2515_E_INVAL;
	util_memset(tx, 0, sizeof(tx));
	tx[0] = MCP_INSTR_READ;
	tx[1] = addr;
	rc = spi(d, tx, rx, n + 2);
	if (rc == MCP2515_OK)
		util_memcpy(out, &rx[2], n);
	return rc;
}

static int write_regs(struct mcp2515 *d, uint8_t addr, const uint8_t *vals, size_t n)
{
	uint8_t tx[2 + 14];

	if (n == 0 || n > sizeof(tx) - 2)
		return MCP2515_E_INVAL;
	tx[0] = MCP_INSTR_WRITE;
	tx[1] = addr;
	util_memcpy(&tx[2], vals, n);
	return spi(d, tx, NULL, n + 2);
}

static int write_reg(struct mcp2515 *d, uint8_t addr, uint8_t val)
{
	return write_regs(d, addr, &val, 1);
}

static int bit_modify(struct mcp2515 *d, uint8_t addr, uint8_t mask, uint8_t val)
{
	const uint8_t tx[4] = { MCP_INSTR_BIT_MODIFY, addr, mask, val };

	return spi(d, tx, NULL, sizeof(tx));
}

static int read_status(struct mcp2515 *d, uint8_t *st)
{
	const uint8_t tx[2] = { MCP_INSTR_READ_STATUS, 0 };
	uint8_t rx[2];
	int rc = spi(d, tx, rx, sizeof(tx));

	if (rc == MCP2515_OK)
		*st = rx[1];
	return rc;
}

/* ------------------------------------------------------------------ */
/* Modes                                                                */

static uint64_t mode_timeout_ns(const struct mcp2515 *d)
{
	/* 2 longest frames (160 bits each) at the configured bitrate */
	uint64_t t = d->cfg.bitrate ? (320ull * NS_PER_SEC) / d->cfg.bitrate : 0;

	return t > MODE_TIMEOUT_NS ? t : MODE_TIMEOUT_NS;
}

/* Poll CANSTAT until OPMOD == mode; bounded by time and by iterations. */
static int wait_mode(struct mcp2515 *d, uint8_t mode, uint64_t timeout_ns)
{
	uint64_t start = hal_now_ns();
	uint64_t max_iter = timeout_ns / (MODE_POLL_US * 1000ull) + 2u;

	for (uint64_t i = 0; i < max_iter; i++) {
		uint8_t canstat;
		int rc = read_regs(d, MCP_CANSTAT, &canstat, 1);

		if (rc != MCP2515_OK)
			return rc;
		if ((canstat & MCP_OPMOD_MASK) == mode)
			return MCP2515_OK;
		if (hal_now_ns() - start > timeout_ns)
			break;
		hal_delay_us(MODE_POLL_US);
	}
	return MCP2515_E_TIMEOUT;
}

static int set_mode(struct mcp2515 *d, uint8_t mode, bool abort_tx)
{
	uint8_t val = (uint8_t)(mode | (abort_tx ? MCP_CANCTRL_ABAT : 0u));
	int rc, rc2;

	/* BIT MODIFY keeps OSM and the CLKOUT settings untouched */
	rc = bit_modify(d, MCP_CANCTRL, (uint8_t)(MCP_OPMOD_MASK | MCP_CANCTRL_ABAT), val);
	if (rc != MCP2515_OK)
		return rc;
	rc = wait_mode(d, mode, mode_timeout_ns(d));
	if (abort_tx) {
		/* ABAT stays set until cleared and would abort every later TX */
		rc2 = bit_modify(d, MCP_CANCTRL, MCP_CANCTRL_ABAT, 0);
		if (rc == MCP2515_OK)
			rc = rc2;
	}
	return rc;
}

static uint8_t opmode_reqop(enum mcp2515_opmode m)
{
	switch (m) {
	case MCP2515_MODE_LOOPBACK:
		return MCP_MODE_LOOPBACK;
	case MCP2515_MODE_LISTEN_ONLY:
		return MCP_MODE_LISTEN;
	case MCP2515_MODE_NORMAL:
	default:
		return MCP_MODE_NORMAL;
	}
}

static bool running(const struct mcp2515 *d)
{
	return d->state == MCP2515_ERROR_ACTIVE || d->state == MCP2515_ERROR_WARNING ||
	       d->state == MCP2515_ERROR_PASSIVE;
}

static bool can_transmit(const struct mcp2515 *d)
{
	return running(d) && d->cfg.mode != MCP2515_MODE_LISTEN_ONLY;
}

/* ------------------------------------------------------------------ */
/* Bit timing                                                           */

int mcp2515_calc_timing(uint32_t osc_hz, uint32_t bitrate, uint8_t sjw,
			struct mcp2515_timing *out)
{
	bool found = false;
	uint32_t best_dist = 0;
	struct mcp2515_timing best;

	if (out == NULL || osc_hz < MCP2515_OSC_MIN_HZ || osc_hz > MCP2515_OSC_MAX_HZ ||
	    bitrate < MCP2515_BITRATE_MIN || bitrate > MCP2515_BITRATE_MAX)
		return MCP2515_E_INVAL;
	if (sjw == 0)
		sjw = 1;
	if (sjw > 4)
		return MCP2515_E_INVAL;

	util_memset(&best, 0, sizeof(best));
	/* ascending BRP = descending TQ count: ties keep the finer resolution */
	for (uint32_t brp = 0; brp < 64u; brp++) {
		uint64_t div = 2ull * (brp + 1u) * bitrate;

		if (osc_hz % div != 0)
			continue; /* only exact bitrates */
		uint64_t ntq = osc_hz / div;

		if (ntq < MCP2515_NTQ_MIN || ntq > MCP2515_NTQ_MAX)
			continue;
		uint32_t n = (uint32_t)ntq;
		/*
		 * smallest PS2 that keeps the sample point at or below 87.5 %, is
		 * at least 2 TQ (information processing time) and exceeds SJW
		 */
		uint32_t ps2 = (n + 7u) / 8u;

		if (ps2 < 2u)
			ps2 = 2u;
		if (ps2 <= sjw)
			ps2 = (uint32_t)sjw + 1u;
		if (ps2 + 2u > n) /* keep 1 sync + at least 1 TQ before PS2 */
			continue;
		if (n - 1u - ps2 > 16u) /* PROP + PS1 hold at most 16 TQ */
			ps2 = n - 17u;
		if (ps2 > 8u || sjw >= ps2)
			continue;
		uint32_t tseg1 = n - 1u - ps2;
		uint32_t ps1 = (tseg1 + 1u) / 2u;
		uint32_t prop = tseg1 - ps1;

		if (prop < 1u || prop > 8u || ps1 < 1u || ps1 > 8u || tseg1 < ps2)
			continue;
		uint32_t sp = (1u + tseg1) * 1000u / n;

		if (sp < MCP2515_SP_MIN_PERMILLE || sp > MCP2515_SP_MAX_PERMILLE)
			continue;
		uint32_t dist = MCP2515_SP_MAX_PERMILLE - sp;

		if (found && dist >= best_dist)
			continue;
		found = true;
		best_dist = dist;
		best.brp = (uint8_t)brp;
		best.ntq = (uint8_t)n;
		best.prop = (uint8_t)prop;
		best.ps1 = (uint8_t)ps1;
		best.ps2 = (uint8_t)ps2;
		best.sjw = sjw;
		best.sp_permille = (uint16_t)sp;
		best.cnf1 = (uint8_t)(((sjw - 1u) << 6) | brp);
		best.cnf2 = (uint8_t)(MCP_CNF2_BTLMODE | ((ps1 - 1u) << 3) | (prop - 1u));
		best.cnf3 = (uint8_t)(ps2 - 1u);
	}
	if (!found)
		return MCP2515_E_TIMING;
	*out = best;
	return MCP2515_OK;
}

/* ------------------------------------------------------------------ */
/* Frame packing                                                        */

static void encode_header(const struct can_msg *m, uint8_t hdr[5])
{
	bool rtr = (m->flags & CAN_MSG_F_RTR) != 0u;

	if (m->flags & CAN_MSG_F_EXT) {
		uint32_t sid = m->id >> 18;

		hdr[0] = (uint8_t)(sid >> 3);
		hdr[1] = (uint8_t)(((sid & 7u) << 5) | MCP_SIDL_IDE | ((m->id >> 16) & 3u));
		hdr[2] = (uint8_t)((m->id >> 8) & 0xFFu);
		hdr[3] = (uint8_t)(m->id & 0xFFu);
	} else {
		hdr[0] = (uint8_t)(m->id >> 3);
		hdr[1] = (uint8_t)((m->id & 7u) << 5);
		hdr[2] = 0;
		hdr[3] = 0;
	}
	hdr[4] = (uint8_t)((rtr ? MCP_DLC_RTR : 0u) | m->len);
}

/* b = SIDH SIDL EID8 EID0 DLC D0..D7 as READ RX BUFFER returns them */
static void decode_rx(const uint8_t *b, struct can_msg *m)
{
	uint32_t sid = ((uint32_t)b[0] << 3) | ((uint32_t)b[1] >> 5);
	uint8_t dlc = b[4] & MCP_DLC_MASK;
	bool rtr;

	util_memset(m, 0, sizeof(*m));
	if (b[1] & MCP_SIDL_IDE) {
		m->flags = CAN_MSG_F_EXT;
		m->id = (sid << 18) | (((uint32_t)b[1] & MCP_SIDL_EID_MASK) << 16) |
			((uint32_t)b[2] << 8) | (uint32_t)b[3];
		rtr = (b[4] & MCP_DLC_RTR) != 0u;
	} else {
		m->id = sid;
		rtr = (b[1] & MCP_SIDL_SRR) != 0u;
	}
	m->len = dlc > CAN_MSG_MAX_LEN ? (uint8_t)CAN_MSG_MAX_LEN : dlc;
	if (rtr)
		m->flags |= CAN_MSG_F_RTR;
	else
		util_memcpy(m->data, &b[5], m->len);
}

/* ------------------------------------------------------------------ */
/* TX path                                                              */

static const uint8_t txb_ctrl[2] = { MCP_TXB0CTRL, MCP_TXB1CTRL };
static const uint8_t txb_load_sidh[2] = { MCP_INSTR_LOAD_TXB0_SIDH, MCP_INSTR_LOAD_TXB1_SIDH };
static const uint8_t txb_load_d0[2] = { MCP_INSTR_LOAD_TXB0_D0, MCP_INSTR_LOAD_TXB1_D0 };
static const uint8_t txb_rts[2] = { MCP_INSTR_RTS_TXB0, MCP_INSTR_RTS_TXB1 };
static const uint8_t txb_stat_txreq[2] = { MCP_STAT_TXB0_TXREQ, MCP_STAT_TXB1_TXREQ };

/* Load TXBn (header only when it differs from what the buffer holds) and RTS. */
static int load_and_send(struct mcp2515 *d, unsigned int b, const struct can_msg *m)
{
	struct mcp2515_txb *t = &d->txb[b];
	uint8_t hdr[5];
	uint8_t tx[1 + 5 + CAN_MSG_MAX_LEN];
	size_t ndata = (m->flags & CAN_MSG_F_RTR) ? 0u : m->len;
	int rc;

	encode_header(m, hdr);
	if (t->hdr_valid && util_memcmp(hdr, t->hdr, sizeof(hdr)) == 0) {
		/* same id and DLC as the last frame: load the data bytes only */
		d->stats.txb_header_hits++;
		if (ndata > 0) {
			tx[0] = txb_load_d0[b];
			util_memcpy(&tx[1], m->data, ndata);
			rc = spi(d, tx, NULL, 1 + ndata);
			if (rc != MCP2515_OK)
				return rc;
		}
	} else {
		tx[0] = txb_load_sidh[b];
		util_memcpy(&tx[1], hdr, sizeof(hdr));
		util_memcpy(&tx[6], m->data, ndata);
		t->hdr_valid = false;
		rc = spi(d, tx, NULL, 6 + ndata);
		if (rc != MCP2515_OK)
			return rc;
		util_memcpy(t->hdr, hdr, sizeof(hdr));
		t->hdr_valid = true;
	}
	rc = spi(d, &txb_rts[b], NULL, 1);
	if (rc != MCP2515_OK)
		return rc;
	t->busy = true;
	t->aborting = false;
	t->start_ns = hal_now_ns();
	if (!(d->txb[b ^ 1u].busy) || t->start_ns + d->min_frame_ns < d->next_tx_poll_ns)
		d->next_tx_poll_ns = t->start_ns + d->min_frame_ns;
	if (!(d->txb[b ^ 1u].busy))
		d->next_stuck_check_ns = t->start_ns + d->max_frame_ns;
	return MCP2515_OK;
}

static bool tx_any_busy(const struct mcp2515 *d)
{
	return d->txb[0].busy || d->txb[1].busy;
}

/* The urgent slot into TXB1 when it is free. */
static int tx_kick_urgent(struct mcp2515 *d)
{
	int rc;

	if (d->txb[MCP2515_TXB_URGENT].busy || !d->urgent_valid || !can_transmit(d))
		return 0;
	rc = load_and_send(d, MCP2515_TXB_URGENT, &d->urgent);
	if (rc != MCP2515_OK)
		return rc;
	d->urgent_valid = false;
	if (d->in_fast) {
		uint64_t used = d->stats.spi_bytes - d->int_mark;
		uint32_t u = used > UINT32_MAX ? UINT32_MAX : (uint32_t)used;

		d->stats.fast_spi_bytes_last = u;
		if (u > d->stats.fast_spi_bytes_max)
			d->stats.fast_spi_bytes_max = u;
		d->stats.fast_replies_timed++;
	}
	return 1;
}

/* The head of the FIFO into TXB0 when it is free: one at a time keeps the order. */
static int tx_kick_fifo(struct mcp2515 *d)
{
	struct mcp2515_txb *t = &d->txb[MCP2515_TXB_FIFO];
	int rc;

	if (t->busy || d->txq_count == 0 || !can_transmit(d))
		return 0;
	const struct mcp2515_txent *e = &d->txq[d->txq_head];

	rc = load_and_send(d, MCP2515_TXB_FIFO, &e->msg);
	if (rc != MCP2515_OK)
		return rc;
	t->fifo = true;
	t->tag = e->tag;
	d->txq_head = (d->txq_head + 1u) & (MCP2515_TXQ_LEN - 1u);
	d->txq_count--;
	return 1;
}

static int tx_kick(struct mcp2515 *d)
{
	int rc = tx_kick_urgent(d);

	if (rc < 0)
		return rc;
	int rc2 = tx_kick_fifo(d);

	return rc2 < 0 ? rc2 : rc + rc2;
}

/* TXBn is free again: count it, complete a FIFO frame with its outcome. */
static void tx_finish(struct mcp2515 *d, unsigned int b, bool ok)
{
	struct mcp2515_txb *t = &d->txb[b];
	bool fifo = t->fifo;
	uint32_t tag = t->tag;

	t->busy = false;
	t->aborting = false;
	t->fifo = false;
	if (ok) {
		d->stats.tx_frames++;
		if (b == MCP2515_TXB_URGENT)
			d->stats.tx_urgent++;
	} else {
		d->stats.tx_timeouts++;
	}
	if (fifo && d->cb.tx_done != NULL) {
		d->depth++;
		d->cb.tx_done(d->cb.ctx, tag, ok);
		d->depth--;
	}
}

/*
 * A buffer finished when READ STATUS shows its TXREQ clear after our RTS.
 * One the TX timeout aborted may still have made it onto the wire (the
 * frame in progress completes): TXBnCTRL.ABTF tells (3 SPI bytes, only
 * after a timeout).  only_b limits the check to one buffer (2 = both).
 */
static void tx_check_done(struct mcp2515 *d, uint8_t status, unsigned int only_b)
{
	for (unsigned int b = 0; b < 2u; b++) {
		struct mcp2515_txb *t = &d->txb[b];

		if ((only_b != 2u && only_b != b) || !t->busy || (status & txb_stat_txreq[b]))
			continue;
		bool ok = true;

		if (t->aborting) {
			uint8_t ctrl = MCP_TXBCTRL_ABTF;

			(void)read_regs(d, txb_ctrl[b], &ctrl, 1);
			ok = (ctrl & MCP_TXBCTRL_ABTF) == 0u;
		}
		tx_finish(d, b, ok);
	}
}

/*
 * TX timeout: a frame pending longer than tx_timeout_ns (it keeps losing
 * arbitration, or no node ACKs it: a lone node stays error-passive with
 * TXREQ set for ever) is aborted by clearing TXREQ; the outcome is read when
 * READ STATUS shows TXREQ clear (tx_check_done).
 */
static int tx_check_timeout(struct mcp2515 *d, uint64_t now)
{
	for (unsigned int b = 0; b < 2u; b++) {
		struct mcp2515_txb *t = &d->txb[b];

		if (!t->busy || t->aborting || now - t->start_ns < d->tx_timeout_ns)
			continue;
		int rc = bit_modify(d, txb_ctrl[b], MCP_TXBCTRL_TXREQ, 0);

		if (rc != MCP2515_OK)
			return rc;
		t->aborting = true;
		hal_log("mcp2515: TXB%u pending %u us, aborted", b,
			(unsigned int)((now - t->start_ns) / 1000u));
	}
	return 0;
}

/* Drop everything pending; the state is already non-running. */
static void cancel_all(struct mcp2515 *d)
{
	d->urgent_valid = false;
	for (unsigned int b = 0; b < 2u; b++) {
		struct mcp2515_txb *t = &d->txb[b];

		if (!t->busy)
			continue;
		t->busy = false;
		t->aborting = false;
		if (t->fifo) {
			t->fifo = false;
			d->stats.tx_cancelled++;
			if (d->cb.tx_done != NULL)
				d->cb.tx_done(d->cb.ctx, t->tag, false);
		}
	}
	/* pop one at a time: a callback cannot enqueue (state is not running) */
	for (uint32_t guard = 0; d->txq_count > 0 && guard < MCP2515_TXQ_LEN; guard++) {
		uint32_t tag = d->txq[d->txq_head].tag;

		d->txq_head = (d->txq_head + 1u) & (MCP2515_TXQ_LEN - 1u);
		d->txq_count--;
		d->stats.tx_cancelled++;
		if (d->cb.tx_done != NULL)
			d->cb.tx_done(d->cb.ctx, tag, false);
	}
	d->txq_count = 0;
}

/* ------------------------------------------------------------------ */
/* RX path                                                              */

static int rx_read(struct mcp2515 *d, unsigned int buf)
{
	uint8_t tx[1 + MCP_RXB_PAYLOAD];
	uint8_t rx[1 + MCP_RXB_PAYLOAD];
	struct can_msg m;
	int rc;

	util_memset(tx, 0, sizeof(tx));
	tx[0] = buf == 0 ? MCP_INSTR_READ_RXB0_SIDH : MCP_INSTR_READ_RXB1_SIDH;
	rc = spi(d, tx, rx, sizeof(tx)); /* CS rise clears RXnIF */
	if (rc != MCP2515_OK)
		return rc;
	decode_rx(&rx[1], &m);
	d->stats.rx_frames++;
	if (d->cb.rx != NULL) {
		d->depth++;
		d->cb.rx(d->cb.ctx, &m);
		d->depth--;
	}
	return MCP2515_OK;
}

/*
 * One READ STATUS, then act on it: TX completion, RXB1/RXB0 contents.
 * After an RXB0 read a full RXB1 is read first (it rolled over while RXB0
 * held the frame just read, so it is older than anything now in RXB0);
 * after an RXB1 read RXB0 goes first for the same reason.
 */
static int service_status(struct mcp2515 *d, unsigned int last_buf)
{
	int events = 0;

	for (unsigned int i = 0; i < STATUS_RX_BUDGET; i++) {
		uint8_t st;
		int rc = read_status(d, &st);

		if (rc != MCP2515_OK)
			return rc;
		d->status_due = false;
		tx_check_done(d, st, 2u);
		if (!running(d))
			return events;
		bool rx0 = (st & MCP_STAT_RX0IF) != 0u;
		bool rx1 = (st & MCP_STAT_RX1IF) != 0u;
		unsigned int next;

		if (rx0 && rx1)
			next = last_buf == 0 ? 1u : 0u;
		else if (rx1)
			next = 1u;
		else if (rx0)
			next = 0u;
		else
			break;
		rc = rx_read(d, next);
		if (rc != MCP2515_OK)
			return rc;
		last_buf = next;
		events++;
		if (!running(d))
			return events;
		/* out of budget with frames maybe left: look again on the next poll */
		d->status_due = i + 1u == STATUS_RX_BUDGET;
	}
	if (tx_any_busy(d)) {
		uint64_t step = d->min_frame_ns / 4u;

		d->next_tx_poll_ns = hal_now_ns() + (step > MIN_TX_POLL_NS ? step : MIN_TX_POLL_NS);
	}
	int rc = tx_kick(d);

	return rc < 0 ? rc : events;
}

/* ------------------------------------------------------------------ */
/* Errors and state                                                     */

static void notify_state(struct mcp2515 *d)
{
	if (d->cb.state != NULL)
		d->cb.state(d->cb.ctx, d->state);
}

static enum mcp2515_state state_from_eflg(uint8_t eflg)
{
	if (eflg & MCP_EFLG_TXBO)
		return MCP2515_BUS_OFF;
	if (eflg & (MCP_EFLG_TXEP | MCP_EFLG_RXEP))
		return MCP2515_ERROR_PASSIVE;
	if (eflg & (MCP_EFLG_TXWAR | MCP_EFLG_RXWAR | MCP_EFLG_EWARN))
		return MCP2515_ERROR_WARNING;
	return MCP2515_ERROR_ACTIVE;
}

static int enter_stopped(struct mcp2515 *d, enum mcp2515_state why)
{
	/*
	 * State first, then the cancellations: the tx_done callbacks see a
	 * stopped controller (a send from them fails) and the upper layer has
	 * already been told why its frames fail.
	 */
	d->state = why;
	int rc = set_mode(d, MCP_MODE_CONFIG, true);
	int rc2 = bit_modify(d, MCP_TXB0CTRL, MCP_TXBCTRL_TXREQ, 0);

	if (rc2 == MCP2515_OK)
		rc2 = bit_modify(d, MCP_TXB1CTRL, MCP_TXBCTRL_TXREQ, 0);
	notify_state(d);
	cancel_all(d);
	return rc != MCP2515_OK ? rc : rc2;
}

static int service_errors(struct mcp2515 *d)
{
	uint8_t eflg;
	int rc = read_regs(d, MCP_EFLG, &eflg, 1);

	if (rc != MCP2515_OK)
		return rc;
	uint8_t ovr = eflg & (MCP_EFLG_RX0OVR | MCP_EFLG_RX1OVR);

	/*
	 * CANINTF.ERRIF/MERRF are left alone: they do not drive INT (only RX0IE
	 * is enabled) and EFLG already holds everything they would tell.
	 */
	if (ovr) {
		d->stats.rx_overflows += (ovr & MCP_EFLG_RX0OVR) ? 1u : 0u;
		d->stats.rx_overflows += (ovr & MCP_EFLG_RX1OVR) ? 1u : 0u;
		rc = bit_modify(d, MCP_EFLG, ovr, 0);
		if (rc != MCP2515_OK)
			return rc;
	}
	enum mcp2515_state ns = state_from_eflg(eflg);

	if (ns == d->state)
		return 0;
	if (ns == MCP2515_BUS_OFF) {
		d->stats.bus_off++;
		hal_log("mcp2515: bus-off (EFLG=0x%02x), controller stopped", eflg);
		return enter_stopped(d, MCP2515_BUS_OFF);
	}
	/*
	 * A state change is rare: the counters (one 2-byte READ, TEC then REC)
	 * are worth their 4 SPI bytes here, for the error report to Linux.
	 */
	uint8_t cnt[2] = { 0, 0 };

	rc = read_regs(d, MCP_TEC, cnt, 2);
	if (rc != MCP2515_OK)
		return rc;
	d->eflg_state = eflg;
	d->tec = cnt[0];
	d->rec = cnt[1];
	if (ns == MCP2515_ERROR_WARNING && d->state == MCP2515_ERROR_ACTIVE)
		d->stats.error_warning++;
	if (ns == MCP2515_ERROR_PASSIVE)
		d->stats.error_passive++;
	d->state = ns;
	notify_state(d);
	return 0;
}

/* ------------------------------------------------------------------ */
/* Public API                                                           */

static int chip_reset(struct mcp2515 *d)
{
	const uint8_t cmd = MCP_INSTR_RESET;
	uint8_t canctrl;
	int rc;

	d->txb[0].hdr_valid = false;
	d->txb[1].hdr_valid = false;
	rc = spi(d, &cmd, NULL, 1);
	if (rc != MCP2515_OK)
		return rc;
	hal_delay_us(RESET_SETTLE_US); /* oscillator start-up: 128 OSC cycles */
	rc = wait_mode(d, MCP_MODE_CONFIG, RESET_TIMEOUT_NS);
	if (rc == MCP2515_E_TIMEOUT)
		return MCP2515_E_NODEV;
	if (rc != MCP2515_OK)
		return rc;
	rc = read_regs(d, MCP_CANCTRL, &canctrl, 1);
	if (rc != MCP2515_OK)
		return rc;
	if ((canctrl & MCP_CANCTRL_PROBE_MASK) != MCP_CANCTRL_PROBE_VAL)
		return MCP2515_E_NODEV;
	return MCP2515_OK;
}

static int chip_configure(struct mcp2515 *d)
{
	const struct mcp2515_timing *t = &d->timing;
	/* CNF3 CNF2 CNF1 CANINTE CANINTF EFLG: one auto-incrementing WRITE */
	const uint8_t cnf[6] = { t->cnf3, t->cnf2, t->cnf1, MCP_INT_RX0, 0, 0 };
	/* RXF0 std, RXF1 ext, RXF2 std, BFPCTRL, TXRTSCTRL */
	const uint8_t f012[14] = { 0, 0, 0, 0, 0, MCP_SIDL_IDE, 0, 0, 0, 0, 0, 0, 0, 0 };
	/* RXF3 ext, RXF4 std, RXF5 ext */
	const uint8_t f345[12] = { 0, MCP_SIDL_IDE, 0, 0, 0, 0, 0, 0, 0, MCP_SIDL_IDE, 0, 0 };
	const uint8_t masks[8] = { 0 };
	uint8_t rb[3];
	int rc;

	rc = write_regs(d, MCP_CNF3, cnf, sizeof(cnf));
	if (rc != MCP2515_OK)
		return rc;
	rc = read_regs(d, MCP_CNF3, rb, sizeof(rb));
	if (rc != MCP2515_OK)
		return rc;
	if (rb[0] != t->cnf3 || rb[1] != t->cnf2 || rb[2] != t->cnf1)
		return MCP2515_E_NODEV; /* SPI path broken or not in config mode */
	/*
	 * Accept everything, but through the filters (RXM = 00) so they can be
	 * narrowed later: masks all zero, one standard and one extended filter
	 * per buffer (a filter's EXIDE selects the frame format it applies to).
	 */
	rc = write_regs(d, MCP_RXF0SIDH, f012, sizeof(f012));
	if (rc == MCP2515_OK)
		rc = write_regs(d, MCP_RXF3SIDH, f345, sizeof(f345));
	if (rc == MCP2515_OK)
		rc = write_regs(d, MCP_RXM0SIDH, masks, sizeof(masks));
	/* RXB0 rolls over into RXB1 when full */
	if (rc == MCP2515_OK)
		rc = write_reg(d, MCP_RXB0CTRL, MCP_RXBCTRL_BUKT);
	if (rc == MCP2515_OK)
		rc = write_reg(d, MCP_RXB1CTRL, 0);
	if (rc == MCP2515_OK)
		rc = write_reg(d, MCP_TXB0CTRL, 0); /* FIFO traffic: TXP 0 */
	if (rc == MCP2515_OK) /* fast replies: TXP 3, ahead of TXB0 on the chip too */
		rc = write_reg(d, MCP_TXB1CTRL, MCP_TXBCTRL_TXP_MASK);
	return rc;
}

int mcp2515_init(struct mcp2515 *d, const struct mcp2515_config *cfg,
		 const struct mcp2515_callbacks *cb)
{
	struct mcp2515_timing t;
	int rc;

	if (d == NULL || cfg == NULL || cfg->mode > MCP2515_MODE_LISTEN_ONLY ||
	    cfg->err_poll_us > MAX_ERR_POLL_US || cfg->tx_timeout_us > MAX_TX_TIMEOUT_US)
		return MCP2515_E_INVAL;
	rc = mcp2515_calc_timing(cfg->osc_hz, cfg->bitrate, cfg->sjw, &t);
	if (rc != MCP2515_OK)
		return rc;

	util_memset(d, 0, sizeof(*d));
	d->cfg = *cfg;
	d->timing = t;
	if (cb != NULL)
		d->cb = *cb;
	d->state = MCP2515_STOPPED;
	d->err_poll_ns = (uint64_t)(cfg->err_poll_us ? cfg->err_poll_us : DEFAULT_ERR_POLL_US) *
			 1000u;
	d->min_frame_ns = (MIN_FRAME_BITS * NS_PER_SEC) / cfg->bitrate;
	d->max_frame_ns = (MAX_FRAME_BITS * NS_PER_SEC) / cfg->bitrate;
	d->tx_timeout_ns = (uint64_t)cfg->tx_timeout_us * 1000u;
	if (d->tx_timeout_ns == 0)
		d->tx_timeout_ns = DEFAULT_TX_TIMEOUT_NS;
	if (d->tx_timeout_ns < TX_TIMEOUT_FRAMES * d->max_frame_ns)
		d->tx_timeout_ns = TX_TIMEOUT_FRAMES * d->max_frame_ns;

	rc = chip_reset(d);
	if (rc == MCP2515_OK)
		rc = chip_configure(d);
	if (rc != MCP2515_OK) {
		hal_log("mcp2515: init failed: %s", mcp2515_strerror(rc));
		return rc;
	}
	d->initialised = true;
	hal_log("mcp2515: osc %u Hz, %u bit/s: BRP %u, %u TQ (%u+%u+%u+1), SP %u.%u%%, "
		"CNF1..3 %02x %02x %02x",
		(unsigned int)cfg->osc_hz, (unsigned int)cfg->bitrate, (unsigned int)t.brp,
		(unsigned int)t.ntq, (unsigned int)t.prop, (unsigned int)t.ps1,
		(unsigned int)t.ps2, (unsigned int)(t.sp_permille / 10u),
		(unsigned int)(t.sp_permille % 10u), (unsigned int)t.cnf1, (unsigned int)t.cnf2,
		(unsigned int)t.cnf3);
	return MCP2515_OK;
}

int mcp2515_start(struct mcp2515 *d)
{
	const uint8_t clear[2] = { 0, 0 }; /* CANINTF, EFLG */
	int rc;

	if (d == NULL || !d->initialised)
		return MCP2515_E_STATE;
	if (running(d))
		return MCP2515_OK;
	rc = set_mode(d, MCP_MODE_CONFIG, true); /* counters reset in config mode */
	if (rc == MCP2515_OK)
		rc = write_regs(d, MCP_CANINTF, clear, sizeof(clear));
	if (rc == MCP2515_OK)
		rc = bit_modify(d, MCP_TXB0CTRL, MCP_TXBCTRL_TXREQ, 0);
	if (rc == MCP2515_OK)
		rc = bit_modify(d, MCP_TXB1CTRL, MCP_TXBCTRL_TXREQ, 0);
	if (rc == MCP2515_OK && d->urgent_hint_valid) {
		/* the likely reply header into TXB1: the first reply loads data only */
		uint8_t tx[1 + 5];

		tx[0] = MCP_INSTR_LOAD_TXB1_SIDH;
		encode_header(&d->urgent_hint, &tx[1]);
		d->txb[1].hdr_valid = false;
		rc = spi(d, tx, NULL, sizeof(tx));
		if (rc == MCP2515_OK) {
			util_memcpy(d->txb[1].hdr, &tx[1], 5);
			d->txb[1].hdr_valid = true;
		}
	}
	if (rc != MCP2515_OK)
		return rc;
	for (unsigned int b = 0; b < 2u; b++) {
		d->txb[b].busy = false;
		d->txb[b].aborting = false;
		d->txb[b].fifo = false;
	}
	d->urgent_valid = false;
	d->spurious_run = 0;
	/*
	 * Every flag is clear now, so INT must be high.  If it is not, the pin is
	 * stuck or not wired: fall back to READ STATUS polling rather than read
	 * stale frames from RXB0 over and over.
	 */
	d->int_ok = !hal_int_asserted();
	if (!d->int_ok)
		hal_log("mcp2515: INT low with no flag set; polling READ STATUS instead");
	rc = set_mode(d, opmode_reqop(d->cfg.mode), false);
	if (rc != MCP2515_OK) {
		(void)set_mode(d, MCP_MODE_CONFIG, true);
		return rc;
	}
	uint64_t now = hal_now_ns();

	d->next_err_poll_ns = now + d->err_poll_ns;
	d->next_tx_poll_ns = now;
	d->state = MCP2515_ERROR_ACTIVE;
	notify_state(d);
	return MCP2515_OK;
}

int mcp2515_stop(struct mcp2515 *d)
{
	if (d == NULL || !d->initialised)
		return MCP2515_E_STATE;
	if (d->state == MCP2515_STOPPED)
		return MCP2515_OK;
	if (d->state == MCP2515_BUS_OFF) {
		/* already parked in config mode with nothing pending */
		d->state = MCP2515_STOPPED;
		notify_state(d);
		return MCP2515_OK;
	}
	return enter_stopped(d, MCP2515_STOPPED);
}

int mcp2515_send(struct mcp2515 *d, const struct can_msg *m, uint32_t tag)
{
	if (d == NULL || m == NULL || !can_msg_valid(m))
		return MCP2515_E_INVAL;
	if (!d->initialised || !can_transmit(d))
		return MCP2515_E_STATE;
	if (d->txq_count >= MCP2515_TXQ_LEN)
		return MCP2515_E_FULL;
	uint32_t idx = (d->txq_head + d->txq_count) & (MCP2515_TXQ_LEN - 1u);

	d->txq[idx].msg = *m;
	d->txq[idx].tag = tag;
	d->txq_count++;
	/* queued either way; an SPI error here surfaces from the next poll */
	if (d->depth <= MAX_DEPTH)
		(void)tx_kick(d);
	return MCP2515_OK;
}

int mcp2515_send_urgent(struct mcp2515 *d, const struct can_msg *m)
{
	if (d == NULL || m == NULL || !can_msg_valid(m))
		return MCP2515_E_INVAL;
	if (!d->initialised || !can_transmit(d))
		return MCP2515_E_STATE;
	if (d->urgent_valid) {
		d->stats.urgent_dropped++;
		return MCP2515_E_FULL;
	}
	d->urgent = *m;
	d->urgent_valid = true;
	if (d->depth > MAX_DEPTH)
		return MCP2515_OK;
	if (d->txb[MCP2515_TXB_URGENT].busy && !d->txb[MCP2515_TXB_URGENT].aborting) {
		/* TXB1 may have finished since we last looked */
		uint8_t st;

		if (read_status(d, &st) != MCP2515_OK)
			return MCP2515_OK; /* stays queued */
		tx_check_done(d, st, MCP2515_TXB_URGENT);
	}
	(void)tx_kick_urgent(d);
	return MCP2515_OK;
}

void mcp2515_set_urgent_hint(struct mcp2515 *d, const struct can_msg *m)
{
	if (d == NULL)
		return;
	d->urgent_hint_valid = m != NULL && can_msg_valid(m);
	if (d->urgent_hint_valid)
		d->urgent_hint = *m;
}

int mcp2515_poll(struct mcp2515 *d)
{
	int events = 0;
	int rc;

	if (d == NULL || !d->initialised)
		return MCP2515_E_STATE;
	if (!running(d))
		return 0;

	/*
	 * INT asserted: only RX0IE drives the pin, but a low level is confirmed
	 * with READ STATUS (2 B) before RXB0 is read: a spurious low must not
	 * read a stale RXB0 again (a duplicate frame and reply).  This is the
	 * fast path the SPI budget is about; d->int_mark starts the count of
	 * bytes until the reply's RTS (see tx_kick_urgent).
	 */
	for (unsigned int i = 0; d->int_ok && i < POLL_RX_BUDGET && running(d); i++) {
		uint8_t st;
		unsigned int buf;

		if (!hal_int_asserted())
			break;
		d->int_mark = d->stats.spi_bytes;
		d->in_fast = true;
		rc = read_status(d, &st);
		if (rc != MCP2515_OK) {
			d->in_fast = false;
			return rc;
		}
		/* a finished fast reply frees TXB1 for this one (no SPI unless aborted) */
		tx_check_done(d, st, MCP2515_TXB_URGENT);
		if (st & MCP_STAT_RX0IF) {
			buf = 0; /* older than a frame in RXB1: that one rolled over */
		} else if (st & MCP_STAT_RX1IF) {
			buf = 1;
		} else {
			d->in_fast = false;
			d->stats.spurious_int++;
			if (++d->spurious_run >= SPURIOUS_INT_LIMIT) {
				d->int_ok = false;
				hal_log("mcp2515: INT low %u times with no RX flag; polling READ "
					"STATUS instead", (unsigned int)d->spurious_run);
			}
			break;
		}
		d->spurious_run = 0;
		rc = rx_read(d, buf);
		d->in_fast = false;
		if (rc != MCP2515_OK)
			return rc;
		events++;
		if (!running(d))
			return events;
		rc = service_status(d, buf);
		if (rc < 0)
			return rc;
		events += rc;
	}
	if (!running(d))
		return events;

	uint64_t now = hal_now_ns();
	bool tx_due = (tx_any_busy(d) && now >= d->next_tx_poll_ns) || d->status_due;
	bool hk_due = now >= d->next_err_poll_ns;

	/*
	 * Routine status reads must not delay a frame that is already waiting:
	 * look at the pin (no SPI) first and leave them for the next call.
	 */
	if (d->int_ok && (tx_due || hk_due) && hal_int_asserted())
		return events;
	if (tx_due || hk_due || !d->int_ok) {
		rc = service_status(d, 1);
		if (rc < 0)
			return rc;
		events += rc;
	}
	/*
	 * Bus-off only ever follows failed transmissions: a TX still pending
	 * after the longest possible frame gets EFLG checked at once, besides the
	 * slow housekeeping poll.
	 */
	bool stuck = tx_any_busy(d) && now >= d->next_stuck_check_ns;

	if (running(d) && (hk_due || stuck)) {
		if (hk_due)
			d->next_err_poll_ns = now + d->err_poll_ns;
		if (stuck)
			d->next_stuck_check_ns = now + d->max_frame_ns;
		rc = service_errors(d);
		if (rc < 0)
			return rc;
		if (running(d) && stuck) {
			rc = tx_check_timeout(d, now);
			if (rc < 0)
				return rc;
		}
	}
	if (running(d)) {
		rc = tx_kick(d);
		if (rc < 0)
			return rc;
	}
	return events;
}

uint64_t mcp2515_next_deadline_ns(const struct mcp2515 *d)
{
	if (d == NULL || !d->initialised || !running(d))
		return UINT64_MAX;
	if (!d->int_ok || d->status_due ||
	    (!d->txb[MCP2515_TXB_URGENT].busy && d->urgent_valid) ||
	    (!d->txb[MCP2515_TXB_FIFO].busy && d->txq_count > 0))
		return 0;
	uint64_t t = d->next_err_poll_ns;

	if (tx_any_busy(d) && d->next_tx_poll_ns < t)
		t = d->next_tx_poll_ns;
	if (tx_any_busy(d) && d->next_stuck_check_ns < t)
		t = d->next_stuck_check_ns;
	return t;
}

void mcp2515_error_info(const struct mcp2515 *d, bool *tx, uint8_t *tec, uint8_t *rec)
{
	const uint8_t e = d != NULL ? d->eflg_state : 0u;

	*tx = d != NULL && d->state == MCP2515_ERROR_PASSIVE ? (e & MCP_EFLG_TXEP) != 0u
	      : d != NULL && d->state == MCP2515_ERROR_WARNING ? (e & MCP_EFLG_TXWAR) != 0u
							     : false;
	*tec = d != NULL ? d->tec : 0u;
	*rec = d != NULL ? d->rec : 0u;
}

enum mcp2515_state mcp2515_get_state(const struct mcp2515 *d)
{
	return d != NULL ? d->state : MCP2515_STOPPED;
}

size_t mcp2515_tx_free(const struct mcp2515 *d)
{
	return d != NULL ? MCP2515_TXQ_LEN - d->txq_count : 0u;
}

const char *mcp2515_strerror(int rc)
{
	switch (rc) {
	case MCP2515_OK:
		return "ok";
	case MCP2515_E_INVAL:
		return "invalid argument";
	case MCP2515_E_TIMING:
		return "no valid bit timing for this oscillator and bitrate";
	case MCP2515_E_SPI:
		return "SPI transfer failed";
	case MCP2515_E_TIMEOUT:
		return "timeout waiting for the chip";
	case MCP2515_E_NODEV:
		return "no MCP2515 answering";
	case MCP2515_E_STATE:
		return "controller not started";
	case MCP2515_E_FULL:
		return "TX queue full";
	default:
		return "unknown error";
	}
}

const char *mcp2515_state_name(enum mcp2515_state s)
{
	switch (s) {
	case MCP2515_STOPPED:
		return "STOPPED";
	case MCP2515_ERROR_ACTIVE:
		return "ERROR_ACTIVE";
	case MCP2515_ERROR_WARNING:
		return "ERROR_WARNING";
	case MCP2515_ERROR_PASSIVE:
		return "ERROR_PASSIVE";
	case MCP2515_BUS_OFF:
		return "BUS_OFF";
	default:
		return "?";
	}
}
