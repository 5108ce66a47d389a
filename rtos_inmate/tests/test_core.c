/* SPDX-License-Identifier: MIT */
/*
 * test_core.c - unit tests of the pure parts: bit timing, fast-reply rules,
 * util formatting.  Prints one line per failure and a closing
 * "N passed, N failed" line; exit status 0 only when nothing failed.
 */
#include <stdio.h>
#include <string.h>

#include "bridge.h"
#include "fastreply.h"
#include "logring.h"
#include "mcp2515.h"
#include "util.h"
#include "virtio_console.h"

static unsigned int passed, failed;

#define CHECK(cond)                                                                      \
	do {                                                                             \
		if (cond) {                                                              \
			passed++;                                                        \
		} else {                                                                 \
			failed++;                                                        \
			printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);           \
		}                                                                        \
	} while (0)

static struct can_msg mk(uint32_t id, uint8_t flags, uint8_t len, const char *hex)
{
	struct can_msg m;

	memset(&m, 0, sizeof(m));
	m.id = id;
	m.flags = flags;
	m.len = len;
	for (size_t i = 0; hex && hex[2 * i] && hex[2 * i + 1] && i < 8; i++)
		m.data[i] = (uint8_t)(util_hexval(hex[2 * i]) << 4 | util_hexval(hex[2 * i + 1]));
	return m;
}

/* ---- bit timing ---- */

struct timing_case {
	uint32_t osc, rate;
	int rc;
	uint8_t cnf1, cnf2, cnf3;
};

static void test_timing(void)
{
	static const struct timing_case cases[] = {
		{ 8000000, 125000, 0, 0x01, 0xB5, 0x01 },
		{ 8000000, 250000, 0, 0x00, 0xB5, 0x01 },
		{ 8000000, 500000, 0, 0x00, 0x91, 0x01 },
		{ 8000000, 1000000, MCP2515_E_TIMING, 0, 0, 0 },
		{ 12000000, 125000, 0, 0x02, 0xB5, 0x01 },
		{ 12000000, 250000, 0, 0x01, 0xA3, 0x01 },
		{ 12000000, 500000, 0, 0x00, 0xA3, 0x01 },
		{ 12000000, 1000000, MCP2515_E_TIMING, 0, 0, 0 }, /* 6 TQ < 8 */
		{ 16000000, 125000, 0, 0x03, 0xB5, 0x01 },
		{ 16000000, 250000, 0, 0x01, 0xB5, 0x01 },
		{ 16000000, 500000, 0, 0x00, 0xB5, 0x01 },
		{ 16000000, 1000000, 0, 0x00, 0x91, 0x01 },
		{ 20000000, 1000000, 0, 0x00, 0x9A, 0x01 },       /* 10 TQ, 80 % */
		{ 10000000, 33333, MCP2515_E_TIMING, 0, 0, 0 },   /* not exact */
		{ 0, 500000, MCP2515_E_INVAL, 0, 0, 0 },
		{ 26000000, 500000, MCP2515_E_INVAL, 0, 0, 0 },
		{ 16000000, 2000000, MCP2515_E_INVAL, 0, 0, 0 },
		{ 16000000, 0, MCP2515_E_INVAL, 0, 0, 0 },
	};

	for (size_t i = 0; i < UTIL_ARRAY_SIZE(cases); i++) {
		const struct timing_case *c = &cases[i];
		struct mcp2515_timing t;
		int rc = mcp2515_calc_timing(c->osc, c->rate, 0, &t);

		CHECK(rc == c->rc);
		if (rc != c->rc)
			printf("  case osc=%u rate=%u rc=%d\n", (unsigned)c->osc, (unsigned)c->rate, rc);
		if (rc == 0 && c->rc == 0) {
			CHECK(t.cnf1 == c->cnf1 && t.cnf2 == c->cnf2 && t.cnf3 == c->cnf3);
			if (!(t.cnf1 == c->cnf1 && t.cnf2 == c->cnf2 && t.cnf3 == c->cnf3))
				printf("  case osc=%u rate=%u got %02x %02x %02x\n", (unsigned)c->osc,
				       (unsigned)c->rate, t.cnf1, t.cnf2, t.cnf3);
			/* invariants */
			CHECK(t.ntq >= 8 && t.ntq <= 25);
			CHECK(t.ntq == 1 + t.prop + t.ps1 + t.ps2);
			CHECK(t.sp_permille >= 750 && t.sp_permille <= 875);
			CHECK((uint64_t)c->osc == 2ull * (t.brp + 1u) * t.ntq * c->rate);
			CHECK(t.prop + t.ps1 >= t.ps2 && t.ps2 > t.sjw);
		}
	}
	/* exhaustive sweep: every accepted combination satisfies the limits */
	for (uint32_t osc = 1000000; osc <= 25000000; osc += 1000000) {
		static const uint32_t rates[] = { 10000, 20000, 50000, 100000, 125000,
						  250000, 500000, 800000, 1000000 };

		for (size_t r = 0; r < UTIL_ARRAY_SIZE(rates); r++) {
			for (uint8_t sjw = 1; sjw <= 4; sjw++) {
				struct mcp2515_timing t;

				if (mcp2515_calc_timing(osc, rates[r], sjw, &t) != 0)
					continue;
				CHECK(t.ntq >= 8 && t.ntq <= 25 && t.brp < 64);
				CHECK(t.prop >= 1 && t.prop <= 8 && t.ps1 >= 1 && t.ps1 <= 8);
				CHECK(t.ps2 >= 2 && t.ps2 <= 8 && t.sjw == sjw && t.ps2 > sjw);
				CHECK(t.sp_permille >= 750 && t.sp_permille <= 875);
				CHECK((uint64_t)osc == 2ull * (t.brp + 1u) * t.ntq * rates[r]);
				CHECK(t.cnf1 == (uint8_t)(((sjw - 1u) << 6) | t.brp));
			}
		}
	}
	struct mcp2515_timing t;

	CHECK(mcp2515_calc_timing(16000000, 500000, 2, &t) == 0 && t.ps2 == 3 && t.cnf1 == 0x40);
	CHECK(mcp2515_calc_timing(16000000, 500000, 5, &t) == MCP2515_E_INVAL);
	CHECK(mcp2515_calc_timing(16000000, 500000, 0, NULL) == MCP2515_E_INVAL);
}

