/* SPDX-License-Identifier: MIT */
/* virtio_console.c - virtio-console driver of the inmate over ivshmem; see virtio_console.h. */
#include "virtio_console.h"

#include "hal.h"
#include "logring.h"
#include "shared_layout.h"
#include "util.h"

#define DEF_QSIZE 16u
#define DEF_RETRY_MIN_MS 20u
#define DEF_RETRY_MAX_MS 2000u
#define STABLE_NS 1000000000ull     /* a link up this long resets the back-off */
#define LEAVE_GRACE_NS 200000000ull /* wait this long for the backend to see us leave */
#define TX_TAKE (VCON_TX_SLOT / 2u) /* ring bytes per buffer: each may become "\r\n" */
#define LOG_PERIOD_MAX_S 86400u

static uint64_t ms_ns(uint32_t ms)
{
	return (uint64_t)ms * 1000000ull;
}

static void event(struct vcon *c, const char *ev, const char *detail)
{
	hal_log("virtio-console: %s%s%s", ev, detail[0] ? " " : "", detail);
	if (c->cfg.on_event != NULL)
		c->cfg.on_event(c->cfg.event_ctx, ev, detail);
}

/* ---- line editor ------------------------------------------------------------ */

enum vcon_ed_result vcon_edit(struct vcon_editor *ed, uint8_t ch, char *echo, size_t *echo_len)
{
	bool after_cr = ed->last_cr;

	*echo_len = 0;
	ed->last_cr = false;
	if (ed->done) {
		ed->done = false;
		ed->len = 0;
		ed->line[0] = '\0';
	}
	if (ch == '\n' && after_cr)
		return VCON_ED_NONE; /* the LF of a CRLF */
	if (ch == '\r' || ch == '\n') {
		ed->last_cr = ch == '\r';
		echo[0] = '\r';
		echo[1] = '\n';
		*echo_len = 2;
		ed->line[ed->len] = '\0';
		ed->done = true;
		if (ed->overlong) {
			ed->overlong = false;
			return VCON_ED_OVERLONG;
		}
		return VCON_ED_LINE;
	}
	if (ch == 0x08u || ch == 0x7Fu) {
		if (ed->len > 0u && !ed->overlong) {
			ed->len--;
			echo[0] = '\b';
			echo[1] = ' ';
			echo[2] = '\b';
			*echo_len = 3;
		}
		return VCON_ED_NONE;
	}
	if (ch == 0x03u || ch == 0x15u) { /* ^C, ^U: drop the line */
		ed->len = 0;
		ed->overlong = false;
		echo[0] = '^';
		echo[1] = ch == 0x03u ? 'C' : 'U';
		echo[2] = '\r';
		echo[3] = '\n';
		*echo_len = 4;
		return VCON_ED_NONE;
	}
	if (ch < 0x20u || ch > 0x7Eu)
		return VCON_ED_NONE; /* other control bytes, non-ASCII: ignored */
	if (ed->overlong)
		return VCON_ED_NONE;
	if (ed->len >= VCON_LINE_MAX) {
		ed->overlong = true; /* the rest of this line is not echoed either */
		return VCON_ED_NONE;
	}
	ed->line[ed->len++] = (char)ch;
	echo[0] = (char)ch;
	*echo_len = 1;
	return VCON_ED_NONE;
}

/* ---- commands ----------------------------------------------------------------- */

static bool is_space(char ch)
{
	return ch == ' ' || ch == '\t';
}

/* Next word of *p into w (at most size - 1 characters kept); false when none. */
static bool next_word(const char **p, char *w, size_t size)
{
	const char *s = *p;
	size_t n = 0;

	while (is_space(*s))
		s++;
	if (*s == '\0')
		return false;
	while (*s != '\0' && !is_space(*s)) {
		if (n + 1u < size)
			w[n++] = *s;
		s++;
	}
	w[n] = '\0';
	*p = s;
	return true;
}

