/* SPDX-License-Identifier: MIT */
/*
 * fastreply.h - the fast-reply rule table: pure, freestanding, no I/O.
 *
 * Sits between the CAN RX path and the relay: a received frame that matches
 * a rule is answered at once through a send callback; any other frame goes
 * to the relay callback (virtio-can to Linux).  First matching rule wins.
 *
 * Rule text (one rule; several are joined with ';'), no spaces anywhere so
 * it survives the Jailhouse command line:
 *
 *   rule     = match "->" reply
 *   match    = id [ "/" mask ] [ "R" ] [ "#" len ] [ ":" pattern ]
 *   reply    = id [ ":" template ]
 *   id       = 1..3 hex digits               standard id, <= 7FF
 *            | 1..8 hex digits "x"           extended id, <= 1FFFFFFF
 *   mask     = hex, same width as the id     default: all id bits
 *   R        = match remote frames (RTR); without it only data frames match
 *   len      = 0..8, exact length (DLC for RTR) required
 *   pattern  = up to 8 byte tokens, optionally separated by '.':
 *              HH  exact byte    ?H / H?  one nibble wildcard    ??  any byte
 *              A pattern of k tokens needs a request of at least k bytes.
 *   template = up to 8 reply byte tokens, optionally separated by '.':
 *              HH  constant   $0..$7  copy of that request byte
 *              $c  the rule's counter (starts at 0, +1 after each reply)
 *
 * A copy $i is accepted only when the match guarantees byte i exists
 * (i < pattern length, or i < len with '#').  Reply length = token count.
 *
 * Examples:
 *   7DF:02010D->7E8:03410D$c           OBD-II speed request, counter as speed
 *   7DF/7F0:02.01.??->7E8:06.41.$2.00.00.00.00   any id 7D0..7DF, echo PID
 *   18DB33F1x:0201????->18DAF110x:0441$2$3
 *   123R->123:DEADBEEF                 answer a remote request for 0x123
 *   100#2:??55->101:$0                 2-byte request ending in 55
 */
#ifndef RTOS_INMATE_FASTREPLY_H
#define RTOS_INMATE_FASTREPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "can_msg.h"

#define FR_MAX_RULES 16u
#define FR_MAX_TEXT 96u /* longest rule text fr_format_rule produces */

/* match flags */
#define FR_M_EXT 0x01u
#define FR_M_RTR 0x02u
#define FR_M_EXACT_LEN 0x04u

enum fr_tok {
	FR_TOK_CONST = 0,
	FR_TOK_COPY = 1,
	FR_TOK_COUNTER = 2,
};

struct fr_rule {
	/* match */
	uint32_t id;
	uint32_t id_mask;
	uint8_t mflags;
	uint8_t len; /* with FR_M_EXACT_LEN */
	uint8_t npat;
	uint8_t pat[CAN_MSG_MAX_LEN];
	uint8_t pat_mask[CAN_MSG_MAX_LEN];
	/* reply */
	uint32_t reply_id;
	uint8_t reply_ext;
	uint8_t reply_len;
	uint8_t tok_kind[CAN_MSG_MAX_LEN];
	uint8_t tok_val[CAN_MSG_MAX_LEN];
	/* run time */
	uint8_t counter;
	uint32_t matched;
	uint32_t replied;
};

struct fr_table {
	struct fr_rule rule[FR_MAX_RULES];
	uint32_t count;
	uint32_t rx_seen;
	uint32_t relayed;
	uint32_t reply_failed;
};

enum fr_rc {
	FR_OK = 0,
	FR_E_SYNTAX = -1,   /* unexpected character */
	FR_E_RANGE = -2,    /* id/mask/len out of range, > 8 tokens */
	FR_E_COPY = -3,     /* $i not guaranteed by the match */
	FR_E_TOO_MANY = -4, /* more than FR_MAX_RULES */
	FR_E_INVAL = -5,    /* NULL argument */
};

enum fr_action {
	FR_RELAYED = 0,
	FR_REPLIED = 1,
	FR_REPLY_FAILED = 2, /* matched, but the send callback refused */
};

/* Send returns 0 when the frame was accepted for transmission. */
typedef int (*fr_send_fn)(void *ctx, const struct can_msg *m);
typedef void (*fr_relay_fn)(void *ctx, const struct can_msg *m);

void fr_table_init(struct fr_table *t);

/*
 * Parse one rule from text[0..len).  On error *err_off (if not NULL) is
 * the offset of the offending character.
 */
int fr_parse_rule(const char *text, size_t len, struct fr_rule *out, size_t *err_off);

/*
 * Parse ';'-separated rules and append them to t.  Empty rules (";;",
 * leading/trailing ';') are skipped.  Stops at the first NUL or after len
 * characters.  All-or-nothing: on error t is unchanged.
 */
int fr_table_parse(struct fr_table *t, const char *text, size_t len, size_t *err_off);

int fr_table_add(struct fr_table *t, const struct fr_rule *r);

/* First rule matching m, or NULL. */
struct fr_rule *fr_match(struct fr_table *t, const struct can_msg *m);

/* Build the reply of r for request req (does not touch the counter). */
void fr_build_reply(const struct fr_rule *r, const struct can_msg *req, struct can_msg *out);

/*
 * Match m; on a hit build and send the reply (counter and statistics
 * updated on success), otherwise hand m to relay (may be NULL).
 */
enum fr_action fr_dispatch(struct fr_table *t, const struct can_msg *m, fr_send_fn send,
			   void *send_ctx, fr_relay_fn relay, void *relay_ctx);

/* Canonical text of a rule (round-trips through fr_parse_rule). */
int fr_format_rule(const struct fr_rule *r, char *buf, size_t size);

const char *fr_strerror(int rc);

#endif /* RTOS_INMATE_FASTREPLY_H */
