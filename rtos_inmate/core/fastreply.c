/* SPDX-License-Identifier: MIT */
/* fastreply.c - rule table, parser and dispatch; see fastreply.h. */
#include "fastreply.h"

#include "util.h"

/* ------------------------------------------------------------------ */
/* Parser: a bounded cursor over text[0..len)                            */

struct cur {
	const char *s;
	size_t len;
	size_t pos;
};

static int peek(const struct cur *c)
{
	return c->pos < c->len ? (unsigned char)c->s[c->pos] : -1;
}

static bool accept(struct cur *c, char ch)
{
	if (peek(c) == (unsigned char)ch) {
		c->pos++;
		return true;
	}
	return false;
}

/* 1..8 hex digits; FR_E_SYNTAX when none. */
static int parse_hex(struct cur *c, uint32_t *val, unsigned int *ndigits)
{
	uint32_t v = 0;
	unsigned int n = 0;

	for (;;) {
		int ch = peek(c);
		int h = ch < 0 ? -1 : util_hexval((char)ch);

		if (h < 0)
			break;
		if (n == 8)
			return FR_E_RANGE;
		v = (v << 4) | (uint32_t)h;
		n++;
		c->pos++;
	}
	if (n == 0)
		return FR_E_SYNTAX;
	*val = v;
	*ndigits = n;
	return FR_OK;
}

/* id [x]: 1..3 digits standard, 1..8 digits + 'x' extended */
static int parse_id(struct cur *c, uint32_t *id, bool *ext)
{
	unsigned int nd;
	size_t start = c->pos;
	int rc = parse_hex(c, id, &nd);

	if (rc != FR_OK)
		return rc;
	*ext = accept(c, 'x');
	if (*ext) {
		if (*id > CAN_MSG_EXT_MAX) {
			c->pos = start;
			return FR_E_RANGE;
		}
	} else if (nd > 3 || *id > CAN_MSG_STD_MAX) {
		c->pos = start;
		return FR_E_RANGE;
	}
	return FR_OK;
}

static bool at_token_end(const struct cur *c)
{
	int ch = peek(c);

	return ch < 0 || ch == ';' || ch == '-';
}

/* pattern tokens: HH ?H H? ?? */
static int parse_pattern(struct cur *c, struct fr_rule *r)
{
	while (!at_token_end(c)) {
		if (r->npat > 0)
			(void)accept(c, '.');
		if (r->npat >= CAN_MSG_MAX_LEN)
			return FR_E_RANGE;
		uint8_t val = 0, mask = 0;

		for (int nib = 0; nib < 2; nib++) {
			int ch = peek(c);
			int h = ch < 0 ? -1 : util_hexval((char)ch);

			val = (uint8_t)(val << 4);
			mask = (uint8_t)(mask << 4);
			if (ch == '?') {
				/* wildcard nibble */
			} else if (h >= 0) {
				val = (uint8_t)(val | (uint8_t)h);
				mask = (uint8_t)(mask | 0x0Fu);
			} else {
				return FR_E_SYNTAX;
			}
			c->pos++;
		}
		r->pat[r->npat] = val;
		r->pat_mask[r->npat] = mask;
		r->npat++;
	}
	return r->npat > 0 ? FR_OK : FR_E_SYNTAX;
}