/* ---- rules ---- */

static int n_sent;
static struct can_msg last_sent;
static int send_rc;
static int n_relayed;

static int fake_send(void *ctx, const struct can_msg *m)
{
	(void)ctx;
	if (send_rc != 0)
		return send_rc;
	n_sent++;
	last_sent = *m;
	return 0;
}

static void fake_relay(void *ctx, const struct can_msg *m)
{
	(void)ctx;
	(void)m;
	n_relayed++;
}

static int parse1(const char *s, struct fr_rule *r, size_t *off)
{
	return fr_parse_rule(s, strlen(s), r, off);
}

static void test_rule_parse(void)
{
	struct fr_rule r;
	size_t off = 0;

	CHECK(parse1("7DF:02010D->7E8:03410D$c", &r, &off) == FR_OK);
	CHECK(r.id == 0x7DF && r.id_mask == 0x7FF && r.mflags == 0 && r.npat == 3);
	CHECK(r.pat[0] == 0x02 && r.pat[2] == 0x0D && r.pat_mask[1] == 0xFF);
	CHECK(r.reply_id == 0x7E8 && !r.reply_ext && r.reply_len == 4);
	CHECK(r.tok_kind[3] == FR_TOK_COUNTER && r.tok_val[1] == 0x41);

	CHECK(parse1("18DB33F1x:0201?\??\?->18daf110x:0441$2$3", &r, &off) == FR_OK);
	CHECK(r.mflags == FR_M_EXT && r.id == 0x18DB33F1 && r.id_mask == 0x1FFFFFFF);
	CHECK(r.pat_mask[2] == 0 && r.npat == 4 && r.reply_ext && r.reply_id == 0x18DAF110);
	CHECK(r.tok_kind[2] == FR_TOK_COPY && r.tok_val[2] == 2 && r.tok_val[3] == 3);

	CHECK(parse1("123R->123:DEADBEEF", &r, &off) == FR_OK && (r.mflags & FR_M_RTR));
	CHECK(parse1("123R#4->123:01", &r, &off) == FR_OK && r.len == 4);
	CHECK(parse1("700/780->123", &r, &off) == FR_OK && r.id_mask == 0x780 &&
	      r.reply_len == 0);
	CHECK(parse1("100#2:??55->101:$0", &r, &off) == FR_OK && r.npat == 2);
	CHECK(parse1("100#3->101:$2", &r, &off) == FR_OK); /* exact length covers $2 */
	CHECK(parse1("100:?5->101:$0", &r, &off) == FR_OK && r.pat_mask[0] == 0x0F);

	struct fr_rule a, b;

	CHECK(parse1("7DF:02.01.0D->7E8:03.41.0D.$c", &a, &off) == FR_OK);
	CHECK(parse1("7df:02010d->7e8:03410d$C", &b, &off) == FR_OK);
	CHECK(memcmp(&a, &b, sizeof(a)) == 0);

	/* errors, with the offset of the problem */
	CHECK(parse1("7DF->", &r, &off) == FR_E_SYNTAX && off == 5);
	CHECK(parse1("800->7E8", &r, &off) == FR_E_RANGE && off == 0);
	CHECK(parse1("18DAF110->7E8", &r, &off) == FR_E_RANGE);
	CHECK(parse1("7DF->7E8:$3", &r, &off) == FR_E_COPY);
	CHECK(parse1("7DF:0201->7E8:$2", &r, &off) == FR_E_COPY);
	CHECK(parse1("7DF:0201->7E8:$1$8", &r, &off) == FR_E_SYNTAX);
	CHECK(parse1("7DF:010203040506070809->7E8", &r, &off) == FR_E_RANGE);
	CHECK(parse1("7DF->7E8:010203040506070809", &r, &off) == FR_E_RANGE);
	CHECK(parse1("123R:01->123", &r, &off) == FR_E_SYNTAX);
	CHECK(parse1("123R->123:$0", &r, &off) == FR_E_COPY);
	CHECK(parse1("7DF#9->7E8", &r, &off) == FR_E_RANGE);
	CHECK(parse1("7DF#2:010203->7E8", &r, &off) == FR_E_RANGE);
	CHECK(parse1("7DF/800->7E8", &r, &off) == FR_E_RANGE && off == 4);
	CHECK(parse1("7DF:0G->7E8", &r, &off) == FR_E_SYNTAX && off == 5);
	CHECK(parse1("7DF->7E8:01 ", &r, &off) == FR_E_SYNTAX && off == 11);
	CHECK(parse1("7DF->7E8:0", &r, &off) == FR_E_SYNTAX);
	CHECK(parse1("7DF:->7E8", &r, &off) == FR_E_SYNTAX);
	CHECK(parse1("7DF:01.->7E8", &r, &off) == FR_E_SYNTAX);
	CHECK(parse1("123456789x->1", &r, &off) == FR_E_RANGE);
	CHECK(parse1("20000000x->1", &r, &off) == FR_E_RANGE);
	CHECK(parse1("", &r, &off) == FR_E_SYNTAX);
	CHECK(parse1("7DF>7E8", &r, &off) == FR_E_SYNTAX);
	CHECK(fr_parse_rule(NULL, 3, &r, &off) == FR_E_INVAL);
	/* length-bounded: text past len is not read */
	CHECK(fr_parse_rule("7DF->7E8:01XYZ", 11, &r, &off) == FR_OK && r.reply_len == 1);
}

