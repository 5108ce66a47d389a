/* Compiled virtio-blk data path: device-side split-ring walk and the blk read/write fast path.
 *
 * Plain C with no Python in it, so the extension module (_fastpath.c) and the libFuzzer harness
 * (fuzz_vqblk.c) call the very same functions on shared memory or on a fuzzer's buffer.
 * The Python modules (ivshmem_virtio/virtqueue/device.py, backend/devices/blk.py) are the
 * reference: anything this code does not take on (an unusual layout, any error, other request
 * types) is left untouched for them, so they decide every case that is not the usual one.
 */
#ifndef IVSHMEM_VIRTIO_VQBLK_H
#define IVSHMEM_VIRTIO_VQBLK_H

#include <stddef.h>
#include <stdint.h>

#define VQ_MAX_QUEUE_SIZE 32768u
#define VQ_MAX_SEGS 4u       /* longer chains go to the Python walk */
#define VQ_MAX_INDIRECT 16u  /* larger indirect tables go to the Python walk */

/* One enabled queue over one shared section. The geometry was validated by the Python
 * DeviceQueue (validate_geometry) before an object of this kind is made; it stays fixed. */
struct vq {
    uint8_t *mem;       /* the R/W section */
    uint64_t mem_size;
    uint64_t desc, avail, used; /* offsets of the three areas */
    uint32_t size;      /* power of two, <= VQ_MAX_QUEUE_SIZE */
    int indirect;       /* VIRTIO_RING_F_INDIRECT_DESC negotiated */
};

struct vq_seg {
    uint64_t addr;
    uint32_t len;
};

/* A chain as the walk copied it: readable then writable segments, and whether a buffer lies
 * outside the section or a readable one follows a writable one (Chain.error in Python). */
struct vq_chain {
    uint16_t head;
    unsigned nr, nw;
    struct vq_seg r[VQ_MAX_SEGS], w[VQ_MAX_SEGS];
    int error;
};

enum { VQ_OK = 0, VQ_PYTHON = 1 };

/* Walk the chain at `head` (< size, checked by the caller). VQ_PYTHON when the chain breaks a
 * ring rule (the Python walk then raises the RingError) or is longer than this code keeps. */
int vq_walk(const struct vq *q, uint16_t head, struct vq_chain *c);

struct blk {
    int fd;              /* the image */
    int read_only;
    uint64_t capacity;   /* sectors */
    uint64_t max_data;   /* size_max * seg_max */
};

struct blk_counters {
    uint64_t read_count, read_bytes, write_count, write_bytes, io_fails;
};

/* Serve at most `limit` chains from the avail ring: every one that is the usual
 * three-descriptor read or write is walked, executed with preadv/pwritev straight on the
 * section, answered (status byte) and pushed to the used ring (not published). Stops at the
 * first chain that is anything else, leaving it unconsumed for the Python path, and sets
 * *stop = 1 then. With `until_ns` (CLOCK_MONOTONIC, 0 for none) it also stops after the
 * request that ends past that time (at least one is served), so that a runner serving several
 * devices can look at the others that often whatever the requests cost. *last_avail and
 * *next_used are the queue's indices, advanced here. Returns how many chains were served. */
unsigned blk_serve(const struct vq *q, const struct blk *b, uint16_t *last_avail,
                   uint16_t *next_used, unsigned limit, uint64_t until_ns,
                   struct blk_counters *cnt, int *stop);

enum { POLL_IDLE = 0, POLL_TIME, POLL_NOTIFY, POLL_STOP, POLL_WATCH, POLL_LIMIT };

/* A polling backend's turns without Python: until `until_ns` (CLOCK_MONOTONIC), spin on
 * avail->idx; whatever the driver makes available is served as blk_serve does and published as
 * vq_publish does (*signalled_used follows, as DeviceQueue.publish's). Returns how many chains
 * were served, and in *why what ends the poll: POLL_IDLE the deadline passed with the ring
 * empty; POLL_TIME it passed while serving (work may be left); POLL_NOTIFY the driver wants an
 * interrupt for what was published (the caller rings it); POLL_STOP the next chain is the
 * Python path's (or the avail index is broken: the Python walk raises); POLL_WATCH the u32 at
 * `watch_off` (the transport's write transaction, inside the section: checked by the caller)
 * is nonzero: the control path's turn; POLL_LIMIT `limit` chains were served. */
unsigned blk_poll(const struct vq *q, const struct blk *b, uint16_t *last_avail,
                  uint16_t *next_used, uint16_t *signalled_used, int event_idx, unsigned limit,
                  uint64_t until_ns, uint64_t watch_off, struct blk_counters *cnt, int *why);

/* How a worker rings the driver itself (DeviceTransport.notify_queue): the header's
 * queue_event byte at `event_off` (inside the section: checked by the caller) = 1, a full fence,
 * then 8 bytes to the eventfd `fd` (a simulated link) or `value` stored to the doorbell register
 * `reg` (a real one: ivshmem's MMIO page); neither (-1, NULL): the doorbell goes nowhere, as a
 * vector the link does not have goes nowhere on Jailhouse. */
struct ring {
    uint64_t event_off;
    int fd;
    volatile uint32_t *reg;
    uint32_t value;
};

/* A busy device's worker thread (backend/runner.py `_offload`): blk_poll in slices of
 * `slice_ns` until `until_ns`, ringing the driver whenever it wants an interrupt (`ring`), so a
 * whole stretch runs without Python and without the GIL. Between slices sched_yield() when
 * `yield` is set (another device of the daemon is active: on a CPU they share, its thread gets
 * in within a slice). Returns how many chains were served, *rung how many interrupts went out,
 * and in *why: POLL_IDLE a slice ended with the ring empty; POLL_STOP, POLL_WATCH as blk_poll;
 * POLL_TIME `until_ns` passed with work left. */
unsigned blk_run(const struct vq *q, const struct blk *b, uint16_t *last_avail,
                 uint16_t *next_used, uint16_t *signalled_used, int event_idx, uint64_t until_ns,
                 uint64_t slice_ns, uint64_t watch_off, const struct ring *ring, int yield,
                 struct blk_counters *cnt, int *why, unsigned *rung);

/* DeviceQueue.publish: store used->idx = next_used (after a release fence), then a full fence,
 * then the event-idx (or flags) decision. 1 when the driver wants an interrupt. */
int vq_publish(const struct vq *q, uint16_t next_used, uint16_t signalled_used, int event_idx);

#endif