static bool word_is(const char *w, const char *name)
{
	size_t i = 0;

	for (; w[i] != '\0' && name[i] != '\0'; i++)
		if (w[i] != name[i])
			return false;
	return w[i] == name[i];
}

static bool parse_uint(const char *w, uint32_t max, uint32_t *out)
{
	uint32_t v = 0;

	if (*w == '\0')
		return false;
	for (; *w != '\0'; w++) {
		if (*w < '0' || *w > '9')
			return false;
		v = v * 10u + (uint32_t)(*w - '0');
		if (v > max)
			return false;
	}
	*out = v;
	return true;
}

static void cmd_help(void)
{
	logring_put("commands: help | stats | rules | log on [SECONDS] | log off");
	logring_put("  stats  counters of the MCP2515, the rules, virtio-can, the log and "
		    "this console");
	logring_put("  rules  the fast-reply rule table with per-rule counts");
	logring_put("  log    stats lines every SECONDS (default 1) on this console, or none");
}

static void cmd_stats(const struct vcon *c)
{
	if (c->br != NULL) {
		const struct mcp2515_stats *s = &c->br->can.stats;
		const struct fr_table *t = &c->br->rules;
		uint32_t matched = 0, replied = 0;

		for (uint32_t i = 0; i < t->count && i < FR_MAX_RULES; i++) {
			matched += t->rule[i].matched;
			replied += t->rule[i].replied;
		}
		logring_put("can: state=%s rx=%u tx=%u fast_replies=%u urgent_dropped=%u "
			    "tx_timeouts=%u tx_cancelled=%u", mcp2515_state_name(c->br->can.state),
			    (unsigned int)s->rx_frames, (unsigned int)s->tx_frames,
			    (unsigned int)s->tx_urgent, (unsigned int)s->urgent_dropped,
			    (unsigned int)s->tx_timeouts, (unsigned int)s->tx_cancelled);
		logring_put("can: overflows=%u bus_off=%u warning=%u passive=%u spurious_int=%u",
			    (unsigned int)s->rx_overflows, (unsigned int)s->bus_off,
			    (unsigned int)s->error_warning, (unsigned int)s->error_passive,
			    (unsigned int)s->spurious_int);
		logring_put("spi: xfers=%u bytes=%llu errors=%u fast_last=%u fast_max=%u",
			    (unsigned int)s->spi_xfers, (unsigned long long)s->spi_bytes,
			    (unsigned int)s->spi_errors, (unsigned int)s->fast_spi_bytes_last,
			    (unsigned int)s->fast_spi_bytes_max);
		logring_put("rules: count=%u seen=%u matched=%u replied=%u reply_failed=%u "
			    "relayed=%u", (unsigned int)t->count, (unsigned int)t->rx_seen,
			    (unsigned int)matched, (unsigned int)replied,
			    (unsigned int)t->reply_failed, (unsigned int)t->relayed);
	}
	if (c->vcan != NULL) {
		const struct vcan_stats *v = &c->vcan->stats;

		logring_put("virtio-can: link=%s attaches=%u detaches=%u resets=%u ring_faults=%u "
			    "timeouts=%u", vcan_state_name(c->vcan->state),
			    (unsigned int)v->attaches, (unsigned int)v->detaches,
			    (unsigned int)v->resets, (unsigned int)v->ring_faults,
			    (unsigned int)c->vcan->vio.stats.timeouts);
		logring_put("virtio-can: relay=%u relay_fails=%u relay_dropped=%u rx=%u rx_sent=%u "
			    "rx_send_fails=%u rx_invalid=%u busoff_reports=%u restarts=%u",
			    (unsigned int)v->relay_count, (unsigned int)v->relay_fails,
			    (unsigned int)v->relay_dropped, (unsigned int)v->rx_count,
			    (unsigned int)v->rx_sent, (unsigned int)v->rx_send_fails,
			    (unsigned int)v->rx_invalid, (unsigned int)v->busoff_reports,
			    (unsigned int)v->can_restarts);
	}
	const struct logring_stats *l = logring_get_stats();

	logring_put("log: lines=%u dropped=%u echo_dropped=%u bytes_out=%llu",
		    (unsigned int)l->lines, (unsigned int)l->dropped, (unsigned int)l->raw_dropped,
		    (unsigned long long)l->bytes_out);
	logring_put("console: link=%s attaches=%u detaches=%u resets=%u tx_bufs=%u rx_bytes=%u "
		    "lines=%u overlong=%u unknown=%u ignored=%u", vcon_state_name(c->state),
		    (unsigned int)c->stats.attaches, (unsigned int)c->stats.detaches,
		    (unsigned int)c->stats.resets, (unsigned int)c->stats.tx_bufs,
		    (unsigned int)c->stats.rx_bytes, (unsigned int)c->stats.lines,
		    (unsigned int)c->stats.overlong, (unsigned int)c->stats.unknown,
		    (unsigned int)c->stats.ignored);
}

