/* Compiled driver side of a split virtqueue: see vqdrv.h. Every rule mirrors the Python
 * reference (DriverQueue.add/_add_indirect/kick_needed/get_used/suppress_interrupts,
 * BlkClient._place/on_used); tests/test_native_front.py runs the same operations and the same
 * hostile used rings through both and compares every effect. */
#define _GNU_SOURCE
#include "vqdrv.h"
#include "shmio.h"

#include <endian.h>
#include <string.h>
#include <time.h>

#define AVAIL_F_NO_INTERRUPT 1u
#define USED_F_NO_NOTIFY 1u
/* (the other flags, types, statuses and the shared-memory accessors: shmio.h) */

static inline uint16_t ld16_atomic(const uint8_t *p)
{
    return le16toh(__atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED));
}

static inline void st_desc(uint8_t *p, uint64_t addr, uint32_t len, uint16_t flags,
                           uint16_t next)
{
    addr = htole64(addr);
    len = htole32(len);
    flags = htole16(flags);
    next = htole16(next);
    memcpy(p, &addr, 8);
    memcpy(p + 8, &len, 4);
    memcpy(p + 12, &flags, 2);
    memcpy(p + 14, &next, 2);
}

/* R.need_event: has the other side asked to hear about the entries old..new? */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static inline uint64_t used_event_off(const struct vqd *q)
{
    return q->avail + 4 + 2ull * q->size;
}

static inline uint64_t avail_event_off(const struct vqd *q)
{
    return q->used + 4 + 8ull * q->size;
}

void vqd_init(struct vqd *q)
{
    memset(q->mem + q->desc, 0, 16ull * q->size);
    memset(q->mem + q->avail, 0, 6ull + 2ull * q->size);
    memset(q->mem + q->used, 0, 6ull + 8ull * q->size);
    for (uint32_t i = 0; i < q->size; i++) {
        q->free[i] = (uint16_t)(q->size - 1 - i); /* pops 0, 1, 2, ... as the Python list */
        q->count[i] = 0;
        q->link[i] = 0;
    }
    q->nfree = q->size;
    q->avail_idx = q->kicked_idx = q->last_used = 0;
    q->interrupts_on = 1;
}

/* _publish: the ring entry, a release fence, then avail->idx. */
static void publish(struct vqd *q, uint16_t head)
{
    uint16_t idx = q->avail_idx;
    st16(q->mem + q->avail + 4 + 2u * (idx & (q->size - 1)), head);
    q->avail_idx = (uint16_t)(idx + 1);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    st16(q->mem + q->avail + 2, q->avail_idx);
}

int vqd_add(struct vqd *q, const struct vqd_seg *segs, unsigned nout, unsigned nin,
            uint16_t *head)
{
    unsigned total = nout + nin;
    uint16_t idx, first;

    if (total == 0 || q->nfree < total)
        return VQD_FULL;
    /* take them in the order the Python list's pops would */
    first = idx = q->free[--q->nfree];
    for (unsigned i = 0; i < total; i++) {
        uint16_t flags = i >= nout ? F_WRITE : 0;
        uint16_t nxt = 0;
        if (i + 1 < total) {
            nxt = q->free[--q->nfree];
            flags |= F_NEXT;
        }
        st_desc(q->mem + q->desc + 16ull * idx, segs[i].addr, segs[i].len, flags, nxt);
        q->link[idx] = nxt;
        idx = nxt;
    }
    q->count[first] = (uint16_t)total;
    publish(q, first);
    *head = first;
    return VQD_OK;
}

int vqd_add_indirect(struct vqd *q, uint64_t table, const struct vqd_seg *segs, unsigned nout,
                     unsigned nin, uint16_t *head)
{
    unsigned total = nout + nin;
    uint16_t h;

    if (total == 0 || q->nfree < 1)
        return VQD_FULL;
    for (unsigned i = 0; i < total; i++) {
        uint16_t flags = i >= nout ? F_WRITE : 0;
        if (i + 1 < total)
            flags |= F_NEXT;
        st_desc(q->mem + table + 16ull * i, segs[i].addr, segs[i].len, flags,
                (uint16_t)(i + 1 < total ? i + 1 : 0));
    }
    h = q->free[--q->nfree];
    st_desc(q->mem + q->desc + 16ull * h, table, 16u * total, F_INDIRECT, 0);
    q->link[h] = 0;
    q->count[h] = 1;
    publish(q, h);
    *head = h;
    return VQD_OK;
}

int vqd_kick_needed(struct vqd *q)
{
    uint16_t new_idx = q->avail_idx, old = q->kicked_idx;

    /* avail->idx before reading the device's suppression state (Dekker: store -> load) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    q->kicked_idx = new_idx;
    if (new_idx == old)
        return 0;
    if (q->event_idx) {
        uint16_t event = ld16_atomic(q->mem + avail_event_off(q));
        COPIED();
        return need_event(event, new_idx, old);
    }
    return !(ld16_atomic(q->mem + q->used) & USED_F_NO_NOTIFY);
}

int vqd_has_used(const struct vqd *q)
{
    return ld16_atomic(q->mem + q->used + 2) != q->last_used;
}

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int vqd_wait_used(const struct vqd *q, uint64_t deadline_ns)
{
    const uint8_t *idx = q->mem + q->used + 2;
    uint16_t last = q->last_used;

    for (;;) {
        /* the clock (a vDSO call, ~20 ns) only every few loads */
        for (int i = 0; i < 16; i++) {
            if (ld16_atomic(idx) != last)
                return 1;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#elif defined(__aarch64__)
            __asm__ __volatile__("yield" ::: "memory");
#endif
        }
        if (now_ns() > deadline_ns)
            return ld16_atomic(idx) != last;
    }
}

