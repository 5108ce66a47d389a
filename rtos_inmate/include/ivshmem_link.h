/* SPDX-License-Identifier: MIT */
/*
 * ivshmem_link.h - the link HAL: one ivshmem 2.0 device (virtio-ivshmem.md
 * section 1) as the portable core sees it.  Separate from hal.h, which is the
 * CAN side (SPI, INT pin, time).
 *
 * A platform fills a struct ivshmem_link and hands it to the core:
 *
 *   hal/hosted/simlink.c          a peer of the sim hub (sim-link.md):
 *                                 memfd memory, eventfd doorbells
 *   hal/jailhouse_rpi4/ivshmem_rpi4.c   the Jailhouse ivshmem PCI device:
 *                                 BAR0 registers, INTx, shared memory from
 *                                 the vendor capability's base address
 *
 * The registers are reached through an ops table (so the core objects have
 * no link symbols to resolve and run against a fake in a unit test); the
 * memory sections are plain pointers.  Every access to shared memory goes
 * through the shm_* helpers below: single loads/stores of naturally aligned
 * fields (never torn, never merged or re-read by the compiler), byte copies
 * for buffers, and explicit fences.  Shared memory is written by an
 * untrusted peer at any time: read a value once, then validate the copy.
 */
#ifndef RTOS_INMATE_IVSHMEM_LINK_H
#define RTOS_INMATE_IVSHMEM_LINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The most vectors a link can have (the ivshmem MSI-X table limit). */
#define IVL_MAX_VECTORS 16u

/* One mapped section of the shared memory. */
struct shm_region {
	volatile uint8_t *base;
	size_t size;
};

struct ivshmem_link_ops {
	/*
	 * STATE register: store value in our state-table entry; if it changed,
	 * the platform raises vector 0 on every other peer.
	 */
	void (*set_state)(void *ctx, uint32_t value);
	/* DOORBELL = (peer << 16) | vector; dropped for an absent peer or a
	 * vector >= vectors, as Jailhouse does. */
	void (*doorbell)(void *ctx, uint32_t peer, uint32_t vector);
	/* INT_CONTROL bit 0: interrupts arriving while it is 0 are lost. */
	void (*set_int_control)(void *ctx, bool enabled);
	/*
	 * Wait until an interrupt arrives or timeout_ns passes (0 = just look).
	 * Returns a mask of the vectors that fired (bit n = vector n; 0 after a
	 * timeout or with INT_CONTROL 0), or a negative value when the link
	 * itself failed.  Consumes what it reports.  Interrupts are only hints:
	 * the core rescans shared memory on every pass anyway.
	 */
	int (*wait)(void *ctx, uint64_t timeout_ns);
};

struct ivshmem_link {
	uint32_t id;        /* own peer ID */
	uint32_t max_peers;
	uint32_t vectors;   /* 1 with INTx, up to IVL_MAX_VECTORS with MSI-X */
	uint32_t protocol;  /* the PCI class protocol, e.g. 0x8024 */
	struct shm_region state_table; /* read-only for us */
	struct shm_region rw;          /* the R/W section */
	const struct ivshmem_link_ops *ops;
	void *ctx;
};

/* ---- shared-memory access ------------------------------------------- */

static inline bool shm_contains(const struct shm_region *r, uint64_t off, uint64_t len)
{
	return off <= r->size && len <= r->size - off;
}

/* Offsets below are trusted (computed from validated geometry) and aligned. */
static inline uint8_t shm_ld8(const struct shm_region *r, size_t off)
{
	return __atomic_load_n(&r->base[off], __ATOMIC_RELAXED);
}

static inline uint16_t shm_ld16(const struct shm_region *r, size_t off)
{
	return __atomic_load_n((volatile uint16_t *)(r->base + off), __ATOMIC_RELAXED);
}

static inline uint32_t shm_ld32(const struct shm_region *r, size_t off)
{
	return __atomic_load_n((volatile uint32_t *)(r->base + off), __ATOMIC_RELAXED);
}

static inline uint64_t shm_ld64(const struct shm_region *r, size_t off)
{
	return __atomic_load_n((volatile uint64_t *)(r->base + off), __ATOMIC_RELAXED);
}

static inline void shm_st8(const struct shm_region *r, size_t off, uint8_t v)
{
	__atomic_store_n(&r->base[off], v, __ATOMIC_RELAXED);
}

static inline void shm_st16(const struct shm_region *r, size_t off, uint16_t v)
{
	__atomic_store_n((volatile uint16_t *)(r->base + off), v, __ATOMIC_RELAXED);
}

static inline void shm_st32(const struct shm_region *r, size_t off, uint32_t v)
{
	__atomic_store_n((volatile uint32_t *)(r->base + off), v, __ATOMIC_RELAXED);
}

static inline void shm_st64(const struct shm_region *r, size_t off, uint64_t v)
{
	__atomic_store_n((volatile uint64_t *)(r->base + off), v, __ATOMIC_RELAXED);
}

/* Byte copies for buffers: the peer may write them concurrently. */
static inline void shm_read(const struct shm_region *r, size_t off, void *dst, size_t n)
{
	uint8_t *d = dst;

	for (size_t i = 0; i < n; i++)
		d[i] = r->base[off + i];
}

static inline void shm_write(const struct shm_region *r, size_t off, const void *src, size_t n)
{
	const uint8_t *s = src;

	for (size_t i = 0; i < n; i++)
		r->base[off + i] = s[i];
}

static inline void shm_zero(const struct shm_region *r, size_t off, size_t n)
{
	for (size_t i = 0; i < n; i++)
		r->base[off + i] = 0;
}

/* Our stores before, the peer's view after (virt_wmb / smp_mb). */
static inline void shm_fence(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* What we read before is older than what we read after (virt_rmb). */
static inline void shm_fence_acquire(void)
{
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
}

/* ---- the link --------------------------------------------------------- */

/* The other end of a two-peer link: !own_id (virtio-ivshmem.md 3.1). */
static inline uint32_t ivl_peer_id(const struct ivshmem_link *l)
{
	return l->id == 0u ? 1u : 0u;
}

/* A peer's state-table entry; an ID outside the table reads as RESET (0). */
static inline uint32_t ivl_peer_state(const struct ivshmem_link *l, uint32_t peer)
{
	if (peer >= l->max_peers || !shm_contains(&l->state_table, 4u * (uint64_t)peer, 4u))
		return 0;
	return shm_ld32(&l->state_table, 4u * (size_t)peer);
}

static inline uint32_t ivl_own_state(const struct ivshmem_link *l)
{
	return ivl_peer_state(l, l->id);
}

static inline void ivl_set_state(const struct ivshmem_link *l, uint32_t value)
{
	l->ops->set_state(l->ctx, value);
}

static inline void ivl_doorbell(const struct ivshmem_link *l, uint32_t peer, uint32_t vector)
{
	l->ops->doorbell(l->ctx, peer, vector);
}

static inline void ivl_set_int_control(const struct ivshmem_link *l, bool enabled)
{
	l->ops->set_int_control(l->ctx, enabled);
}

static inline int ivl_wait(const struct ivshmem_link *l, uint64_t timeout_ns)
{
	return l->ops->wait(l->ctx, timeout_ns);
}

#endif /* RTOS_INMATE_IVSHMEM_LINK_H */