static void cmd_rules(const struct vcon *c)
{
	const struct fr_table *t = c->br != NULL ? &c->br->rules : NULL;

	if (t == NULL || t->count == 0u) {
		logring_put("rules: none (every frame is relayed)");
		return;
	}
	logring_put("rules: %u", (unsigned int)t->count);
	for (uint32_t i = 0; i < t->count && i < FR_MAX_RULES; i++) {
		char text[FR_MAX_TEXT + 1u];

		if (fr_format_rule(&t->rule[i], text, sizeof(text)) < 0)
			util_snprintf(text, sizeof(text), "?");
		logring_put("  %u: %s matched=%u replied=%u", (unsigned int)i, text,
			    (unsigned int)t->rule[i].matched, (unsigned int)t->rule[i].replied);
	}
}

static void cmd_log(struct vcon *c, const char *args)
{
	char w[12];
	uint32_t s = 1;

	if (!next_word(&args, w, sizeof(w))) {
		if (c->log_period_ns == 0u)
			logring_put("log: stats off");
		else
			logring_put("log: stats every %u s",
				    (unsigned int)(c->log_period_ns / 1000000000ull));
		return;
	}
	if (word_is(w, "off")) {
		c->log_period_ns = 0;
		logring_put("log: stats off");
		return;
	}
	if (!word_is(w, "on")) {
		logring_put("error: log on [SECONDS] | log off");
		return;
	}
	if (next_word(&args, w, sizeof(w)) && (!parse_uint(w, LOG_PERIOD_MAX_S, &s) || s == 0u)) {
		logring_put("error: SECONDS must be 1..%u", LOG_PERIOD_MAX_S);
		return;
	}
	c->log_period_ns = (uint64_t)s * 1000000000ull;
	c->next_log_ns = hal_now_ns() + c->log_period_ns;
	logring_put("log: stats every %u s", (unsigned int)s);
}

void vcon_command(struct vcon *c, const char *line)
{
	char w[17]; /* an unknown word is quoted with at most 16 characters */
	const char *p = line;

	if (!next_word(&p, w, sizeof(w)))
		return; /* empty line */
	c->stats.lines++;
	if (word_is(w, "help") || word_is(w, "?"))
		cmd_help();
	else if (word_is(w, "stats"))
		cmd_stats(c);
	else if (word_is(w, "rules"))
		cmd_rules(c);
	else if (word_is(w, "log"))
		cmd_log(c, p);
	else {
		c->stats.unknown++;
		logring_put("error: unknown command '%s' (try help)", w);
	}
}

/*
 * Input bytes up to and including the first one that ends a line (whose
 * command then runs): one command per call bounds the work of an idle pass.
 * Returns the bytes consumed.
 */
