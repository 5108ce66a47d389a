/* libFuzzer harness (ASan + UBSan) for the compiled blk data path: vqblk.c's walk, blk parse,
 * used push and publish, on a fuzzer-written ring. Built and run by
 * tests/fuzz/test_fuzz_native.py; seeds in tests/fuzz/corpus/native_blk/.
 *
 * Input: 3 parameter bytes (flags: indirect, read-only, event-idx, a spent time slice, the
 * poll instead of serve; the batch limit; the queue size), then bytes laid over the start of the section (descriptor table, avail ring, used
 * ring, indirect tables, request headers); the data area after them starts zeroed. The section
 * (0x200 bytes: a short input keeps every mutation on a field that matters)
 * is a heap block of exactly its size, so any access past it is an ASan report. preadv and
 * pwritev are replaced by copies that first check the iovec lies inside the section (the
 * kernel's accesses are invisible to ASan) and then touch every byte of it.
 * At exit: "fuzz_vqblk: N execs, M reached 'served'" (M: inputs with a request served).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#define MEMSZ 0x2000u
#define IMGSZ 0x2000u
#define OVERLAY 0x200u

static uint8_t *mem;
static uint8_t image[IMGSZ];
static unsigned long execs, deep;

static void in_section(const struct iovec *iov, int n)
{
    for (int i = 0; i < n; i++) {
        const uint8_t *p = iov[i].iov_base;
        if (p < mem || iov[i].iov_len > MEMSZ || p + iov[i].iov_len > mem + MEMSZ) {
            fprintf(stderr, "iovec %p+%zu outside the section %p+%u\n", (const void *)p,
                    iov[i].iov_len, (void *)mem, MEMSZ);
            abort();
        }
    }
}

static ssize_t fuzz_preadv(int fd, const struct iovec *iov, int n, off_t off)
{
    (void)fd;
    in_section(iov, n);
    if (off < 0 || (uint64_t)off >= IMGSZ)
        return 0;
    size_t take = iov[0].iov_len < IMGSZ - (size_t)off ? iov[0].iov_len : IMGSZ - (size_t)off;
    memcpy(iov[0].iov_base, image + off, take);
    return (ssize_t)take; /* short past the image's end: the device answers IOERR */
}

static ssize_t fuzz_pwritev(int fd, const struct iovec *iov, int n, off_t off)
{
    (void)fd;
    in_section(iov, n);
    if (off < 0 || (uint64_t)off >= IMGSZ)
        return -1;
    size_t take = iov[0].iov_len < IMGSZ - (size_t)off ? iov[0].iov_len : IMGSZ - (size_t)off;
    memcpy(image + off, iov[0].iov_base, take);
    return (ssize_t)take;
}

#define VQ_PREADV fuzz_preadv
#define VQ_PWRITEV fuzz_pwritev
#include "vqblk.c"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void report(void)
{
    printf("fuzz_vqblk: %lu execs, %lu reached 'served'\n", execs, deep);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    mem = malloc(MEMSZ);
    if (!mem)
        abort();
    atexit(report);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct vq q;
    struct blk b = {.fd = 3, .capacity = IMGSZ / 512 + 2, .max_data = 0x1000};
    struct blk_counters cnt = {0};
    uint16_t last = 0, used = 0, last0, used0;
    unsigned limit, served;
    int stop;

    execs++;
    if (size < 3)
        return -1;
    q.mem = mem;
    q.mem_size = MEMSZ;
    q.indirect = data[0] & 1;
    b.read_only = (data[0] >> 1) & 1;
    limit = 1u + data[1] % 9u;
    q.size = 1u << (data[2] % 4u); /* 1..8 */
    q.desc = 0x000;
    q.avail = 0x080;
    q.used = 0x0A0;
    memset(mem, 0, MEMSZ);
    size -= 3;
    memcpy(mem, data + 3, size < OVERLAY ? size : OVERLAY);
    /* start from the avail index the input's used index says was reached: wrap-around */
    last = used = (uint16_t)(mem[0xA2] | mem[0xA3] << 8);
    for (int round = 0; round < 4; round++) {
        last0 = last;
        used0 = used;
        if ((data[0] >> 4) & 1u) {
            /* flag bit 4: the polling backend's blk_poll, its deadline already past (it
             * serves what is there once, then returns); the watched register is in the
             * fuzzer's bytes (0x1F0): nonzero hands the turn back before anything is served */
            uint16_t sig = used0;
            int why;
            served = blk_poll(&q, &b, &last, &used, &sig, (data[0] >> 2) & 1u, limit, 1u,
                              0x1F0u, &cnt, &why);
            if (why < POLL_IDLE || why > POLL_LIMIT || (why == POLL_WATCH && served)
                || (served && sig != used))
                abort();
            stop = why != POLL_TIME && why != POLL_LIMIT;
        } else {
            /* flag bit 3: a time slice already over (one request, then stop), as the
             * runner's */
            served = blk_serve(&q, &b, &last, &used, limit, (data[0] >> 3) & 1u, &cnt, &stop);
        }
        if (served > limit || (((data[0] >> 3) & 1u) && served > 1)
            || (uint16_t)(last - last0) != served
            || (uint16_t)(used - used0) != served)
            abort();
        if (served)
            deep++;
        (void)vq_publish(&q, used, used0, (data[0] >> 2) & 1);
        if (!served || stop)
            break;
    }
    return 0;
}
