/* SPDX-License-Identifier: MIT */
/* virtio_can.c - virtio-can driver of the inmate over ivshmem; see virtio_can.h. */
#include "virtio_can.h"

#include "hal.h"
#include "shared_layout.h"
#include "util.h"

#define DEF_TXQ 128u
#define DEF_RXQ 64u
#define DEF_CTLQ 8u
#define DEF_RETRY_MIN_MS 20u
#define DEF_RETRY_MAX_MS 2000u

/* Slot layouts in the R/W section (offsets inside one slot). */
#define TX_STRIDE 32u     /* 16-byte header + 8 payload bytes ... */
#define TX_RESULT 24u     /* ... then the device-written result byte */
#define RX_STRIDE 32u
#define RX_LEN IVV_CAN_RX_BUFFER_SIZE_CLASSIC /* 24: what Linux posts on a classic link */
#define CTL_STRIDE 16u
#define CTL_RESULT 8u

#define HDR IVV_CAN_FRAME_HEADER_SIZE
#define MAX_PER_POLL 64u            /* completions handled per queue and pass */
#define STABLE_NS 1000000000ull     /* a link up this long resets the back-off */
#define LEAVE_GRACE_NS 200000000ull /* wait this long for the backend to see us leave */
#define RESULT_UNSET 0xFFu          /* what a result byte holds until the device writes it */

static uint64_t ms_ns(uint32_t ms)
{
	return (uint64_t)ms * 1000000ull;
}

static void event(struct vcan *vc, const char *ev, const char *detail)
{
	hal_log("virtio-can: %s%s%s", ev, detail[0] ? " " : "", detail);
	if (vc->cfg.on_event != NULL)
		vc->cfg.on_event(vc->cfg.event_ctx, ev, detail);
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v & 0xFFu);
	p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
	for (unsigned int i = 0; i < 4u; i++)
		p[i] = (uint8_t)((v >> (8u * i)) & 0xFFu);
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] | ((uint16_t)p[1] << 8));
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
	       ((uint32_t)p[3] << 24);
}

/* ---- buffer slots ------------------------------------------------------ */

static void slots_init(struct vcan_slots *s, uint32_t base, uint16_t stride, uint16_t count)
{
	s->base = base;
	s->stride = stride;
	s->count = count > VQ_MAX_SIZE ? (uint16_t)VQ_MAX_SIZE : count;
	s->nfree = 0;
	for (uint16_t i = s->count; i > 0u; i--) {
		s->free[s->nfree++] = (uint16_t)(i - 1u);
		s->busy[i - 1u] = 0;
	}
}

static int slot_get(struct vcan_slots *s)
{
	if (s->nfree == 0u)
		return -1;
	uint16_t i = s->free[--s->nfree];

	s->busy[i] = 1;
	return i;
}

/* Cookies come from our own virtqueue bookkeeping, but check anyway. */
static bool slot_put(struct vcan_slots *s, uint32_t i)
{
	if (i >= s->count || !s->busy[i] || s->nfree >= s->count)
		return false;
	s->busy[i] = 0;
	s->free[s->nfree++] = (uint16_t)i;
	return true;
}

static uint32_t slot_off(const struct vcan_slots *s, uint32_t i)
{
	return s->base + i * (uint32_t)s->stride;
}

/* ---- bridge hooks (may run inside a transaction wait: only record) ------ */

static void on_relay(void *ctx, const struct can_msg *m)
{
	struct vcan *vc = ctx;

	if (vc->state != VCAN_LIVE || vc->in_bringup ||
	    (vc->dev_status & IVV_CAN_S_CTRL_BUSOFF) || vc->relay_count >= VCAN_RELAY_FIFO) {
		vc->stats.relay_dropped++;
		return;
	}
	vc->relay[(vc->relay_head + vc->relay_count) & (VCAN_RELAY_FIFO - 1u)] = *m;
	vc->relay_count++;
}

static void on_tx_done(void *ctx, uint32_t tag, bool ok)
{
	struct vcan *vc = ctx;

	(void)tag;
	if (ok)
		vc->stats.rx_sent++;
	else
		vc->stats.rx_send_fails++;
}

