/* SPDX-License-Identifier: MIT */
/*
 * virtqueue.h - the DRIVER side of one split virtqueue (virtio 1.x 2.7),
 * freestanding, for a device on the other side of shared memory that is not
 * trusted.
 *
 *  - The descriptor free list and each chain's bookkeeping (length, cookie,
 *    device-writable bytes) live in this struct, never in the shared table:
 *    a device that scribbles over descriptors cannot corrupt them (Linux keeps
 *    desc_extra for the same reason).
 *  - Publishing: ring entry, release fence, then avail->idx.
 *  - Collecting: used->idx is read once and checked against what is in
 *    flight; every entry's id must name the head of a chain in flight and
 *    its len may not exceed that chain's device-writable bytes.  Any
 *    violation marks the queue broken (it then refuses everything) and the
 *    transport resets the device: nothing a device writes can make the
 *    driver index out of bounds or hand out a buffer twice.
 *  - Memory is a parameter: the queue only knows the region and offsets in
 *    it, so it runs on real shared memory or on a test buffer.
 *  - No EVENT_IDX, no INDIRECT_DESC (not negotiated by the inmate).
 */
#ifndef RTOS_INMATE_VIRTQUEUE_H
#define RTOS_INMATE_VIRTQUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ivshmem_link.h"

#define VQ_MAX_SIZE 128u /* largest queue this driver sets up (bounds its bss) */
#define VQ_MAX_CHAIN 4u  /* most descriptors in one chain */

enum vq_rc {
	VQ_OK = 0,
	VQ_E_INVAL = -1,  /* bad argument (our bug, not the device's) */
	VQ_E_FULL = -2,   /* not enough free descriptors */
	VQ_E_BROKEN = -3, /* the device broke the ring; reset needed */
};

enum vq_fault {
	VQ_FAULT_NONE = 0,
	VQ_FAULT_USED_IDX,      /* used->idx ran ahead of what is in flight */
	VQ_FAULT_USED_ID,       /* used id out of range */
	VQ_FAULT_NOT_IN_FLIGHT, /* used id is not the head of a chain in flight */
	VQ_FAULT_USED_LEN,      /* used len larger than the chain's writable bytes */
};

/* One buffer: offset in the region and length. */
struct vq_buf {
	uint32_t addr;
	uint32_t len;
};

struct vq_stats {
	uint32_t added;     /* chains made available */
	uint32_t completed; /* chains the device returned */
	uint32_t kicks;     /* notifications the device asked for */
};

struct virtqueue {
	const struct shm_region *mem;
	uint32_t desc, avail, used; /* offsets of the three areas in mem */
	uint16_t size, mask;
	uint16_t num_free, free_head;
	uint16_t avail_idx;  /* shadow of avail->idx */
	uint16_t kicked_idx; /* avail_idx at the last kick decision */
	uint16_t last_used;  /* next used entry to read */
	bool broken;
	enum vq_fault fault;
	uint32_t fault_value; /* the offending id / len / idx */
	struct vq_stats stats;
	/* private bookkeeping, indexed by descriptor */
	uint16_t next[VQ_MAX_SIZE];     /* free-list link, or next in chain */
	uint8_t chain_len[VQ_MAX_SIZE]; /* per head: descriptors; 0 = not a head in flight */
	uint32_t in_len[VQ_MAX_SIZE];   /* per head: device-writable bytes */
	uint32_t cookie[VQ_MAX_SIZE];   /* per head: the owner's token */
};

/*
 * Take over a ring of size descriptors (power of two, <= VQ_MAX_SIZE) at the
 * given offsets; checks the areas lie inside mem with their alignment and
 * zeroes them.  VQ_OK or VQ_E_INVAL.
 */
int vq_init(struct virtqueue *vq, const struct shm_region *mem, uint16_t size, uint32_t desc,
	    uint32_t avail, uint32_t used);

/*
 * Make one chain available: out[0..n_out) for the device to read, then
 * in[0..n_in) for it to write.  Returns the head (>= 0), VQ_E_FULL, VQ_E_INVAL
 * (no buffers, too many, or a buffer outside the region) or VQ_E_BROKEN.
 */
int vq_add(struct virtqueue *vq, const struct vq_buf *out, unsigned int n_out,
	   const struct vq_buf *in, unsigned int n_in, uint32_t cookie);

/* After a batch of vq_add: does the device want a doorbell? */
bool vq_kick_needed(struct virtqueue *vq);

/*
 * Collect one completed chain: 1 with *cookie and *len (validated: len <=
 * the chain's device-writable bytes), 0 when none is pending, VQ_E_BROKEN.
 */
int vq_get_used(struct virtqueue *vq, uint32_t *cookie, uint32_t *len);

/* Is a used entry pending?  (A broken queue reports false.) */
bool vq_has_used(const struct virtqueue *vq);

static inline uint32_t vq_in_flight(const struct virtqueue *vq)
{
	return (uint32_t)vq->size - vq->num_free;
}

static inline uint32_t vq_num_free(const struct virtqueue *vq)
{
	return vq->num_free;
}

const char *vq_fault_name(enum vq_fault f);

/* The bytes one contiguous ring of n entries takes (desc, avail, used), like
 * Linux's vring_size() with the given alignment of the used ring. */
uint32_t vq_ring_bytes(uint32_t n, uint32_t align);

/* Offsets of avail and used inside such a ring (desc is at 0). */
void vq_ring_layout(uint32_t n, uint32_t align, uint32_t *avail, uint32_t *used);

#endif /* RTOS_INMATE_VIRTQUEUE_H */