static size_t feed_line(struct vcon *c, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char echo[4];
		size_t elen;
		uint8_t ch = p[i];
		enum vcon_ed_result r = vcon_edit(&c->ed, ch, echo, &elen);

		if (elen > 0u)
			(void)logring_write(echo, elen);
		else if ((ch < 0x20u || ch > 0x7Eu) && ch != '\n' && ch != 0x08u && ch != 0x7Fu)
			c->stats.ignored++;
		if (r == VCON_ED_LINE) {
			vcon_command(c, c->ed.line);
			return i + 1u;
		}
		if (r == VCON_ED_OVERLONG) {
			c->stats.overlong++;
			logring_put("error: line longer than %u characters, ignored",
				    (unsigned int)VCON_LINE_MAX);
			return i + 1u;
		}
	}
	return n;
}

void vcon_feed(struct vcon *c, const uint8_t *p, size_t n)
{
	while (n > 0u) {
		size_t k = feed_line(c, p, n);

		p += k;
		n -= k;
	}
}

/* ---- transmit: the log ring -------------------------------------------------- */

static uint32_t tx_off(const struct vcon *c, uint32_t slot)
{
	return c->tx_base + slot * VCON_TX_SLOT;
}

static uint32_t rx_off(const struct vcon *c, uint32_t slot)
{
	return c->rx_base + slot * VCON_RX_SLOT;
}

static int collect_tx(struct vcon *c)
{
	int n = 0;
	uint32_t cookie, len;

	while (n < (int)VQ_MAX_SIZE && vq_get_used(&c->txq->vq, &cookie, &len) > 0) {
		n++;
		/* cookies are our own; a device cannot name a slot twice (virtqueue.c) */
		if (cookie < c->ntx && c->tx_busy[cookie] && c->tx_nfree < c->ntx) {
			c->tx_busy[cookie] = 0;
			c->tx_free[c->tx_nfree++] = (uint16_t)cookie;
		}
	}
	return n;
}

static int fill_tx(struct vcon *c)
{
	int n = 0;

	while (c->tx_nfree > 0u && logring_pending() > 0u && vq_num_free(&c->txq->vq) > 0u) {
		char raw[TX_TAKE];
		char buf[VCON_TX_SLOT];
		size_t got = logring_take(raw, sizeof(raw)), len = 0;

		for (size_t i = 0; i < got; i++) {
			if (raw[i] == '\n' && !c->out_cr)
				buf[len++] = '\r'; /* a terminal's ONLCR (the echo has its own CR) */
			c->out_cr = raw[i] == '\r';
			buf[len++] = raw[i];
		}
		uint16_t slot = c->tx_free[--c->tx_nfree];
		const struct vq_buf out = { tx_off(c, slot), (uint32_t)len };

		shm_write(&c->vio.rw, out.addr, buf, len);
		if (vq_add(&c->txq->vq, &out, 1, NULL, 0, slot) < 0) {
			c->tx_free[c->tx_nfree++] = slot; /* the bytes are lost: broken ring */
			break;
		}
		c->tx_busy[slot] = 1;
		c->stats.tx_bufs++;
		c->stats.tx_bytes += len;
		if (c->cfg.tee != NULL)
			c->cfg.tee(c->cfg.tee_ctx, buf, len);
		n++;
	}
	if (n > 0 && vq_kick_needed(&c->txq->vq))
		vio_kick(&c->vio, c->txq);
	return n;
}

/* ---- receive: the command line --------------------------------------------- */

static bool post_rx(struct vcon *c, uint32_t slot)
{
	const struct vq_buf in = { rx_off(c, slot), VCON_RX_SLOT };

	return vq_add(&c->rxq->vq, NULL, 0, &in, 1, slot) >= 0;
}

/*
 * Input: a receive buffer is copied out and re-posted at once, then fed to the
 * editor; a pass stops after the first command line it completes (the rest
 * of the buffer waits in c->in for the next pass).
 */