static void on_state(void *ctx, enum mcp2515_state s)
{
	struct vcan *vc = ctx;
	enum mcp2515_state prev = vc->can_state;
	uint64_t now = hal_now_ns();

	vc->can_state = s;
	if (s == MCP2515_BUS_OFF && prev != MCP2515_BUS_OFF) {
		vc->restart_at_ns = now + ms_ns(vc->cfg.restart_ms);
		vc->report_busoff = vc->busoff_ext;
		event(vc, "CAN_BUSOFF", "");
	} else if (prev == MCP2515_BUS_OFF && s != MCP2515_STOPPED && s != MCP2515_BUS_OFF) {
		/* back on the bus: clear the BUSOFF our report set on the link */
		vc->report_busoff = false;
		vc->start_due = true;
		vc->start_at_ns = now;
	}
}

/* ---- control ------------------------------------------------------------ */

/* A control request of len (<= CTL_RESULT) readable bytes; its msg_type first. */
static int send_ctl_req(struct vcan *vc, const uint8_t *req, uint32_t len)
{
	int slot = slot_get(&vc->ctl);

	if (slot < 0)
		return -1;
	uint32_t off = slot_off(&vc->ctl, (uint32_t)slot);
	const struct vq_buf out = { off, len };
	const struct vq_buf in = { off + CTL_RESULT, 1u };

	shm_write(&vc->vio.rw, off, req, len);
	shm_st8(&vc->vio.rw, off + CTL_RESULT, RESULT_UNSET);
	vc->ctl.msg[slot] = get16(req);
	if (vq_add(&vc->ctlq->vq, &out, 1, &in, 1, (uint32_t)slot) < 0) {
		(void)slot_put(&vc->ctl, (uint32_t)slot);
		return -1;
	}
	if (vq_kick_needed(&vc->ctlq->vq))
		vio_kick(&vc->vio, vc->ctlq);
	return 0;
}

static int send_ctl(struct vcan *vc, uint16_t msg)
{
	uint8_t req[2];

	put16(req, msg);
	return send_ctl_req(vc, req, sizeof(req));
}

/*
 * The MCP2515's error state as Linux's enum can_state, or -1 when it is not
 * on the bus (stopped, bus-off: those have their own flow).
 */
static int err_state_now(const struct vcan *vc)
{
	switch (vc->can_state) {
	case MCP2515_ERROR_ACTIVE:
		return IVV_CAN_STATE_ERROR_ACTIVE;
	case MCP2515_ERROR_WARNING:
		return IVV_CAN_STATE_ERROR_WARNING;
	case MCP2515_ERROR_PASSIVE:
		return IVV_CAN_STATE_ERROR_PASSIVE;
	default:
		return -1;
	}
}

/*
 * Report the error state and RX overflows the device has not heard of yet,
 * with the CAN_ERR_CRTL bits Linux's mcp251x would put in data[1] for the same
 * EFLG: TX before RX, passive before warning, RX_OVERFLOW on lost frames, and
 * ACTIVE on the way back.  Polled (not from the state hook, which may run
 * inside a transaction wait); a state that comes and goes between two polls
 * is seen as its counters and overflows only, as a 10 ms EFLG poll sees it.
 */
