/* Compiled virtio-blk data path: see vqblk.h. Every rule here mirrors the Python reference
 * (DeviceQueue._walk/_indirect_table, BlkModel.handle/_rw_now, DeviceQueue.push/publish); the
 * tests run the same cases through both and compare every effect. */
#define _GNU_SOURCE
#include "vqblk.h"
#include "shmio.h"

#include <endian.h>
#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* the fuzz harness (fuzz_vqblk.c) puts its own checked copies in place of the syscalls:
 * the kernel's accesses to the section are invisible to AddressSanitizer */
#ifndef VQ_PREADV
#define VQ_PREADV preadv
#define VQ_PWRITEV pwritev
#endif

/* (flags, types, statuses and the shared-memory accessors: shmio.h) */

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

static inline struct desc ld_desc(const uint8_t *p)
{
    unsigned char raw[16];
    struct desc d;
    memcpy(raw, p, sizeof raw);
    COPIED();
    memcpy(&d.addr, raw, 8);
    memcpy(&d.len, raw + 8, 4);
    memcpy(&d.flags, raw + 12, 2);
    memcpy(&d.next, raw + 14, 2);
    d.addr = le64toh(d.addr);
    d.len = le32toh(d.len);
    d.flags = le16toh(d.flags);
    d.next = le16toh(d.next);
    return d;
}

/* [off, off + len) inside the section, without overflow (Region.contains). */
static inline int inside(const struct vq *q, uint64_t off, uint64_t len)
{
    return off <= q->mem_size && len <= q->mem_size - off;
}

int vq_walk(const struct vq *q, uint16_t head, struct vq_chain *c)
{
    struct desc table[VQ_MAX_INDIRECT];
    int in_table = 0;
    uint32_t count = q->size, budget = q->size; /* a chain never holds more than its table */
    uint32_t index = head;

    c->head = head;
    c->nr = c->nw = 0;
    c->error = 0;
    for (;;) {
        struct desc d;
        if (budget == 0)
            return VQ_PYTHON; /* loops or is longer than the table: RingError */
        budget--;
        if (!in_table) {
            if (index >= q->size) /* (head checked by the caller, next below) */
                return VQ_PYTHON;
            d = ld_desc(q->mem + q->desc + 16u * (uint64_t)index);
        } else {
            d = table[index]; /* index < count, checked below */
        }
        if (d.flags & F_INDIRECT) {
            uint32_t n;
            if (in_table || !q->indirect || (d.flags & F_NEXT))
                return VQ_PYTHON; /* nested, not negotiated, NEXT set: RingError */
            if (d.len == 0 || d.len % 16 || d.len / 16 > VQ_MAX_QUEUE_SIZE)
                return VQ_PYTHON; /* RingError */
            if (d.addr % 16 || !inside(q, d.addr, d.len))
                return VQ_PYTHON; /* RingError */
            n = d.len / 16;
            if (n > VQ_MAX_INDIRECT)
                return VQ_PYTHON; /* valid, but more than this code keeps */
            /* the whole table is copied before any entry is looked at (as the Python walk
             * unpacks it at once) */
            for (uint32_t i = 0; i < n; i++)
                table[i] = ld_desc(q->mem + d.addr + 16u * i);
            in_table = 1;
            count = budget = n;
            index = 0;
            continue;
        }
        if (d.flags & F_WRITE) {
            if (c->nw == VQ_MAX_SEGS)
                return VQ_PYTHON;
            c->w[c->nw].addr = d.addr;
            c->w[c->nw].len = d.len;
            c->nw++;
        } else {
            if (c->nw)
                c->error = 1; /* readable after writable */
            if (c->nr == VQ_MAX_SEGS)
                return VQ_PYTHON;
            c->r[c->nr].addr = d.addr;
            c->r[c->nr].len = d.len;
            c->nr++;
        }
        if (!inside(q, d.addr, d.len))
            c->error = 1;
        if (!(d.flags & F_NEXT))
            return VQ_OK;
        if (d.next >= count)
            return VQ_PYTHON; /* RingError */
        index = d.next;
    }
}