static void test_rule_table(void)
{
	struct fr_table t;
	size_t off = 0;

	fr_table_init(&t);
	CHECK(fr_table_parse(&t, ";7DF:02010D->7E8:03410D$c;;123R->123:AA;", 100, &off) == FR_OK);
	CHECK(t.count == 2);
	/* all or nothing */
	CHECK(fr_table_parse(&t, "100->101;1->", 100, &off) == FR_E_SYNTAX && off == 12);
	CHECK(t.count == 2);

	char many[16 * 12 + 1];
	size_t p = 0;

	for (int i = 0; i < 15; i++)
		p += (size_t)snprintf(&many[p], sizeof(many) - p, "%X->1;", 0x100 + i);
	CHECK(fr_table_parse(&t, many, sizeof(many), &off) == FR_E_TOO_MANY);
	CHECK(t.count == 2);
	p = 0;
	for (int i = 0; i < 14; i++)
		p += (size_t)snprintf(&many[p], sizeof(many) - p, "%X->1;", 0x100 + i);
	CHECK(fr_table_parse(&t, many, sizeof(many), &off) == FR_OK && t.count == FR_MAX_RULES);
	struct fr_rule r;

	CHECK(parse1("1->2", &r, &off) == FR_OK && fr_table_add(&t, &r) == FR_E_TOO_MANY);
}

