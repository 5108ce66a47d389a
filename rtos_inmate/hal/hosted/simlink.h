/* SPDX-License-Identifier: MIT */
/*
 * simlink.h - a C peer of the sim hub (shared/spec/sim-link.md): the hosted
 * inmate's ivshmem link.  Fills a struct ivshmem_link (ivshmem_link.h) so the
 * portable core runs unchanged.
 *
 * Handshake: connect, send requested_id (int64), receive version 2, the
 * assigned ID (or -errno), -1 with the memfd (SCM_RIGHTS), six geometry
 * values, then `vectors` eventfds for every connected peer and ourselves
 * last.  Afterwards the hub sends joins (<ID> + eventfd, `vectors` times)
 * and leaves (<ID> without fd), read without blocking whenever the socket
 * is readable or a doorbell targets an unknown peer.
 *
 * Registers, emulated as the spec says: DOORBELL writes u64 1 to the
 * target's eventfd (dropped for an absent peer or vector >= vectors); STATE
 * stores into the state table and rings vector 0 of the others if it
 * changed; INT_CONTROL is a local flag: interrupts arriving while it is 0
 * are lost (its eventfds are drained when it goes to 1).
 */
#ifndef RTOS_INMATE_SIMLINK_H
#define RTOS_INMATE_SIMLINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ivshmem_link.h"

#define SIMLINK_MAX_PEERS 16u
#define SIMLINK_HUB_VERSION 2
#define SIMLINK_MAX_SECTION (1ull << 30) /* refuse larger sections */

struct simlink {
	int sock;
	bool hub_open;
	uint32_t id, max_peers, vectors, protocol;
	uint64_t state_table_size, rw_size, output_size;
	void *map;
	size_t map_len;
	int fds[SIMLINK_MAX_PEERS][IVL_MAX_VECTORS];
	uint8_t nfds[SIMLINK_MAX_PEERS];
	bool int_control;
	/* a hub message being received without blocking */
	uint8_t rxbuf[8];
	size_t rxlen;
	int rxfd;
	uint32_t joins, leaves, hub_errors;
	struct ivshmem_link link;
};

/*
 * Join the hub at path as requested_id (-1 = lowest free).  Returns 0, or a
 * negative errno (-EBUSY / -EINVAL from the hub, -EPROTO for a protocol
 * violation, -ETIMEDOUT).  On success s->link is ready for the core.
 */
int simlink_open(struct simlink *s, const char *path, int64_t requested_id,
		 uint32_t timeout_ms);

/* Leave the hub (it sets our state to 0 and tells the others). */
void simlink_close(struct simlink *s);

/* Apply pending join/leave messages without blocking. */
void simlink_process_hub(struct simlink *s);

const char *simlink_strerror(int rc);

#endif /* RTOS_INMATE_SIMLINK_H */