/* BlkModel.handle's fast-path test: the usual read or write, three descriptors, all inside.
 * Fills the request's fields and returns 1, or 0 for anything the Python model must decide. */
static int blk_usual(const struct vq *q, const struct blk *b, const struct vq_chain *c,
                     uint32_t *type, uint64_t *sector, struct vq_seg *data, uint64_t *status)
{
    unsigned char hdr[16];
    uint32_t t;
    uint64_t s, n;
    const struct vq_seg *d;

    if (c->error || c->nr + c->nw != 3 || !c->nr || !c->nw || c->r[0].len != 16
        || c->w[c->nw - 1].len != 1)
        return 0;
    memcpy(hdr, q->mem + c->r[0].addr, sizeof hdr); /* inside: the walk found no error */
    COPIED();
    memcpy(&t, hdr, 4);
    memcpy(&s, hdr + 8, 8);
    t = le32toh(t);
    s = le64toh(s);
    if (t == T_IN)
        d = c->nw == 2 ? &c->w[0] : NULL;
    else if (t == T_OUT && !b->read_only)
        d = c->nr == 2 ? &c->r[1] : NULL;
    else
        d = NULL;
    if (!d)
        return 0;
    n = d->len;
    if (!(n > 0 && n <= b->max_data && !(n & 511) && s < b->capacity
          && s + (n >> 9) <= b->capacity))
        return 0;
    *type = t;
    *sector = s;
    *data = *d;
    *status = c->w[c->nw - 1].addr;
    return 1;
}

/* BlkModel._rw_now: one preadv/pwritev straight on the section; the used length. */
static uint32_t blk_rw(const struct vq *q, const struct blk *b, uint32_t type, uint64_t sector,
                       struct vq_seg data, uint64_t status, struct blk_counters *cnt)
{
    struct iovec iov = {.iov_base = q->mem + data.addr, .iov_len = data.len};
    off_t off = (off_t)(sector << 9);
    ssize_t done;

    do {
        done = type == T_IN ? VQ_PREADV(b->fd, &iov, 1, off)
                            : VQ_PWRITEV(b->fd, &iov, 1, off);
    } while (done < 0 && errno == EINTR); /* as os.preadv retries (PEP 475) */
    if (done != (ssize_t)data.len) { /* an error, or short: the image shrank, or full */
        cnt->io_fails++;
        q->mem[status] = S_IOERR;
        return 1;
    }
    q->mem[status] = S_OK;
    if (type == T_IN) {
        cnt->read_count++;
        cnt->read_bytes += data.len;
        return data.len + 1;
    }
    cnt->write_count++;
    cnt->write_bytes += data.len;
    return 1; /* the device wrote only the status byte */
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts); /* the vDSO: no system call */
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

unsigned blk_serve(const struct vq *q, const struct blk *b, uint16_t *last_avail,
                   uint16_t *next_used, unsigned limit, uint64_t until_ns,
                   struct blk_counters *cnt, int *stop)
{
    uint16_t last = *last_avail, used = *next_used;
    uint32_t mask = q->size - 1;
    unsigned n, served = 0;

    *stop = 0;
    /* avail->idx read once: the value validated is the one used (DeviceQueue.pop_all) */
    n = (uint16_t)(ld16(q->mem + q->avail + 2) - last);
    COPIED();
    if (n > q->size) {
        *stop = 1; /* the Python pop_all raises the RingError */
        return 0;
    }
    if (n > limit)
        n = limit;
    __atomic_thread_fence(__ATOMIC_ACQUIRE); /* avail->idx before the entries it covers */
    while (served < n) {
        struct vq_chain c;
        struct vq_seg data;
        uint32_t type, len;
        uint64_t sector, status;
        uint16_t head = ld16(q->mem + q->avail + 4 + 2u * (last & mask));
        COPIED();
        if (head >= q->size || vq_walk(q, head, &c) != VQ_OK
            || !blk_usual(q, b, &c, &type, &sector, &data, &status)) {
            *stop = 1; /* this chain is the Python path's, unconsumed */
            break;
        }
        last++;
        len = blk_rw(q, b, type, sector, data, status, cnt);
        {
            uint8_t *elem = q->mem + q->used + 4 + 8u * (used & mask);
            st32(elem, head);
            st32(elem + 4, len);
        }
        used++;
        served++;
        if (until_ns && now_ns() >= until_ns)
            break; /* the runner's time slice is used up: it looks at the other devices */
    }
    *last_avail = last;
    *next_used = used;
    return served;
}

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() COPIED()
#endif