static void test_dispatch(void)
{
	struct fr_table t;
	size_t off;
	struct can_msg m;

	fr_table_init(&t);
	CHECK(fr_table_parse(&t,
			     "7DF:02010D->7E8:03410D$c;"
			     "18DB33F1x:0201?\??\?->18DAF110x:0441$2$3;"
			     "123R->123:DEADBEEF;"
			     "700/780#2:??55->701:$0$1;"
			     "100:?5->101:$0",
			     400, &off) == FR_OK);
	CHECK(t.count == 5);

	n_sent = n_relayed = 0;
	send_rc = 0;
	m = mk(0x7DF, 0, 8, "02010D5555555555");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	CHECK(last_sent.id == 0x7E8 && last_sent.len == 4 && last_sent.flags == 0);
	CHECK(last_sent.data[0] == 0x03 && last_sent.data[2] == 0x0D && last_sent.data[3] == 0);
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	CHECK(last_sent.data[3] == 1);
	CHECK(t.rule[0].matched == 2 && t.rule[0].replied == 2 && t.rule[0].counter == 2);

	/* same id, other PID: relayed */
	m = mk(0x7DF, 0, 8, "02010C0000000000");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_RELAYED);
	/* too short for the pattern */
	m = mk(0x7DF, 0, 2, "0201");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_RELAYED);
	/* extended frame with a standard-looking id does not match a standard rule */
	m = mk(0x7DF, CAN_MSG_F_EXT, 8, "02010D0000000000");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_RELAYED);
	CHECK(n_relayed == 3 && t.relayed == 3);

	m = mk(0x18DB33F1, CAN_MSG_F_EXT, 8, "0201A5B600000000");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	CHECK(last_sent.flags == CAN_MSG_F_EXT && last_sent.id == 0x18DAF110);
	CHECK(last_sent.len == 4 && last_sent.data[2] == 0xA5 && last_sent.data[3] == 0xB6);

	m = mk(0x123, CAN_MSG_F_RTR, 4, NULL);
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	CHECK(last_sent.id == 0x123 && last_sent.flags == 0 && last_sent.data[0] == 0xDE);
	m = mk(0x123, 0, 0, NULL); /* data frame: the RTR rule does not match */
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_RELAYED);

	m = mk(0x77F, 0, 2, "AA55");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	CHECK(last_sent.id == 0x701 && last_sent.data[0] == 0xAA && last_sent.data[1] == 0x55);
	m = mk(0x77F, 0, 3, "AA5500"); /* exact length 2 */
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_RELAYED);
	m = mk(0x780, 0, 2, "AA55"); /* outside the mask */
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_RELAYED);

	m = mk(0x100, 0, 1, "35");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	m = mk(0x100, 0, 1, "36");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_RELAYED);

	/* a refused send: counted, counter unchanged, not relayed */
	int relayed_before = n_relayed;

	send_rc = -1;
	m = mk(0x7DF, 0, 8, "02010D0000000000");
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLY_FAILED);
	CHECK(t.reply_failed == 1 && t.rule[0].counter == 2 && n_relayed == relayed_before);
	send_rc = 0;

	/* counter wraps */
	t.rule[0].counter = 0xFF;
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	CHECK(last_sent.data[3] == 0xFF && t.rule[0].counter == 0);
	CHECK(t.rx_seen == 15);
}

