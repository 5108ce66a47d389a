/* Compiled driver side of a split virtqueue, and the virtio-blk frontend's request layout.
 *
 * Plain C with no Python in it, so the extension module (_frontpath.c) and a fuzz harness call
 * the very same functions on shared memory or on a fuzzer's buffer. The reference is the Python
 * DriverQueue (ivshmem_virtio/virtqueue/driver.py) and BlkClient._place/on_used
 * (ivshmem_virtio/frontend/blk.py): same descriptor choice, same ring writes, same checks of
 * what the device writes (a used element naming a descriptor not in flight, a used index
 * running ahead of what is in flight), same event-idx decisions.
 */
#ifndef IVSHMEM_VIRTIO_VQDRV_H
#define IVSHMEM_VIRTIO_VQDRV_H

#include <stddef.h>
#include <stdint.h>

#define VQD_MAX_QUEUE_SIZE 32768u
#define VQD_INDIRECT_MIN 4u /* longer chains go through an indirect table (INDIRECT_MIN) */

/* One queue owned by the driver. The private state (free list, chains) is never kept in the
 * shared table: a device scribbling over descriptors cannot corrupt it. */
struct vqd {
    uint8_t *mem; /* the R/W section */
    uint64_t mem_size;
    uint64_t desc, avail, used; /* offsets of the three areas, checked at setup */
    uint32_t size;              /* power of two, <= VQD_MAX_QUEUE_SIZE */
    int event_idx;
    uint16_t avail_idx, kicked_idx, last_used;
    int interrupts_on;
    uint32_t nfree;
    uint16_t *free;  /* [size], a stack: free[nfree - 1] is taken first */
    uint16_t *link;  /* [size], the next descriptor of a chain, as we wrote it */
    uint16_t *count; /* [size], per head: descriptors the chain took, 0: not in flight */
};

struct vqd_seg {
    uint64_t addr;
    uint32_t len;
};

enum { VQD_OK = 0, VQD_FULL = 1, VQD_BAD_USED_IDX = 2, VQD_BAD_USED_ID = 3 };

/* A fresh queue: the three areas zeroed, every descriptor free. The arrays are the caller's. */
void vqd_init(struct vqd *q);

/* DriverQueue.add, direct chain: `nout` readable then `nin` writable segments. VQD_FULL when
 * fewer than nout + nin descriptors are free (nothing written then). */
int vqd_add(struct vqd *q, const struct vqd_seg *segs, unsigned nout, unsigned nin,
            uint16_t *head);

/* DriverQueue._add_indirect once the caller allocated `table` (16 bytes per segment, inside
 * the section, checked by the caller): the table, then one descriptor pointing at it. */
int vqd_add_indirect(struct vqd *q, uint64_t table, const struct vqd_seg *segs, unsigned nout,
                     unsigned nin, uint16_t *head);

/* DriverQueue.kick_needed: full fence, then the event-idx (or NO_NOTIFY) decision. */
int vqd_kick_needed(struct vqd *q);

int vqd_has_used(const struct vqd *q);

/* Spin until the device published a used entry or CLOCK_MONOTONIC passes `deadline_ns`;
 * 1 when there is one. Reads only used->idx (no state changes: safe without the GIL). */
int vqd_wait_used(const struct vqd *q, uint64_t deadline_ns);

/* The first half of DriverQueue.get_used: how many used entries there are, checked against
 * what is in flight (VQD_BAD_USED_IDX), followed by the acquire fence. */
int vqd_used_count(struct vqd *q, unsigned *n, unsigned *in_flight);

/* One used element: copied, then its id checked (VQD_BAD_USED_ID: not in flight; nothing
 * changed then), its chain back to the free list, last_used advanced. `*id` is the chain's
 * head (the id as the device wrote it). */
int vqd_pop_used(struct vqd *q, uint32_t *id, uint32_t *len);

/* The end of DriverQueue.get_used: used_event re-armed (or kept parked while suppressed). */
void vqd_rearm(struct vqd *q);

/* DriverQueue.suppress_interrupts. */
void vqd_suppress(struct vqd *q, int suppress);

/* BlkClient._place for a request whose data is one descriptor: the outhdr and a status byte
 * 0xFF (not answered) at `base`, the payload (if any) at base + 64; segs/nout/nin as _place
 * returns them. 0 when [base, base + 64 + n) is not inside the section. */
#define VQD_BLK_HDR 16u
#define VQD_BLK_DATA 64u
int vqd_blk_place(struct vqd *q, uint64_t base, uint32_t type, uint64_t sector,
                  const void *payload, uint32_t plen, uint32_t in_len, struct vqd_seg segs[3],
                  unsigned *nout, unsigned *nin);

/* BlkClient.on_used's check of a completion: the status byte, and how many data bytes the
 * device returned (`*n`, of `in_len`); a short read is IOERR. Returns the status. */
unsigned vqd_blk_status(const struct vqd *q, uint64_t base, uint32_t used_len, uint32_t in_len,
                        uint32_t type, uint32_t *n);

#endif