static int collect_rx(struct vcon *c)
{
	int n = 0, posted = 0;
	uint32_t cookie, used;

	for (uint32_t i = 0; i < VCON_RX_PER_POLL; i++) {
		if (c->in_pos < c->in_len) {
			size_t before = c->stats.lines + c->stats.overlong;

			c->in_pos = (uint8_t)(c->in_pos +
					      feed_line(c, &c->in[c->in_pos], c->in_len - c->in_pos));
			n++;
			if (c->stats.lines + c->stats.overlong != before)
				break; /* a command ran: enough for this pass */
			continue;
		}
		if (vq_get_used(&c->rxq->vq, &cookie, &used) <= 0)
			break;
		n++;
		if (cookie >= c->nrx)
			continue;
		/* used <= VCON_RX_SLOT: the virtqueue checked it against the buffer */
		c->stats.rx_bufs++;
		c->in_pos = c->in_len = 0;
		if (used == 0u) {
			c->stats.rx_empty++;
		} else {
			shm_read(&c->vio.rw, rx_off(c, cookie), c->in, used);
			c->in_len = (uint8_t)used;
			c->stats.rx_bytes += used;
		}
		if (post_rx(c, cookie))
			posted++;
	}
	if (posted > 0 && vq_kick_needed(&c->rxq->vq))
		vio_kick(&c->vio, c->rxq);
	return n;
}

static void read_size(struct vcon *c)
{
	uint8_t b[4];

	if (!c->size_valid ||
	    vio_read_config(&c->vio, IVV_CONSOLE_OFF_COLS, b, sizeof(b)) != VIO_OK)
		return;
	c->cols = (uint16_t)(b[0] | (uint16_t)b[1] << 8);
	c->rows = (uint16_t)(b[2] | (uint16_t)b[3] << 8);
}

/* ---- life cycle ---------------------------------------------------------------- */

static void forget(struct vcon *c)
{
	c->in_pos = c->in_len = 0;
	c->rxq = c->txq = NULL;
	c->nrx = c->ntx = 0;
	c->tx_nfree = 0;
}

static void back_off(struct vcon *c, uint64_t now)
{
	bool stable = c->state == VCON_LIVE && now - c->live_since_ns >= STABLE_NS;

	if (stable || c->retry_ms == 0u)
		c->retry_ms = c->cfg.retry_min_ms;
	else if (c->retry_ms < c->cfg.retry_max_ms)
		c->retry_ms = c->retry_ms * 2u > c->cfg.retry_max_ms ? c->cfg.retry_max_ms
								     : c->retry_ms * 2u;
	c->retry_at_ns = now + ms_ns(c->retry_ms);
}

static void detach(struct vcon *c, const char *reason)
{
	uint64_t now = hal_now_ns();

	back_off(c, now);
	vio_leave(&c->vio);
	forget(c);
	c->state = VCON_LEAVING;
	c->left_at_ns = now;
	c->stats.detaches++;
	event(c, "LINK_DOWN", reason);
}

static void recover(struct vcon *c, const char *reason)
{
	uint64_t now = hal_now_ns();

	c->stats.resets++;
	event(c, "LINK_RESET", reason);
	c->in_bringup = true;
	int rc = vio_reset(&c->vio);

	c->in_bringup = false;
	if (rc != VIO_OK) {
		detach(c, vio_strerror(rc));
		return;
	}
	back_off(c, now);
	forget(c);
	c->state = VCON_DOWN;
}