static void test_format_roundtrip(void)
{
	static const char *rules[] = {
		"7DF:02010D->7E8:03410D$c",
		"18DB33F1x:0201?\??\?->18DAF110x:0441$2$3",
		"123R#4->123:DEADBEEF",
		"700/780#2:??55->701:$0$1",
		"100:?5.A?->101",
		"1FFFFFFFx/1FFFFFFFx->0x",
	};

	for (size_t i = 0; i < UTIL_ARRAY_SIZE(rules); i++) {
		struct fr_rule a, b;
		char text[FR_MAX_TEXT];
		size_t off = 0;
		int rc = parse1(rules[i], &a, &off);

		if (i == 5) {
			/* a mask takes no 'x' suffix */
			CHECK(rc == FR_E_SYNTAX);
			continue;
		}
		CHECK(rc == FR_OK);
		CHECK(fr_format_rule(&a, text, sizeof(text)) > 0);
		CHECK(parse1(text, &b, &off) == FR_OK);
		CHECK(memcmp(&a, &b, sizeof(a)) == 0);
	}
	struct fr_rule r;
	char tiny[8];
	size_t off;

	CHECK(parse1("7DF:02010D->7E8:03410D$c", &r, &off) == FR_OK);
	CHECK(fr_format_rule(&r, tiny, sizeof(tiny)) == FR_E_RANGE);
	CHECK(strlen(tiny) == sizeof(tiny) - 1);
}

/* the examples of README.md section 4 and of fastreply.h */
static void test_documented_examples(void)
{
	static const char *docs[] = {
		"7DF:02010D->7E8:03410D$c",
		"7DF:02010D->7E8:03410D$cAAAAAAAA",
		"7DF/7F0:02.01.?\?->7E8:06.41.$2.00.00.00.00",
		"18DB33F1x:0201?\??\?->18DAF110x:0441$2$3",
		"123R->123:DEADBEEF",
		"100#2:?\?55->101:$0",
	};
	struct fr_table t;
	size_t off;

	fr_table_init(&t);
	for (size_t i = 0; i < UTIL_ARRAY_SIZE(docs); i++) {
		struct fr_rule r;

		CHECK(parse1(docs[i], &r, &off) == FR_OK);
		CHECK(fr_table_add(&t, &r) == FR_OK);
	}
	struct can_msg m = mk(0x7D5, 0, 3, "02010C");

	send_rc = 0;
	CHECK(fr_dispatch(&t, &m, fake_send, NULL, fake_relay, NULL) == FR_REPLIED);
	CHECK(last_sent.id == 0x7E8 && last_sent.len == 7 && last_sent.data[2] == 0x0C);
}

static void test_util(void)
{
	char buf[64];

	CHECK(util_snprintf(buf, sizeof(buf), "%05u|%x|%X|%-4d|%d", 42u, 255u, 171u, -12, 0) ==
	      (int)strlen("00042|ff|AB|-12 |0"));
	CHECK(strcmp(buf, "00042|ff|AB|-12 |0") == 0);
	CHECK(util_snprintf(buf, 8, "%05u|%x", 42u, 255u) == 8 && strcmp(buf, "00042|f") == 0);
	CHECK(util_snprintf(buf, sizeof(buf), "%lld", (long long)(-9223372036854775807LL - 1)) ==
	      20);
	CHECK(strcmp(buf, "-9223372036854775808") == 0);
	CHECK(util_snprintf(buf, sizeof(buf), "%llu %zu %s %c %%", 18446744073709551615ull,
			    (size_t)7, "ok", 'z') > 0);
	CHECK(strcmp(buf, "18446744073709551615 7 ok z %") == 0);
	CHECK(util_snprintf(buf, sizeof(buf), "%03d %5s|%-3s|", -5, "ab", "c") > 0);
	CHECK(strcmp(buf, "-05    ab|c  |") == 0);
	CHECK(util_snprintf(buf, 0, "abc") == 3);
	CHECK(util_hexval('f') == 15 && util_hexval('G') == -1 && util_hexval('0') == 0);
	uint8_t a[4] = { 1, 2, 3, 4 }, b[4];

	util_memset(b, 0xEE, sizeof(b));
	CHECK(b[3] == 0xEE);
	util_memcpy(b, a, sizeof(a));
	CHECK(util_memcmp(a, b, 4) == 0);
	b[2] = 9;
	CHECK(util_memcmp(a, b, 4) < 0 && util_memcmp(b, a, 4) > 0);
	CHECK(util_strnlen("hello", 3) == 3 && util_strnlen("hi", 10) == 2);
}

