/* SPDX-License-Identifier: MIT */
/*
 * virtio_ivshmem.h - the frontend (driver) transport of virtio over ivshmem,
 * as Linux's drivers/virtio/virtio_ivshmem.c does it (virtio-ivshmem.md 3),
 * in freestanding C for the inmate.
 *
 *  - Probe: a 2-peer link, ID 0 or 1, an R/W section of at least two pages,
 *    the backend READY, header revision >= 1 and a plausible header size.
 *  - Register writes are transactions (3.3): wait for write_transaction 0,
 *    store the field, release fence, store its offset, ring vector 0, wait
 *    for 0 again.  Every wait is bounded by a deadline and ends as soon as
 *    the backend leaves READY; while waiting an idle hook runs, so the CAN
 *    side keeps answering frames while the backend is slow.
 *  - Rings and buffers live in the R/W section, placed by the chunk
 *    allocator geometry of Linux (3.7): chunk = rw/4096 clamped to
 *    [64, 4096] and rounded up to a power of two, power-of-two chunk counts
 *    naturally aligned, first fit, the header's chunks reserved.  A static
 *    bitmap, no malloc.  Rings use Linux's layout with 64-byte alignment.
 *  - Every value read from the header is validated before use.
 *
 * Device-specific bring-up (which queues, which buffers) is the caller's:
 * see virtio_can.c.
 */
#ifndef RTOS_INMATE_VIRTIO_IVSHMEM_H
#define RTOS_INMATE_VIRTIO_IVSHMEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ivshmem_link.h"
#include "virtqueue.h"

#define VIO_MAX_QUEUES 3u
#define VIO_MAX_CHUNKS 4096u /* bitmap size; a larger R/W section uses the first 4096 */
#define VIO_DEFAULT_TIMEOUT_NS 1000000000ull

enum vio_rc {
	VIO_OK = 0,
	VIO_E_INVAL = -1,    /* bad argument or link geometry */
	VIO_E_GONE = -2,     /* the backend left READY */
	VIO_E_TIMEOUT = -3,  /* the backend did not answer in time */
	VIO_E_PROTO = -4,    /* the backend's header or answer is impossible */
	VIO_E_NOMEM = -5,    /* R/W section full */
	VIO_E_FEATURES = -6, /* required features missing or refused */
	VIO_E_REFUSED = -7,  /* the device refused a queue */
};

/* What vio_check found (a mask). */
enum vio_event {
	VIO_EV_CONFIG = 1,      /* config_event was set: re-read the config */
	VIO_EV_QUEUE = 2,       /* queue_event was set */
	VIO_EV_LOST = 4,        /* the backend is not READY any more */
	VIO_EV_NEEDS_RESET = 8, /* DEVICE_NEEDS_RESET in device_status */
};

struct vio_queue {
	struct virtqueue vq;
	uint16_t index;
	uint16_t device_vector; /* kick vector the backend asked for (validated) */
	uint16_t driver_vector; /* vector we asked the backend to signal us on */
	bool live;
};

struct vio_stats {
	uint32_t transactions;
	uint32_t timeouts;
	uint32_t backend_lost;  /* the backend left READY while we used it */
	uint32_t resets;        /* device resets (status 0) */
	uint32_t probes;        /* successful probes */
	uint32_t config_events;
	uint32_t proto_errors;  /* impossible header values seen */
};

struct vio_dev {
	const struct ivshmem_link *link;
	struct shm_region rw;
	uint32_t peer;
	uint32_t header_size;
	uint64_t timeout_ns;
	void (*idle)(void *ctx); /* run while waiting for the backend */
	void *idle_ctx;
	/* allocator */
	uint32_t chunk, nchunks, header_chunks;
	uint32_t bitmap[VIO_MAX_CHUNKS / 32u];
	/* negotiation */
	uint64_t device_features;
	uint64_t features;
	struct vio_queue q[VIO_MAX_QUEUES];
	bool probed;
	struct vio_stats stats;
};

/*
 * Bind to a link: checks ID <= 1, MAX_PEERS == 2, an R/W section of at
 * least two pages.  timeout_ns 0 = VIO_DEFAULT_TIMEOUT_NS.  idle may be NULL.
 */
int vio_init(struct vio_dev *d, const struct ivshmem_link *link, uint64_t timeout_ns,
	     void (*idle)(void *ctx), void *idle_ctx);

bool vio_backend_ready(const struct vio_dev *d);

/*
 * Linux's probe: the backend must be READY now; validates the header,
 * builds the allocator, writes our STATE = READY.  No waiting.
 */
int vio_probe(struct vio_dev *d);

/* Leave the link: STATE = RESET, every queue forgotten (no transaction). */
void vio_leave(struct vio_dev *d);

/* One register-write transaction of size 1, 2, 4 or 8 bytes at header offset off. */
int vio_write(struct vio_dev *d, uint32_t off, unsigned int size, uint64_t value);

/* device_status as the backend shows it (low byte). */
uint8_t vio_status(const struct vio_dev *d);

/*
 * Reset (status 0), ACKNOWLEDGE, DRIVER, read the 64 feature bits, write
 * ours = (wanted | VERSION_1 | ACCESS_PLATFORM | ORDER_PLATFORM if offered)
 * & offered, FEATURES_OK and check it stuck.  VIO_E_FEATURES when VERSION_1
 * or ACCESS_PLATFORM is not offered, or FEATURES_OK is refused.  Forgets
 * every queue and the allocations (a reset frees the whole R/W section).
 */
int vio_negotiate(struct vio_dev *d, uint64_t wanted);

/* Allocate bytes in the R/W section (chunk geometry of 3.7); offset in *off. */
int vio_alloc(struct vio_dev *d, uint32_t bytes, uint32_t *off);

/*
 * Select queue index, check it exists and is disabled, pick a size
 * (min(want, offered), power of two, shrinking when memory is short),
 * allocate one contiguous ring, write size/vector/addresses, enable it and
 * check the device kept it enabled.  *out gets the queue.
 */
int vio_setup_queue(struct vio_dev *d, uint16_t index, uint16_t nqueues, uint16_t want,
		    struct vio_queue **out);

/* INT_CONTROL = 1, then status DRIVER_OK (0xF). */
int vio_driver_ok(struct vio_dev *d);

/* Device reset (status 0); forgets queues and allocations. */
int vio_reset(struct vio_dev *d);

/* Ring the queue's kick vector. */
void vio_kick(const struct vio_dev *d, const struct vio_queue *q);

/*
 * Cheap health and event check for the main loop: peer state, the two event
 * bytes (cleared when set) and NEEDS_RESET.  Returns a vio_event mask.
 */
unsigned int vio_check(struct vio_dev *d);

/*
 * Read len bytes of device config at off with the generation protocol
 * (odd = being updated).  VIO_E_INVAL outside the header's config, VIO_E_PROTO
 * when it never settles.
 */
int vio_read_config(struct vio_dev *d, uint32_t off, void *buf, uint32_t len);

const char *vio_strerror(int rc);

/* Allocator geometry of 3.7, exported for tests. */
uint32_t vio_chunk_size(uint64_t rw_size);

#endif /* RTOS_INMATE_VIRTIO_IVSHMEM_H */