static int report_errors(struct vcan *vc)
{
	int st = err_state_now(vc);
	uint32_t ovr_now = vc->br->can.stats.rx_overflows;
	uint32_t ovr = ovr_now - vc->ovr_sent;

	if (!vc->err_ext || st < 0 || ((uint8_t)st == vc->err_state_sent && ovr == 0u))
		return 0;
	bool tx;
	uint8_t tec, rec, crtl = 0;

	mcp2515_error_info(&vc->br->can, &tx, &tec, &rec);
	if (st == IVV_CAN_STATE_ERROR_PASSIVE)
		crtl = tx ? IVV_CAN_ERR_CRTL_TX_PASSIVE : IVV_CAN_ERR_CRTL_RX_PASSIVE;
	else if (st == IVV_CAN_STATE_ERROR_WARNING)
		crtl = tx ? IVV_CAN_ERR_CRTL_TX_WARNING : IVV_CAN_ERR_CRTL_RX_WARNING;
	else if (vc->err_state_sent != IVV_CAN_STATE_ERROR_ACTIVE)
		crtl = IVV_CAN_ERR_CRTL_ACTIVE;
	if (ovr != 0u)
		crtl |= IVV_CAN_ERR_CRTL_RX_OVERFLOW;
	uint8_t req[IVV_CAN_ERROR_REPORT_SIZE];

	put16(req, IVV_CAN_IVV_ERROR_REPORT);
	req[2] = (uint8_t)st;
	req[3] = crtl;
	req[4] = tec;
	req[5] = rec;
	put16(req + 6, ovr > 0xFFFFu ? 0xFFFFu : (uint16_t)ovr);
	if (send_ctl_req(vc, req, sizeof(req)) < 0)
		return 0; /* no slot now: the next poll tries again */
	char detail[64];

	util_snprintf(detail, sizeof(detail), "state=%u crtl=0x%02x tec=%u rec=%u ovr=%u",
		      (unsigned int)st, (unsigned int)crtl, (unsigned int)tec, (unsigned int)rec,
		      (unsigned int)ovr);
	event(vc, "ERROR_REPORT", detail);
	vc->err_state_sent = (uint8_t)st;
	vc->ovr_sent = ovr_now;
	return 1;
}

static int collect_ctl(struct vcan *vc)
{
	int n = 0;
	uint32_t cookie, len;

	for (uint32_t i = 0; i < MAX_PER_POLL && vq_get_used(&vc->ctlq->vq, &cookie, &len) > 0;
	     i++, n++) {
		if (cookie >= vc->ctl.count)
			continue;
		uint8_t res = len >= 1u ? shm_ld8(&vc->vio.rw, slot_off(&vc->ctl, cookie) + CTL_RESULT)
					: RESULT_UNSET;
		uint16_t msg = vc->ctl.msg[cookie];
		bool ok = res == IVV_CAN_RESULT_OK;

		(void)slot_put(&vc->ctl, cookie);
		vc->stats.ctl_count++;
		if (!ok)
			vc->stats.ctl_fails++;
		if (msg == VCAN_CTRL_IVV_BUSOFF) {
			if (ok)
				vc->stats.busoff_reports++;
			event(vc, ok ? "BUSOFF_REPORTED" : "BUSOFF_REPORT_REFUSED", "");
		} else if (msg == IVV_CAN_IVV_ERROR_REPORT) {
			if (ok)
				vc->stats.err_reports++;
			else
				vc->stats.err_report_fails++;
			event(vc, ok ? "ERROR_REPORTED" : "ERROR_REPORT_REFUSED", "");
		} else if (msg == IVV_CAN_SET_CTRL_MODE_START) {
			event(vc, ok ? "STARTED" : "START_REFUSED", "");
		}
	}
	return n;
}

static void read_config(struct vcan *vc, uint64_t now)
{
	uint8_t b[2];
	uint16_t old = vc->dev_status;

	if (vio_read_config(&vc->vio, 0, b, sizeof(b)) != VIO_OK)
		return;
	vc->dev_status = get16(b);
	if ((vc->dev_status & IVV_CAN_S_CTRL_BUSOFF) && !(old & IVV_CAN_S_CTRL_BUSOFF)) {
		event(vc, "DEVICE_BUSOFF", "");
		/* stopped by the device; our own controller is fine: restart later */
		if (vc->can_state != MCP2515_BUS_OFF && vc->cfg.restart_ms > 0u && !vc->start_due) {
			vc->start_due = true;
			vc->start_at_ns = now + ms_ns(vc->cfg.restart_ms);
		}
	} else if (!(vc->dev_status & IVV_CAN_S_CTRL_BUSOFF) && (old & IVV_CAN_S_CTRL_BUSOFF)) {
		event(vc, "DEVICE_BUSOFF_CLEARED", "");
	}
}

/* ---- TX: frames the bridge relays to Linux ------------------------------ */