static void test_msg_valid(void)
{
	struct can_msg m = mk(0x7FF, 0, 8, NULL);

	CHECK(can_msg_valid(&m));
	m.id = 0x800;
	CHECK(!can_msg_valid(&m));
	m.flags = CAN_MSG_F_EXT;
	CHECK(can_msg_valid(&m));
	m.id = 0x20000000;
	CHECK(!can_msg_valid(&m));
	m = mk(1, 0x04, 0, NULL);
	CHECK(!can_msg_valid(&m));
	m = mk(1, 0, 9, NULL);
	CHECK(!can_msg_valid(&m));
}


/* ---- virtio-console: line editor and commands (no link) ---- */

/* Feed text to the editor; the echo bytes are appended to echo_out. */
static enum vcon_ed_result edit_all(struct vcon_editor *ed, const char *in, size_t n,
				    char *echo_out, size_t size)
{
	enum vcon_ed_result last = VCON_ED_NONE;
	size_t at = strlen(echo_out);

	for (size_t i = 0; i < n; i++) {
		char e[4];
		size_t elen;
		enum vcon_ed_result r = vcon_edit(ed, (uint8_t)in[i], e, &elen);

		if (r != VCON_ED_NONE)
			last = r;
		for (size_t k = 0; k < elen && at + 1 < size; k++)
			echo_out[at++] = e[k];
		echo_out[at] = '\0';
	}
	return last;
}

/* Everything in the log ring, as a string. */
static const char *ring_text(void)
{
	static char buf[LOGRING_SIZE + 1];
	size_t n = logring_take(buf, LOGRING_SIZE);

	buf[n] = '\0';
	return buf;
}

static void test_console_editor(void)
{
	struct vcon_editor ed;
	char echo[512];

	memset(&ed, 0, sizeof(ed));
	echo[0] = '\0';
	CHECK(edit_all(&ed, "stats\r", 6, echo, sizeof(echo)) == VCON_ED_LINE);
	CHECK(strcmp(ed.line, "stats") == 0 && strcmp(echo, "stats\r\n") == 0);
	/* the LF of a CRLF is not a second (empty) line */
	echo[0] = '\0';
	CHECK(edit_all(&ed, "\n", 1, echo, sizeof(echo)) == VCON_ED_NONE && echo[0] == '\0');
	/* backspace and DEL erase, with "\b \b"; nothing to erase: no echo */
	echo[0] = '\0';
	CHECK(edit_all(&ed, "\x7fruley\bs\x7fs\n", 11, echo, sizeof(echo)) == VCON_ED_LINE);
	CHECK(strcmp(ed.line, "rules") == 0);
	CHECK(strcmp(echo, "ruley\b \bs\b \bs\r\n") == 0);
	/* ^U drops the line; control bytes and non-ASCII are ignored */
	echo[0] = '\0';
	CHECK(edit_all(&ed, "xx\x15he\x1b\x80\xff" "lp\r", 11, echo, sizeof(echo)) == VCON_ED_LINE);
	CHECK(strcmp(ed.line, "help") == 0 && strcmp(echo, "xx^U\r\nhelp\r\n") == 0);
	/* a line of exactly VCON_LINE_MAX characters is taken, one more is refused whole */
	char long_line[VCON_LINE_MAX + 2];

	memset(long_line, 'a', sizeof(long_line));
	long_line[VCON_LINE_MAX] = '\n';
	echo[0] = '\0';
	CHECK(edit_all(&ed, long_line, VCON_LINE_MAX + 1u, echo, sizeof(echo)) == VCON_ED_LINE);
	CHECK(strlen(ed.line) == VCON_LINE_MAX);
	long_line[VCON_LINE_MAX] = 'a';
	long_line[VCON_LINE_MAX + 1] = '\n';
	echo[0] = '\0';
	CHECK(edit_all(&ed, long_line, VCON_LINE_MAX + 2u, echo, sizeof(echo)) ==
	      VCON_ED_OVERLONG);
	CHECK(strlen(echo) == VCON_LINE_MAX + 2u); /* the echo stops at the limit, then CRLF */
	/* and the editor is usable again at once */
	echo[0] = '\0';
	CHECK(edit_all(&ed, "rules\r", 6, echo, sizeof(echo)) == VCON_ED_LINE &&
	      strcmp(ed.line, "rules") == 0);
}

