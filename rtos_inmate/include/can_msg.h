/* SPDX-License-Identifier: MIT */
/*
 * can_msg.h - the classic CAN frame as it travels inside the inmate:
 * MCP2515 driver <-> fast-reply table <-> relay (virtio-can later).
 *
 * Classic frames only (the MCP2515 has no CAN FD).  The id is the bare
 * 11- or 29-bit identifier; EXT and RTR are flags, as in virtio-can
 * (no SocketCAN-style flag bits inside the id).  For an RTR frame, len is
 * the requested DLC (0..8) and data[] is unused.
 */
#ifndef RTOS_INMATE_CAN_MSG_H
#define RTOS_INMATE_CAN_MSG_H

#include <stdbool.h>
#include <stdint.h>

#define CAN_MSG_MAX_LEN 8u
#define CAN_MSG_STD_MAX 0x7FFu
#define CAN_MSG_EXT_MAX 0x1FFFFFFFu

#define CAN_MSG_F_EXT 0x01u /* 29-bit identifier */
#define CAN_MSG_F_RTR 0x02u /* remote transmission request */
#define CAN_MSG_F_ALL (CAN_MSG_F_EXT | CAN_MSG_F_RTR)

struct can_msg {
	uint32_t id;
	uint8_t flags;
	uint8_t len;
	uint8_t data[CAN_MSG_MAX_LEN];
};

/* True when id, flags and len describe a frame a classic controller can send. */
static inline bool can_msg_valid(const struct can_msg *m)
{
	uint32_t max = (m->flags & CAN_MSG_F_EXT) ? CAN_MSG_EXT_MAX : CAN_MSG_STD_MAX;

	return (m->flags & ~CAN_MSG_F_ALL) == 0u && m->id <= max &&
	       m->len <= CAN_MSG_MAX_LEN;
}

#endif /* RTOS_INMATE_CAN_MSG_H */