static int collect_tx(struct vcan *vc)
{
	int n = 0;
	uint32_t cookie, len;

	for (uint32_t i = 0; i < MAX_PER_POLL && vq_get_used(&vc->txq->vq, &cookie, &len) > 0;
	     i++, n++) {
		if (cookie >= vc->tx.count)
			continue;
		uint8_t res = len >= 1u ? shm_ld8(&vc->vio.rw, slot_off(&vc->tx, cookie) + TX_RESULT)
					: RESULT_UNSET;

		(void)slot_put(&vc->tx, cookie);
		if (res == IVV_CAN_RESULT_OK)
			vc->stats.relay_count++;
		else
			vc->stats.relay_fails++;
	}
	return n;
}

static int drain_relay(struct vcan *vc)
{
	int n = 0;

	while (vc->relay_count > 0u && vq_num_free(&vc->txq->vq) >= 2u) {
		const struct can_msg *m = &vc->relay[vc->relay_head];
		bool rtr = (m->flags & CAN_MSG_F_RTR) != 0u;
		uint8_t f[TX_STRIDE];

		if (rtr && !vc->rtr) {
			vc->stats.relay_dropped++; /* the device did not take RTR frames */
		} else {
			int slot = slot_get(&vc->tx);

			if (slot < 0)
				break;
			uint32_t off = slot_off(&vc->tx, (uint32_t)slot);
			uint32_t len = m->len > CAN_MSG_MAX_LEN ? CAN_MSG_MAX_LEN : m->len;
			uint32_t payload = rtr ? 0u : len;
			uint32_t flags = ((m->flags & CAN_MSG_F_EXT) ? IVV_CAN_FLAGS_EXTENDED : 0u) |
					 (rtr ? IVV_CAN_FLAGS_RTR : 0u);
			const struct vq_buf out = { off, HDR + payload };
			const struct vq_buf in = { off + TX_RESULT, 1u };

			util_memset(f, 0, sizeof(f));
			put16(&f[0], IVV_CAN_MSG_TX);
			put16(&f[2], (uint16_t)len);
			put32(&f[8], flags);
			put32(&f[12], m->id);
			util_memcpy(&f[HDR], m->data, payload);
			shm_write(&vc->vio.rw, off, f, HDR + payload);
			shm_st8(&vc->vio.rw, off + TX_RESULT, RESULT_UNSET);
			if (vq_add(&vc->txq->vq, &out, 1, &in, 1, (uint32_t)slot) < 0) {
				(void)slot_put(&vc->tx, (uint32_t)slot);
				break;
			}
		}
		vc->relay_head = (vc->relay_head + 1u) & (VCAN_RELAY_FIFO - 1u);
		vc->relay_count--;
		n++;
	}
	if (n > 0 && vq_kick_needed(&vc->txq->vq))
		vio_kick(&vc->vio, vc->txq);
	return n;
}

/* ---- RX: frames from Linux to the wire ---------------------------------- */

static bool post_rx(struct vcan *vc, uint32_t slot)
{
	const struct vq_buf in = { slot_off(&vc->rx, slot), RX_LEN };

	return vq_add(&vc->rxq->vq, NULL, 0, &in, 1, slot) >= 0;
}

/* Parse an RX buffer the device filled; false for anything impossible. */
static bool parse_rx(const struct vcan *vc, const uint8_t *b, uint32_t used, struct can_msg *m)
{
	uint16_t type = get16(&b[0]);
	uint16_t len = get16(&b[2]);
	uint32_t flags = get32(&b[8]);
	uint32_t id = get32(&b[12]);
	bool ext = (flags & IVV_CAN_FLAGS_EXTENDED) != 0u;
	bool rtr = (flags & IVV_CAN_FLAGS_RTR) != 0u;

	if (used < HDR || type != IVV_CAN_MSG_RX || (flags & ~IVV_CAN_FLAGS_KNOWN) != 0u ||
	    (flags & IVV_CAN_FLAGS_FD) != 0u || (rtr && !vc->rtr))
		return false;
	if (id > (ext ? IVV_CAN_EFF_MASK : IVV_CAN_SFF_MASK))
		return false;
	if (rtr) {
		if (len > 15u)
			return false;
		if (len > CAN_MSG_MAX_LEN)
			len = CAN_MSG_MAX_LEN; /* DLC 9..15 means 8, as Linux clamps it */
	} else if (len > IVV_CAN_CLASSIC_MAX_LEN || used < HDR + len) {
		return false;
	}
	util_memset(m, 0, sizeof(*m));
	m->id = id;
	m->len = (uint8_t)len;
	m->flags = (uint8_t)((ext ? CAN_MSG_F_EXT : 0u) | (rtr ? CAN_MSG_F_RTR : 0u));
	if (!rtr)
		util_memcpy(m->data, &b[HDR], len);
	return true;
}