static int bring_up(struct vcon *c, const char **why)
{
	int rc;

	*why = "probe";
	rc = vio_probe(&c->vio);
	if (rc != VIO_OK)
		return rc;
	*why = "features";
	rc = vio_negotiate(&c->vio, (uint64_t)1u << IVV_CONSOLE_F_SIZE);
	if (rc != VIO_OK)
		return rc;
	c->size_valid = (c->vio.features >> IVV_CONSOLE_F_SIZE) & 1u;
	*why = "queues";
	rc = vio_setup_queue(&c->vio, IVV_CONSOLE_RECEIVEQ, IVV_CONSOLE_NUM_QUEUES_PORT0,
			     c->cfg.rxq_size, &c->rxq);
	if (rc == VIO_OK)
		rc = vio_setup_queue(&c->vio, IVV_CONSOLE_TRANSMITQ, IVV_CONSOLE_NUM_QUEUES_PORT0,
				     c->cfg.txq_size, &c->txq);
	if (rc != VIO_OK)
		return rc;
	*why = "buffers";
	c->nrx = c->rxq->vq.size;
	c->ntx = c->txq->vq.size;
	rc = vio_alloc(&c->vio, (uint32_t)c->nrx * VCON_RX_SLOT, &c->rx_base);
	if (rc == VIO_OK)
		rc = vio_alloc(&c->vio, (uint32_t)c->ntx * VCON_TX_SLOT, &c->tx_base);
	if (rc != VIO_OK)
		return rc;
	c->tx_nfree = 0;
	for (uint16_t i = c->ntx; i > 0u; i--) {
		c->tx_free[c->tx_nfree++] = (uint16_t)(i - 1u);
		c->tx_busy[i - 1u] = 0;
	}
	for (uint16_t i = 0; i < c->nrx; i++)
		if (!post_rx(c, i))
			return VIO_E_INVAL;
	*why = "driver ok";
	rc = vio_driver_ok(&c->vio);
	if (rc != VIO_OK)
		return rc;
	if (vq_kick_needed(&c->rxq->vq))
		vio_kick(&c->vio, c->rxq);
	read_size(c);
	return VIO_OK;
}

static void attach(struct vcon *c)
{
	const char *why = "";
	char detail[96];
	int rc;

	c->in_bringup = true;
	rc = bring_up(c, &why);
	c->in_bringup = false;
	if (rc != VIO_OK) {
		forget(c);
		util_snprintf(detail, sizeof(detail), "attach failed at %s: %s", why,
			      vio_strerror(rc));
		if (rc == VIO_E_GONE || rc == VIO_E_TIMEOUT || !c->vio.probed)
			detach(c, detail);
		else
			recover(c, detail);
		return;
	}
	c->state = VCON_LIVE;
	c->live_since_ns = hal_now_ns();
	c->stats.attaches++;
	util_snprintf(detail, sizeof(detail), "features=0x%llx rxq=%u txq=%u size=%ux%u",
		      (unsigned long long)c->vio.features, (unsigned int)c->rxq->vq.size,
		      (unsigned int)c->txq->vq.size, (unsigned int)c->cols, (unsigned int)c->rows);
	event(c, "LINK_UP", detail);
}

/* While waiting for the backend, keep the CAN side going. */
static void vcon_idle(void *ctx)
{
	struct vcon *c = ctx;

	if (c->br != NULL)
		(void)bridge_poll(c->br);
}

static int service(struct vcon *c)
{
	unsigned int ev = vio_check(&c->vio);
	int n = 0;

	if (ev & VIO_EV_LOST) {
		c->vio.stats.backend_lost++;
		detach(c, "backend left READY");
		return 1;
	}
	if (ev & VIO_EV_NEEDS_RESET) {
		recover(c, "device needs reset");
		return 1;
	}
	if (ev & VIO_EV_CONFIG)
		read_size(c);
	n += collect_tx(c);
	n += collect_rx(c);
	const struct virtqueue *bad = c->rxq->vq.broken   ? &c->rxq->vq
				      : c->txq->vq.broken ? &c->txq->vq
							  : NULL;

	if (bad != NULL) {
		char detail[96];

		c->stats.ring_faults++;
		util_snprintf(detail, sizeof(detail), "queue %u: %s (%u)",
			      bad == &c->rxq->vq ? 0u : 1u, vq_fault_name(bad->fault),
			      (unsigned int)bad->fault_value);
		recover(c, detail);
		return n + 1;
	}
	n += fill_tx(c);
	return n;
}