unsigned blk_poll(const struct vq *q, const struct blk *b, uint16_t *last_avail,
                  uint16_t *next_used, uint16_t *signalled_used, int event_idx, unsigned limit,
                  uint64_t until_ns, uint64_t watch_off, struct blk_counters *cnt, int *why)
{
    unsigned total = 0;

    for (;;) {
        uint32_t watch;
        memcpy(&watch, q->mem + watch_off, sizeof watch); /* inside: checked by the caller */
        COPIED();
        if (watch) {
            *why = POLL_WATCH;
            return total;
        }
        if (ld16(q->mem + q->avail + 2) != *last_avail) {
            int stop;
            unsigned n = blk_serve(q, b, last_avail, next_used, limit - total, until_ns, cnt,
                                   &stop);
            total += n;
            if (n) {
                int want = vq_publish(q, *next_used, *signalled_used, event_idx);
                *signalled_used = *next_used;
                if (want) {
                    *why = POLL_NOTIFY;
                    return total;
                }
            }
            if (stop) {
                *why = POLL_STOP;
                return total;
            }
            if (total >= limit) {
                *why = POLL_LIMIT;
                return total;
            }
            if (now_ns() >= until_ns) {
                *why = POLL_TIME; /* (work may be left: the caller polls again) */
                return total;
            }
            continue;
        }
        if (now_ns() >= until_ns) {
            *why = POLL_IDLE;
            return total;
        }
        CPU_RELAX();
    }
}

static void ring_driver(const struct vq *q, const struct ring *r)
{
    uint64_t one = 1;

    __atomic_store_n(q->mem + r->event_off, (uint8_t)1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* queue_event before the interrupt */
    if (r->reg)
        *r->reg = htole32(r->value);
    else if (r->fd >= 0 && write(r->fd, &one, sizeof one) < 0) {
        /* EAGAIN: the count is saturated, an interrupt is pending anyway */
    }
}

unsigned blk_run(const struct vq *q, const struct blk *b, uint16_t *last_avail,
                 uint16_t *next_used, uint16_t *signalled_used, int event_idx, uint64_t until_ns,
                 uint64_t slice_ns, uint64_t watch_off, const struct ring *ring, int yield,
                 struct blk_counters *cnt, int *why, unsigned *rung)
{
    unsigned total = 0;

    *rung = 0;
    for (;;) {
        uint64_t now = now_ns(), end = now + slice_ns;
        int w;

        if (now >= until_ns) {
            *why = POLL_TIME;
            return total;
        }
        total += blk_poll(q, b, last_avail, next_used, signalled_used, event_idx, 0xFFFFu,
                          end < until_ns ? end : until_ns, watch_off, cnt, &w);
        if (w == POLL_NOTIFY) {
            ring_driver(q, ring);
            (*rung)++;
        } else if (w == POLL_IDLE || w == POLL_STOP || w == POLL_WATCH) {
            *why = w;
            return total;
        }
        if (yield)
            sched_yield();
    }
}

int vq_publish(const struct vq *q, uint16_t next_used, uint16_t signalled_used, int event_idx)
{
    if (next_used == signalled_used)
        return 0;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* used elements before used->idx */
    st16(q->mem + q->used + 2, next_used);
    /* used->idx before reading the driver's suppression state (Dekker: store -> load) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (event_idx) {
        uint16_t event = ld16(q->mem + q->avail + 4 + 2u * q->size);
        COPIED();
        return (uint16_t)(next_used - event - 1) < (uint16_t)(next_used - signalled_used);
    }
    return !(ld16(q->mem + q->avail) & 1u); /* VRING_AVAIL_F_NO_INTERRUPT */
}