/* false when the bridge's FIFO is full: the frame is held and retried. */
static bool to_bridge(struct vcan *vc, const struct can_msg *m)
{
	int rc = bridge_send(vc->br, m, ++vc->tag);

	if (rc == MCP2515_E_FULL) {
		vc->held = *m;
		vc->held_valid = true;
		return false;
	}
	if (rc == MCP2515_OK)
		vc->stats.rx_count++;
	else
		vc->stats.rx_send_fails++;
	return true;
}

static int collect_rx(struct vcan *vc)
{
	int n = 0, posted = 0;
	uint32_t cookie, used;

	if (vc->held_valid) {
		struct can_msg m = vc->held;

		vc->held_valid = false;
		if (!to_bridge(vc, &m))
			return 0;
		n++;
	}
	/* with a frame held, completions stay in the used ring: back-pressure */
	for (uint32_t i = 0; i < MAX_PER_POLL && !vc->held_valid; i++) {
		uint8_t b[RX_LEN];
		struct can_msg m;

		if (vq_get_used(&vc->rxq->vq, &cookie, &used) <= 0)
			break;
		n++;
		if (cookie >= vc->rx.count)
			continue;
		/* used <= RX_LEN: the virtqueue checked it against the buffer */
		bool ok = used > 0u;

		if (ok) {
			shm_read(&vc->vio.rw, slot_off(&vc->rx, cookie), b, used);
			if (vc->err_ext && used >= IVV_CAN_FRAME_HEADER_SIZE &&
			    get32(b + 8) == IVV_CAN_FLAGS_IVV_ERROR) {
				/* another link's error report: nothing to put on our wire */
				vc->stats.rx_errframes++;
				ok = false;
			} else {
				ok = parse_rx(vc, b, used, &m);
				if (!ok)
					vc->stats.rx_invalid++;
			}
		} else {
			vc->stats.rx_empty++;
		}
		if (post_rx(vc, cookie))
			posted++;
		if (ok)
			(void)to_bridge(vc, &m);
	}
	if (posted > 0 && vq_kick_needed(&vc->rxq->vq))
		vio_kick(&vc->vio, vc->rxq);
	return n;
}

/* ---- life cycle ---------------------------------------------------------- */

static void forget(struct vcan *vc)
{
	vc->stats.relay_dropped += vc->relay_count;
	vc->relay_count = 0;
	vc->relay_head = 0;
	if (vc->held_valid)
		vc->stats.rx_send_fails++;
	vc->held_valid = false;
	vc->txq = vc->rxq = vc->ctlq = NULL;
	vc->dev_status = 0;
}

/* A link that stayed up for a while retries soon; repeated failures back off. */
static void back_off(struct vcan *vc, uint64_t now)
{
	bool stable = vc->state == VCAN_LIVE && now - vc->live_since_ns >= STABLE_NS;

	if (stable)
		vc->retry_ms = vc->cfg.retry_min_ms;
	else if (vc->retry_ms == 0u)
		vc->retry_ms = vc->cfg.retry_min_ms;
	else if (vc->retry_ms < vc->cfg.retry_max_ms)
		vc->retry_ms = vc->retry_ms * 2u > vc->cfg.retry_max_ms ? vc->cfg.retry_max_ms
									 : vc->retry_ms * 2u;
	vc->retry_at_ns = now + ms_ns(vc->retry_ms);
}

/* Leave READY: the backend resets its side and offers a fresh header. */
static void detach(struct vcan *vc, const char *reason)
{
	uint64_t now = hal_now_ns();

	back_off(vc, now);
	vio_leave(&vc->vio);
	forget(vc);
	vc->state = VCAN_LEAVING;
	vc->left_at_ns = now;
	vc->stats.detaches++;
	event(vc, "LINK_DOWN", reason);
}