bool vcon_pending(const struct vcon *c)
{
	if (c == NULL)
		return false;
	if (c->log_period_ns != 0u && hal_now_ns() >= c->next_log_ns)
		return true;
	switch (c->state) {
	case VCON_LIVE:
		if (!vio_backend_ready(&c->vio) ||
		    shm_ld8(&c->vio.rw, IVV_HDR_CONFIG_EVENT) != 0u ||
		    (vio_status(&c->vio) & IVV_STATUS_NEEDS_RESET) != 0u ||
		    c->rxq->vq.broken || c->txq->vq.broken)
			return true;
		if (c->in_pos < c->in_len || vq_has_used(&c->rxq->vq) ||
		    vq_has_used(&c->txq->vq))
			return true;
		return logring_pending() > 0u && c->tx_nfree > 0u;
	case VCON_LEAVING:
		return true;
	case VCON_DOWN:
	default:
		return hal_now_ns() >= c->retry_at_ns && vio_backend_ready(&c->vio);
	}
}

int vcon_poll(struct vcon *c)
{
	uint64_t now;
	int n = 0;

	if (c == NULL)
		return 0;
	now = hal_now_ns();
	if (c->log_period_ns != 0u && now >= c->next_log_ns) {
		c->next_log_ns = now + c->log_period_ns;
		cmd_stats(c);
		n++;
	}
	switch (c->state) {
	case VCON_LIVE:
		return n + service(c);
	case VCON_LEAVING:
		if (!vio_backend_ready(&c->vio) || vio_status(&c->vio) == 0u ||
		    now - c->left_at_ns > LEAVE_GRACE_NS)
			c->state = VCON_DOWN;
		return n;
	case VCON_DOWN:
	default:
		if (now < c->retry_at_ns || !vio_backend_ready(&c->vio))
			return n;
		attach(c);
		return n + 1;
	}
}

int vcon_init(struct vcon *c, struct bridge *br, const struct vcan *vcan,
	      const struct ivshmem_link *link, const struct vcon_config *cfg)
{
	int rc;

	if (c == NULL || link == NULL)
		return VIO_E_INVAL;
	util_memset(c, 0, sizeof(*c));
	c->br = br;
	c->vcan = vcan;
	if (cfg != NULL)
		c->cfg = *cfg;
	if (c->cfg.rxq_size == 0u)
		c->cfg.rxq_size = DEF_QSIZE;
	if (c->cfg.txq_size == 0u)
		c->cfg.txq_size = DEF_QSIZE;
	if (c->cfg.retry_min_ms == 0u)
		c->cfg.retry_min_ms = DEF_RETRY_MIN_MS;
	if (c->cfg.retry_max_ms < c->cfg.retry_min_ms)
		c->cfg.retry_max_ms = c->cfg.retry_min_ms > DEF_RETRY_MAX_MS ? c->cfg.retry_min_ms
									     : DEF_RETRY_MAX_MS;
	if (link->protocol != IVV_CONSOLE_PROTOCOL_FRONTEND) {
		hal_log("virtio-console: link protocol 0x%04x is not a virtio-console frontend "
			"(0x%04x)", (unsigned int)link->protocol,
			(unsigned int)IVV_CONSOLE_PROTOCOL_FRONTEND);
		return VIO_E_INVAL;
	}
	rc = vio_init(&c->vio, link, c->cfg.timeout_ns, vcon_idle, c);
	if (rc != VIO_OK)
		return rc;
	c->state = VCON_DOWN;
	ivl_set_state(link, IVV_STATE_RESET);
	ivl_set_int_control(link, true);
	return VIO_OK;
}

void vcon_shutdown(struct vcon *c)
{
	if (c == NULL)
		return;
	if (c->state != VCON_DOWN || c->vio.probed)
		vio_leave(&c->vio);
	forget(c);
	c->state = VCON_DOWN;
}

const char *vcon_state_name(enum vcon_state s)
{
	switch (s) {
	case VCON_DOWN:
		return "down";
	case VCON_LEAVING:
		return "leaving";
	case VCON_LIVE:
		return "live";
	default:
		return "?";
	}
}
