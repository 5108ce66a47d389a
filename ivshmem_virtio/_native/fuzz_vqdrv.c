/* libFuzzer harness (ASan + UBSan) for the compiled driver-side queue: vqdrv.c's add, kick
 * decision, used-ring reap and blk completion check, against a device that writes anything.
 * Built and run by tests/fuzz/test_fuzz_frontpath.py; seeds in tests/fuzz/corpus/native_drv/.
 *
 * Input: 2 parameter bytes (flags: event-idx, interrupts suppressed, a second round; the
 * requests to add, 1..8, and their kinds: read, write, flush), then bytes the device writes
 * over the start of the section from offset 0x80 (the avail ring it may scribble on, the used
 * ring, used elements, status bytes and returned data). The section is a heap block of exactly
 * its size: any access past it is an ASan report. After every reap the driver's private state
 * must still be a partition of the descriptors (free list + chains in flight), and a
 * completion never reports more bytes than its request's buffer holds.
 * At exit: "fuzz_vqdrv: N execs, M reached 'completed'" (M: inputs with a completion taken).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vqdrv.c"

#define MEMSZ 0x800u
#define QSIZE 8u
#define DESC 0x0u
#define AVAIL 0x80u
#define USED 0xA0u
#define BOUNCE 0x100u /* 8 bounce buffers of 0xC0 bytes: header, status, 64 data bytes */
#define IN_LEN 64u

static uint8_t *mem;
static unsigned long execs, deep;
static uint16_t fl[QSIZE], lk[QSIZE], ct[QSIZE];

static void report(void)
{
    printf("fuzz_vqdrv: %lu execs, %lu reached 'completed'\n", execs, deep);
}

static void check_partition(const struct vqd *q)
{
    uint8_t seen[QSIZE] = {0};
    unsigned total = q->nfree;
    if (q->nfree > QSIZE)
        abort();
    for (unsigned i = 0; i < q->nfree; i++) {
        if (fl[i] >= QSIZE || seen[fl[i]]++)
            abort(); /* a descriptor twice on the free list, or out of range */
    }
    for (unsigned h = 0; h < QSIZE; h++) {
        uint16_t d = (uint16_t)h;
        if (!ct[h])
            continue;
        total += ct[h];
        for (unsigned i = 0; i < ct[h]; i++) {
            if (d >= QSIZE || seen[d]++)
                abort(); /* a chain shares a descriptor with the free list or another chain */
            d = lk[d];
        }
    }
    if (total != QSIZE)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vqd q = {0};
    uint64_t base_of[QSIZE] = {0};
    uint32_t type_of[QSIZE] = {0}, in_of[QSIZE] = {0};
    uint8_t flags, nreq;
    int completed = 0;
    static const uint8_t payload[32] = {1, 2, 3};

    if (!mem) {
        mem = malloc(MEMSZ);
        atexit(report);
    }
    execs++;
    if (size < 2)
        return 0;
    flags = data[0];
    nreq = (uint8_t)(1 + (data[1] & 7));
    data += 2;
    size -= 2;
    memset(mem, 0, MEMSZ);
    q.mem = mem;
    q.mem_size = MEMSZ;
    q.desc = DESC;
    q.avail = AVAIL;
    q.used = USED;
    q.size = QSIZE;
    q.event_idx = flags & 1;
    q.free = fl;
    q.link = lk;
    q.count = ct;
    vqd_init(&q);
    if (flags & 2)
        vqd_suppress(&q, 1);
    for (int round = 0; round < ((flags & 4) ? 2 : 1); round++) {
        for (unsigned i = 0; i < nreq; i++) {
            struct vqd_seg segs[3];
            unsigned nout, nin;
            uint16_t head;
            uint32_t kind = (uint32_t)((flags >> 3) + i) % 3; /* read, write, flush */
            uint32_t type = kind == 0 ? 0 : kind == 1 ? 1 : 4;
            uint64_t base = BOUNCE + 0xC0u * (i % QSIZE);
            uint32_t in_len = kind == 0 ? IN_LEN : 0;
            if (!vqd_blk_place(&q, base, type, i, kind == 1 ? payload : NULL,
                               kind == 1 ? sizeof payload : 0, in_len, segs, &nout, &nin))
                abort(); /* inside by construction */
            if (vqd_add(&q, segs, nout, nin, &head) != VQD_OK)
                break; /* full: fine */
            base_of[head] = base;
            type_of[head] = type;
            in_of[head] = in_len;
        }
        check_partition(&q);
        (void)vqd_kick_needed(&q);
        /* the device writes whatever it likes after the descriptor table */
        if (size) {
            size_t n = size < MEMSZ - AVAIL ? size : MEMSZ - AVAIL;
            memcpy(mem + AVAIL, data, n);
        }
        (void)vqd_wait_used(&q, 0); /* a deadline already past: one look */
        {
            unsigned n, in_flight;
            if (vqd_used_count(&q, &n, &in_flight) == VQD_OK) {
                if (n > in_flight)
                    abort();
                for (unsigned i = 0; i < n; i++) {
                    uint32_t id, len, got;
                    if (vqd_pop_used(&q, &id, &len) != VQD_OK)
                        break;
                    if (id >= QSIZE)
                        abort(); /* only a chain in flight is taken */
                    completed = 1;
                    (void)vqd_blk_status(&q, base_of[id], len, in_of[id], type_of[id], &got);
                    if (got > in_of[id])
                        abort();
                }
                vqd_rearm(&q);
            }
        }
        check_partition(&q);
    }
    deep += completed;
    return 0;
}