/* Stay READY, reset the device at once (it must stop using our rings), re-attach later. */
static void recover(struct vcan *vc, const char *reason)
{
	uint64_t now = hal_now_ns();

	vc->stats.resets++;
	event(vc, "LINK_RESET", reason);
	vc->in_bringup = true;
	int rc = vio_reset(&vc->vio);

	vc->in_bringup = false;
	if (rc != VIO_OK) {
		detach(vc, vio_strerror(rc));
		return;
	}
	back_off(vc, now);
	forget(vc);
	vc->state = VCAN_DOWN;
}

static int bring_up(struct vcan *vc, const char **why)
{
	const uint64_t wanted = ((uint64_t)1u << IVV_CAN_F_CAN_CLASSIC) |
				((uint64_t)1u << IVV_CAN_F_RTR_FRAMES) |
				((uint64_t)1u << VCAN_F_IVV_BUSOFF_REPORT) |
				((uint64_t)1u << IVV_CAN_F_IVV_ERROR_STATE);
	uint32_t tx_pool, rx_pool, ctl_pool;
	int rc;

	*why = "probe";
	rc = vio_probe(&vc->vio);
	if (rc != VIO_OK)
		return rc;
	*why = "features";
	rc = vio_negotiate(&vc->vio, wanted);
	if (rc != VIO_OK)
		return rc;
	if (!(vc->vio.features & ((uint64_t)1u << IVV_CAN_F_CAN_CLASSIC))) {
		hal_log("virtio-can: the device does not offer classic CAN");
		return VIO_E_FEATURES;
	}
	vc->rtr = (vc->vio.features >> IVV_CAN_F_RTR_FRAMES) & 1u;
	vc->busoff_ext = (vc->vio.features >> VCAN_F_IVV_BUSOFF_REPORT) & 1u;
	vc->err_ext = (vc->vio.features >> IVV_CAN_F_IVV_ERROR_STATE) & 1u;
	*why = "queues";
	rc = vio_setup_queue(&vc->vio, IVV_CAN_TXQ, IVV_CAN_NUM_QUEUES, vc->cfg.txq_size, &vc->txq);
	if (rc == VIO_OK)
		rc = vio_setup_queue(&vc->vio, IVV_CAN_RXQ, IVV_CAN_NUM_QUEUES, vc->cfg.rxq_size,
				     &vc->rxq);
	if (rc == VIO_OK)
		rc = vio_setup_queue(&vc->vio, IVV_CAN_CONTROLQ, IVV_CAN_NUM_QUEUES,
				     vc->cfg.ctlq_size, &vc->ctlq);
	if (rc != VIO_OK)
		return rc;
	uint16_t ntx = (uint16_t)(vc->txq->vq.size / 2u);
	uint16_t nrx = vc->rxq->vq.size;
	uint16_t nctl = (uint16_t)(vc->ctlq->vq.size / 2u);

	if (ntx == 0u || nctl == 0u)
		return VIO_E_NOMEM;
	*why = "buffers";
	rc = vio_alloc(&vc->vio, (uint32_t)ntx * TX_STRIDE, &tx_pool);
	if (rc == VIO_OK)
		rc = vio_alloc(&vc->vio, (uint32_t)nrx * RX_STRIDE, &rx_pool);
	if (rc == VIO_OK)
		rc = vio_alloc(&vc->vio, (uint32_t)nctl * CTL_STRIDE, &ctl_pool);
	if (rc != VIO_OK)
		return rc;
	slots_init(&vc->tx, tx_pool, TX_STRIDE, ntx);
	slots_init(&vc->rx, rx_pool, RX_STRIDE, nrx);
	slots_init(&vc->ctl, ctl_pool, CTL_STRIDE, nctl);
	for (uint16_t i = 0; i < nrx; i++) {
		int slot = slot_get(&vc->rx);

		if (slot < 0 || !post_rx(vc, (uint32_t)slot))
			return VIO_E_INVAL;
	}
	*why = "driver ok";
	rc = vio_driver_ok(&vc->vio);
	if (rc != VIO_OK)
		return rc;
	if (vq_kick_needed(&vc->rxq->vq))
		vio_kick(&vc->vio, vc->rxq);
	vc->dev_status = 0;
	read_config(vc, hal_now_ns());
	vc->start_due = true; /* START on every attach, like `ip link set up` */
	vc->start_at_ns = 0;
	vc->report_busoff = vc->busoff_ext && vc->can_state == MCP2515_BUS_OFF;
	/* a new device knows nothing: a state other than active is reported at once;
	 * overflows from before the link are local history (counted, not reported) */
	vc->err_state_sent = IVV_CAN_STATE_ERROR_ACTIVE;
	vc->ovr_sent = vc->br->can.stats.rx_overflows;
	return VIO_OK;
}