static void test_console_commands(void)
{
	static struct bridge br;
	static struct vcon c;
	size_t err_off = 0;

	memset(&br, 0, sizeof(br));
	memset(&c, 0, sizeof(c));
	fr_table_init(&br.rules);
	CHECK(fr_table_parse(&br.rules, "100:11->101:22$0;7DF:02010D->7E8:03410D$c", 42,
			     &err_off) == FR_OK);
	br.rules.rule[0].matched = 5;
	br.rules.rule[0].replied = 4;
	br.can.stats.tx_timeouts = 7;
	c.br = &br;
	logring_reset();

	const char *in = "rules\r\n";

	vcon_feed(&c, (const uint8_t *)in, strlen(in));
	CHECK(strcmp(ring_text(), "rules\r\nrules: 2\n  0: 100:11->101:22$0 matched=5 "
				  "replied=4\n  1: 7DF:02010D->7E8:03410D$c matched=0 "
				  "replied=0\n") == 0);
	in = "stats\n";
	vcon_feed(&c, (const uint8_t *)in, strlen(in));
	const char *t = ring_text();

	CHECK(strstr(t, " tx_timeouts=7 ") != NULL);
	CHECK(strstr(t, "rules: count=2 seen=0 matched=5 replied=4 ") != NULL);
	CHECK(strstr(t, "console: link=down ") != NULL && strstr(t, "virtio-can:") == NULL);
	/* unknown: one line, the word quoted and cut at 16 characters */
	in = "  frobnicate_everything_now please\r";
	vcon_feed(&c, (const uint8_t *)in, strlen(in));
	t = ring_text();
	CHECK(strcmp(t, "  frobnicate_everything_now please\r\n"
			"error: unknown command 'frobnicate_every' (try help)\n") == 0);
	CHECK(c.stats.unknown == 1u);
	/* an empty line runs nothing and answers nothing */
	in = "   \r";
	vcon_feed(&c, (const uint8_t *)in, strlen(in));
	CHECK(strcmp(ring_text(), "   \r\n") == 0 && c.stats.lines == 3u);
	/* log on/off and bad arguments */
	in = "log on 0\rlog on 5\rlog off\rlog maybe\r";
	vcon_feed(&c, (const uint8_t *)in, strlen(in));
	t = ring_text();
	CHECK(strstr(t, "error: SECONDS must be 1..86400\n") != NULL);
	CHECK(strstr(t, "log: stats every 5 s\n") != NULL);
	CHECK(strstr(t, "log: stats off\n") != NULL && c.log_period_ns == 0u);
	CHECK(strstr(t, "error: log on [SECONDS] | log off\n") != NULL);
	/* a full ring: lines are dropped and counted, echo too, nothing blocks */
	logring_reset();
	for (unsigned int i = 0; i < 64u; i++) {
		in = "stats\r";
		vcon_feed(&c, (const uint8_t *)in, strlen(in));
	}
	CHECK(logring_get_stats()->dropped > 0u && logring_get_stats()->raw_dropped > 0u);
	CHECK(logring_pending() <= LOGRING_SIZE);
	logring_reset();
}

int main(void)
{
	test_timing();
	test_rule_parse();
	test_rule_table();
	test_dispatch();
	test_format_roundtrip();
	test_documented_examples();
	test_util();
	test_msg_valid();
	test_console_editor();
	test_console_commands();
	printf("%u passed, %u failed\n", passed, failed);
	return failed == 0 ? 0 : 1;
}