int vqd_used_count(struct vqd *q, unsigned *n, unsigned *in_flight)
{
    uint16_t used_idx = ld16_atomic(q->mem + q->used + 2);
    COPIED();
    *n = (uint16_t)(used_idx - q->last_used);
    *in_flight = q->size - q->nfree;
    if (*n > *in_flight)
        return VQD_BAD_USED_IDX;
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* used->idx before the entries */
    return VQD_OK;
}

int vqd_pop_used(struct vqd *q, uint32_t *id_out, uint32_t *len)
{
    const uint8_t *elem = q->mem + q->used + 4 + 8u * (q->last_used & (q->size - 1));
    uint8_t raw[8];
    uint32_t id;
    uint16_t h, n, idx;

    memcpy(raw, elem, sizeof raw); /* copied out, then checked */
    COPIED();
    id = ld32(raw);
    *len = ld32(raw + 4);
    *id_out = id;
    if (id >= q->size || q->count[id] == 0)
        return VQD_BAD_USED_ID;
    h = (uint16_t)id;
    /* back to the free list in the order they were taken, reversed (as the Python chain list
     * is): written in chain order, then the run turned around in place, the head on top */
    n = q->count[h];
    idx = h;
    for (uint16_t i = 0; i < n; i++) {
        q->free[q->nfree + i] = idx;
        idx = q->link[idx];
    }
    for (uint16_t i = 0, j = (uint16_t)(n - 1); i < j; i++, j--) {
        uint16_t t = q->free[q->nfree + i];
        q->free[q->nfree + i] = q->free[q->nfree + j];
        q->free[q->nfree + j] = t;
    }
    q->nfree += n;
    q->count[h] = 0;
    q->last_used = (uint16_t)(q->last_used + 1);
    return VQD_OK;
}

void vqd_rearm(struct vqd *q)
{
    if (!q->event_idx)
        return;
    if (q->interrupts_on) {
        st16(q->mem + used_event_off(q), q->last_used); /* interrupt at the next completion */
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* ... before the caller re-checks, sleeps */
    } else {
        st16(q->mem + used_event_off(q), (uint16_t)(q->last_used - 1)); /* stay parked */
    }
}

void vqd_suppress(struct vqd *q, int suppress)
{
    q->interrupts_on = !suppress;
    if (q->event_idx)
        st16(q->mem + used_event_off(q), suppress ? (uint16_t)(q->last_used - 1) : q->last_used);
    else
        st16(q->mem + q->avail, suppress ? AVAIL_F_NO_INTERRUPT : 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* before the caller re-checks used->idx */
}

int vqd_blk_place(struct vqd *q, uint64_t base, uint32_t type, uint64_t sector,
                  const void *payload, uint32_t plen, uint32_t in_len, struct vqd_seg segs[3],
                  unsigned *nout, unsigned *nin)
{
    uint32_t n = plen ? plen : in_len;
    uint8_t hdr[VQD_BLK_HDR + 1];
    uint32_t t = htole32(type), zero = 0;
    uint64_t s = htole64(sector);

    if (base > q->mem_size || (uint64_t)VQD_BLK_DATA + n > q->mem_size - base)
        return 0;
    memcpy(hdr, &t, 4);
    memcpy(hdr + 4, &zero, 4);
    memcpy(hdr + 8, &s, 8);
    hdr[VQD_BLK_HDR] = 0xFF; /* status: not answered */
    memcpy(q->mem + base, hdr, sizeof hdr);
    segs[0].addr = base;
    segs[0].len = VQD_BLK_HDR;
    if (plen) {
        memcpy(q->mem + base + VQD_BLK_DATA, payload, plen);
        segs[1].addr = base + VQD_BLK_DATA;
        segs[1].len = plen;
        segs[2].addr = base + VQD_BLK_HDR;
        segs[2].len = 1;
        *nout = 2;
        *nin = 1;
    } else if (!n) {
        segs[1].addr = base + VQD_BLK_HDR;
        segs[1].len = 1;
        *nout = 1;
        *nin = 1;
    } else {
        segs[1].addr = base + VQD_BLK_DATA;
        segs[1].len = n;
        segs[2].addr = base + VQD_BLK_HDR;
        segs[2].len = 1;
        *nout = 1;
        *nin = 2;
    }
    return 1;
}

unsigned vqd_blk_status(const struct vqd *q, uint64_t base, uint32_t used_len, uint32_t in_len,
                        uint32_t type, uint32_t *n)
{
    unsigned status = q->mem[base + VQD_BLK_HDR]; /* one byte: read once */
    uint32_t got = 0;

    COPIED();
    if (status == S_OK && in_len) {
        got = used_len > 0 ? used_len - 1 : 0; /* the bytes before the status byte ... */
        if (got > in_len)
            got = in_len; /* ... of the buffer we gave it */
        if (got != in_len && type == T_IN)
            status = S_IOERR; /* a device must return all of a read */
    }
    *n = got;
    return status;
}