static void attach(struct vcan *vc)
{
	const char *why = "";
	char detail[96];
	int rc;

	vc->in_bringup = true;
	rc = bring_up(vc, &why);
	vc->in_bringup = false;
	if (rc != VIO_OK) {
		forget(vc);
		util_snprintf(detail, sizeof(detail), "attach failed at %s: %s", why,
			      vio_strerror(rc));
		if (rc == VIO_E_GONE || rc == VIO_E_TIMEOUT || !vc->vio.probed)
			detach(vc, detail);
		else
			recover(vc, detail); /* stay READY; the reset drops what we set up */
		return;
	}
	vc->state = VCAN_LIVE;
	vc->live_since_ns = hal_now_ns();
	vc->stats.attaches++;
	util_snprintf(detail, sizeof(detail),
		      "features=0x%llx txq=%u rxq=%u ctlq=%u busoff_ext=%u err_ext=%u",
		      (unsigned long long)vc->vio.features, (unsigned int)vc->txq->vq.size,
		      (unsigned int)vc->rxq->vq.size, (unsigned int)vc->ctlq->vq.size,
		      vc->busoff_ext ? 1u : 0u, vc->err_ext ? 1u : 0u);
	event(vc, "LINK_UP", detail);
}

/* While waiting for the backend, keep the CAN side going. */
static void vcan_idle(void *ctx)
{
	struct vcan *vc = ctx;

	(void)bridge_poll(vc->br);
}

static void can_restart(struct vcan *vc, uint64_t now)
{
	if (vc->can_state != MCP2515_BUS_OFF || vc->cfg.restart_ms == 0u ||
	    now < vc->restart_at_ns)
		return;
	vc->restart_at_ns = now + ms_ns(vc->cfg.restart_ms); /* retry if it fails */
	if (bridge_start(vc->br) == MCP2515_OK) {
		vc->stats.can_restarts++;
		event(vc, "CAN_RESTARTED", "");
	}
}

static int service(struct vcan *vc, uint64_t now)
{
	unsigned int ev = vio_check(&vc->vio);
	int n = 0;

	if (ev & VIO_EV_LOST) {
		vc->vio.stats.backend_lost++;
		detach(vc, "backend left READY");
		return 1;
	}
	if (ev & VIO_EV_NEEDS_RESET) {
		recover(vc, "device needs reset");
		return 1;
	}
	if (ev & VIO_EV_CONFIG)
		read_config(vc, now);
	n += collect_tx(vc);
	n += collect_ctl(vc);
	n += collect_rx(vc);
	const struct virtqueue *bad = vc->txq->vq.broken   ? &vc->txq->vq
				      : vc->rxq->vq.broken ? &vc->rxq->vq
				      : vc->ctlq->vq.broken ? &vc->ctlq->vq
							    : NULL;

	if (bad != NULL) {
		char detail[96];

		vc->stats.ring_faults++;
		util_snprintf(detail, sizeof(detail), "queue %u: %s (%u)",
			      bad == &vc->txq->vq   ? 0u
			      : bad == &vc->rxq->vq ? 1u
						    : 2u,
			      vq_fault_name(bad->fault), (unsigned int)bad->fault_value);
		recover(vc, detail);
		return n + 1;
	}
	if (vc->start_due && now >= vc->start_at_ns && vc->can_state != MCP2515_BUS_OFF &&
	    send_ctl(vc, IVV_CAN_SET_CTRL_MODE_START) == 0) {
		vc->start_due = false;
		n++;
	}
	/* after a pending START (so it cannot clear the report), unless the MCP2515 is still off */
	if (vc->report_busoff && (!vc->start_due || vc->can_state == MCP2515_BUS_OFF) &&
	    send_ctl(vc, VCAN_CTRL_IVV_BUSOFF) == 0) {
		vc->report_busoff = false;
		n++;
	}
	if (!vc->start_due)
		n += report_errors(vc);
	n += drain_relay(vc);
	return n;
}