/* template tokens: HH $0..$7 $c */
static int parse_template(struct cur *c, struct fr_rule *r)
{
	while (!at_token_end(c)) {
		if (r->reply_len > 0)
			(void)accept(c, '.');
		if (r->reply_len >= CAN_MSG_MAX_LEN)
			return FR_E_RANGE;
		uint8_t i = r->reply_len;

		if (accept(c, '$')) {
			int ch = peek(c);

			if (ch == 'c' || ch == 'C') {
				r->tok_kind[i] = FR_TOK_COUNTER;
				r->tok_val[i] = 0;
			} else if (ch >= '0' && ch <= '7') {
				r->tok_kind[i] = FR_TOK_COPY;
				r->tok_val[i] = (uint8_t)(ch - '0');
			} else {
				return FR_E_SYNTAX;
			}
			c->pos++;
		} else {
			int hi = peek(c) < 0 ? -1 : util_hexval(c->s[c->pos]);

			if (hi < 0)
				return FR_E_SYNTAX;
			c->pos++;
			int lo = peek(c) < 0 ? -1 : util_hexval(c->s[c->pos]);

			if (lo < 0)
				return FR_E_SYNTAX;
			c->pos++;
			r->tok_kind[i] = FR_TOK_CONST;
			r->tok_val[i] = (uint8_t)((hi << 4) | lo);
		}
		r->reply_len++;
	}
	return r->reply_len > 0 ? FR_OK : FR_E_SYNTAX;
}

static int parse_rule_cur(struct cur *c, struct fr_rule *r)
{
	bool ext;
	int rc;

	util_memset(r, 0, sizeof(*r));

	/* match */
	rc = parse_id(c, &r->id, &ext);
	if (rc != FR_OK)
		return rc;
	uint32_t full = ext ? CAN_MSG_EXT_MAX : CAN_MSG_STD_MAX;

	r->id_mask = full;
	if (ext)
		r->mflags |= FR_M_EXT;
	if (accept(c, '/')) {
		unsigned int nd;
		size_t at = c->pos;

		rc = parse_hex(c, &r->id_mask, &nd);
		if (rc != FR_OK)
			return rc;
		if (r->id_mask > full) {
			c->pos = at;
			return FR_E_RANGE;
		}
	}
	r->id &= r->id_mask;
	if (accept(c, 'R'))
		r->mflags |= FR_M_RTR;
	if (accept(c, '#')) {
		int ch = peek(c);

		if (ch < '0' || ch > '9')
			return FR_E_SYNTAX;
		if (ch > '8')
			return FR_E_RANGE;
		r->len = (uint8_t)(ch - '0');
		r->mflags |= FR_M_EXACT_LEN;
		c->pos++;
	}
	if (accept(c, ':')) {
		if (r->mflags & FR_M_RTR)
			return FR_E_SYNTAX; /* remote frames carry no data */
		rc = parse_pattern(c, r);
		if (rc != FR_OK)
			return rc;
		if ((r->mflags & FR_M_EXACT_LEN) && r->npat > r->len)
			return FR_E_RANGE;
	}

	/* "->" */
	if (!accept(c, '-') || !accept(c, '>'))
		return FR_E_SYNTAX;

	/* reply */
	rc = parse_id(c, &r->reply_id, &ext);
	if (rc != FR_OK)
		return rc;
	r->reply_ext = ext ? 1u : 0u;
	if (accept(c, ':')) {
		rc = parse_template(c, r);
		if (rc != FR_OK)
			return rc;
	}

	/* every copied byte must exist in any request this rule matches */
	uint8_t guaranteed = (r->mflags & FR_M_RTR) ? 0u
			     : (r->mflags & FR_M_EXACT_LEN) ? r->len
							      : r->npat;

	for (uint8_t i = 0; i < r->reply_len; i++) {
		if (r->tok_kind[i] == FR_TOK_COPY && r->tok_val[i] >= guaranteed)
			return FR_E_COPY;
	}
	return FR_OK;
}

int fr_parse_rule(const char *text, size_t len, struct fr_rule *out, size_t *err_off)
{
	struct cur c = { text, 0, 0 };
	int rc;

	if (text == NULL || out == NULL)
		return FR_E_INVAL;
	c.len = util_strnlen(text, len);
	rc = parse_rule_cur(&c, out);
	if (rc == FR_OK && c.pos != c.len)
		rc = FR_E_SYNTAX; /* trailing garbage */
	if (rc != FR_OK && err_off != NULL)
		*err_off = c.pos;
	return rc;
}