int vcan_poll(struct vcan *vc)
{
	uint64_t now;

	if (vc == NULL)
		return 0;
	now = hal_now_ns();
	can_restart(vc, now);
	switch (vc->state) {
	case VCAN_LIVE:
		return service(vc, now);
	case VCAN_LEAVING:
		/* the backend drops READY (or re-initialises its header) once it sees us go */
		if (!vio_backend_ready(&vc->vio) || vio_status(&vc->vio) == 0u ||
		    now - vc->left_at_ns > LEAVE_GRACE_NS)
			vc->state = VCAN_DOWN;
		return 0;
	case VCAN_DOWN:
	default:
		if (now < vc->retry_at_ns || !vio_backend_ready(&vc->vio))
			return 0;
		attach(vc);
		return 1;
	}
}

int vcan_init(struct vcan *vc, struct bridge *br, const struct ivshmem_link *link,
	      const struct vcan_config *cfg)
{
	int rc;

	if (vc == NULL || br == NULL || link == NULL)
		return VIO_E_INVAL;
	util_memset(vc, 0, sizeof(*vc));
	vc->br = br;
	if (cfg != NULL)
		vc->cfg = *cfg;
	if (vc->cfg.txq_size == 0u)
		vc->cfg.txq_size = DEF_TXQ;
	if (vc->cfg.rxq_size == 0u)
		vc->cfg.rxq_size = DEF_RXQ;
	if (vc->cfg.ctlq_size == 0u)
		vc->cfg.ctlq_size = DEF_CTLQ;
	if (vc->cfg.retry_min_ms == 0u)
		vc->cfg.retry_min_ms = DEF_RETRY_MIN_MS;
	if (vc->cfg.retry_max_ms < vc->cfg.retry_min_ms)
		vc->cfg.retry_max_ms = vc->cfg.retry_min_ms > DEF_RETRY_MAX_MS ? vc->cfg.retry_min_ms
										: DEF_RETRY_MAX_MS;
	if ((link->protocol & 0xC000u) != IVV_PROTO_VIRTIO_FRONT ||
	    (link->protocol & 0x3FFFu) != IVV_CAN_DEVICE_ID) {
		hal_log("virtio-can: link protocol 0x%04x is not a virtio-can frontend (0x%04x)",
			(unsigned int)link->protocol, (unsigned int)IVV_CAN_PROTOCOL_FRONTEND);
		return VIO_E_INVAL;
	}
	rc = vio_init(&vc->vio, link, vc->cfg.timeout_ns, vcan_idle, vc);
	if (rc != VIO_OK)
		return rc;
	vc->state = VCAN_DOWN;
	vc->can_state = mcp2515_get_state(&br->can);
	const struct bridge_hooks hooks = {
		.relay = on_relay, .tx_done = on_tx_done, .state = on_state, .ctx = vc,
	};

	bridge_set_hooks(br, &hooks);
	ivl_set_state(link, IVV_STATE_RESET);
	ivl_set_int_control(link, true);
	return VIO_OK;
}

void vcan_shutdown(struct vcan *vc)
{
	if (vc == NULL)
		return;
	if (vc->state != VCAN_DOWN || vc->vio.probed)
		vio_leave(&vc->vio);
	forget(vc);
	vc->state = VCAN_DOWN;
}

const char *vcan_state_name(enum vcan_state s)
{
	switch (s) {
	case VCAN_DOWN:
		return "down";
	case VCAN_LEAVING:
		return "leaving";
	case VCAN_LIVE:
		return "live";
	default:
		return "?";
	}
}