void fr_table_init(struct fr_table *t)
{
	if (t != NULL)
		util_memset(t, 0, sizeof(*t));
}

int fr_table_add(struct fr_table *t, const struct fr_rule *r)
{
	if (t == NULL || r == NULL)
		return FR_E_INVAL;
	if (t->count >= FR_MAX_RULES)
		return FR_E_TOO_MANY;
	t->rule[t->count++] = *r;
	return FR_OK;
}

int fr_table_parse(struct fr_table *t, const char *text, size_t len, size_t *err_off)
{
	struct fr_rule parsed[FR_MAX_RULES];
	uint32_t n = 0;
	size_t end, pos = 0;

	if (t == NULL || text == NULL)
		return FR_E_INVAL;
	end = util_strnlen(text, len);
	while (pos < end) {
		size_t stop = pos;

		while (stop < end && text[stop] != ';')
			stop++;
		if (stop > pos) {
			size_t off = 0;
			int rc;

			if (t->count + n >= FR_MAX_RULES) {
				rc = FR_E_TOO_MANY;
			} else {
				rc = fr_parse_rule(&text[pos], stop - pos, &parsed[n], &off);
			}
			if (rc != FR_OK) {
				if (err_off != NULL)
					*err_off = pos + off;
				return rc;
			}
			n++;
		}
		pos = stop + 1;
	}
	for (uint32_t i = 0; i < n; i++)
		t->rule[t->count++] = parsed[i];
	return FR_OK;
}

/* ------------------------------------------------------------------ */
/* Matching and replies                                                  */

static bool rule_matches(const struct fr_rule *r, const struct can_msg *m)
{
	bool ext = (m->flags & CAN_MSG_F_EXT) != 0u;
	bool rtr = (m->flags & CAN_MSG_F_RTR) != 0u;

	if (ext != ((r->mflags & FR_M_EXT) != 0u) || rtr != ((r->mflags & FR_M_RTR) != 0u))
		return false;
	if ((m->id & r->id_mask) != r->id)
		return false;
	if ((r->mflags & FR_M_EXACT_LEN) && m->len != r->len)
		return false;
	if (m->len < r->npat)
		return false;
	for (uint8_t i = 0; i < r->npat; i++) {
		if ((m->data[i] & r->pat_mask[i]) != r->pat[i])
			return false;
	}
	return true;
}

struct fr_rule *fr_match(struct fr_table *t, const struct can_msg *m)
{
	if (t == NULL || m == NULL)
		return NULL;
	for (uint32_t i = 0; i < t->count && i < FR_MAX_RULES; i++) {
		if (rule_matches(&t->rule[i], m))
			return &t->rule[i];
	}
	return NULL;
}

void fr_build_reply(const struct fr_rule *r, const struct can_msg *req, struct can_msg *out)
{
	util_memset(out, 0, sizeof(*out));
	out->id = r->reply_id;
	out->flags = r->reply_ext ? CAN_MSG_F_EXT : 0u;
	out->len = r->reply_len <= CAN_MSG_MAX_LEN ? r->reply_len : CAN_MSG_MAX_LEN;
	for (uint8_t i = 0; i < out->len; i++) {
		switch (r->tok_kind[i]) {
		case FR_TOK_COPY: {
			uint8_t j = r->tok_val[i];
			/* the parser guarantees j < req->len; stay safe anyway */
			out->data[i] = (j < req->len && j < CAN_MSG_MAX_LEN) ? req->data[j] : 0u;
			break;
		}
		case FR_TOK_COUNTER:
			out->data[i] = r->counter;
			break;
		case FR_TOK_CONST:
		default:
			out->data[i] = r->tok_val[i];
			break;
		}
	}
}

enum fr_action fr_dispatch(struct fr_table *t, const struct can_msg *m, fr_send_fn send,
			   void *send_ctx, fr_relay_fn relay, void *relay_ctx)
{
	struct fr_rule *r;
	struct can_msg reply;

	if (t == NULL || m == NULL)
		return FR_RELAYED;
	t->rx_seen++;
	r = fr_match(t, m);
	if (r == NULL) {
		t->relayed++;
		if (relay != NULL)
			relay(relay_ctx, m);
		return FR_RELAYED;
	}
	r->matched++;
	fr_build_reply(r, m, &reply);
	if (send == NULL || send(send_ctx, &reply) != 0) {
		t->reply_failed++;
		return FR_REPLY_FAILED;
	}
	r->replied++;
	r->counter = (uint8_t)(r->counter + 1u);
	return FR_REPLIED;
}

/* ------------------------------------------------------------------ */
/* Formatting                                                           */

static size_t put_id(char *buf, size_t size, uint32_t id, bool ext)
{
	return (size_t)(ext ? util_snprintf(buf, size, "%Xx", (unsigned int)id)
			    : util_snprintf(buf, size, "%X", (unsigned int)id));
}

int fr_format_rule(const struct fr_rule *r, char *buf, size_t size)
{
	size_t p = 0;

	if (r == NULL || buf == NULL || size == 0)
		return FR_E_INVAL;
#define REST (p < size ? size - p : 0u)
#define AT (p < size ? &buf[p] : &buf[size - 1])
	bool ext = (r->mflags & FR_M_EXT) != 0u;

	p += put_id(AT, REST, r->id, ext);
	if (r->id_mask != (ext ? CAN_MSG_EXT_MAX : CAN_MSG_STD_MAX))
		p += (size_t)util_snprintf(AT, REST, "/%X", (unsigned int)r->id_mask);
	if (r->mflags & FR_M_RTR)
		p += (size_t)util_snprintf(AT, REST, "R");
	if (r->mflags & FR_M_EXACT_LEN)
		p += (size_t)util_snprintf(AT, REST, "#%u", (unsigned int)r->len);
	if (r->npat > 0) {
		p += (size_t)util_snprintf(AT, REST, ":");
		for (uint8_t i = 0; i < r->npat && i < CAN_MSG_MAX_LEN; i++) {
			char hx[3];
			const char *digits = "0123456789ABCDEF";

			hx[0] = (r->pat_mask[i] & 0xF0u) ? digits[r->pat[i] >> 4] : '?';
			hx[1] = (r->pat_mask[i] & 0x0Fu) ? digits[r->pat[i] & 0x0Fu] : '?';
			hx[2] = '\0';
			p += (size_t)util_snprintf(AT, REST, "%s", hx);
		}
	}
	p += (size_t)util_snprintf(AT, REST, "->");
	p += put_id(AT, REST, r->reply_id, r->reply_ext != 0u);
	if (r->reply_len > 0) {
		p += (size_t)util_snprintf(AT, REST, ":");
		for (uint8_t i = 0; i < r->reply_len && i < CAN_MSG_MAX_LEN; i++) {
			if (r->tok_kind[i] == FR_TOK_COPY)
				p += (size_t)util_snprintf(AT, REST, "$%u", (unsigned int)r->tok_val[i]);
			else if (r->tok_kind[i] == FR_TOK_COUNTER)
				p += (size_t)util_snprintf(AT, REST, "$c");
			else
				p += (size_t)util_snprintf(AT, REST, "%02X", (unsigned int)r->tok_val[i]);
		}
	}
#undef REST
#undef AT
	return p < size ? (int)p : FR_E_RANGE;
}

const char *fr_strerror(int rc)
{
	switch (rc) {
	case FR_OK:
		return "ok";
	case FR_E_SYNTAX:
		return "syntax error";
	case FR_E_RANGE:
		return "value out of range";
	case FR_E_COPY:
		return "$i copies a byte the match does not guarantee";
	case FR_E_TOO_MANY:
		return "too many rules";
	case FR_E_INVAL:
		return "invalid argument";
	default:
		return "unknown error";
	}
}
