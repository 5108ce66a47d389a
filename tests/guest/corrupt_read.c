/* A planted fault for qemu-storage-daemon (tests/test_vhost_user_guest.py), loaded with
 * LD_PRELOAD: the first read of the image that covers byte GT_FAULT_OFFSET after a write covered
 * it gets that byte's lowest bit flipped in the caller's buffer. The image stays right; only the
 * guest's read-back can see the fault. Wraps what QEMU's file driver calls with aio=threads
 * (pread/pwrite for one buffer, preadv/pwritev for several; the 64-bit names are the same
 * functions on x86-64). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int written, done;

static long long target(void)
{
    const char *s = getenv("GT_FAULT_OFFSET");
    return s ? atoll(s) : -1;
}

static void saw_write(off_t off, ssize_t n)
{
    long long t = target();
    if (n > 0 && t >= off && t < off + n)
        __atomic_store_n(&written, 1, __ATOMIC_SEQ_CST);
}

static void maybe_corrupt(const struct iovec *iov, int cnt, off_t off, ssize_t n)
{
    long long t = target();
    if (n <= 0 || t < off || t >= off + n || !__atomic_load_n(&written, __ATOMIC_SEQ_CST))
        return;
    if (__atomic_exchange_n(&done, 1, __ATOMIC_SEQ_CST))
        return;
    long long at = t - off;
    for (int i = 0; i < cnt; i++) {
        if (at < (long long)iov[i].iov_len) {
            ((unsigned char *)iov[i].iov_base)[at] ^= 1;
            fprintf(stderr, "planted fault: flipped a bit of byte %lld in a read\n", t);
            return;
        }
        at -= (long long)iov[i].iov_len;
    }
}

#define REAL(name, type) static type real_##name; \
    if (!real_##name) real_##name = (type)dlsym(RTLD_NEXT, #name)

typedef ssize_t (*rw1_t)(int, void *, size_t, off_t);
typedef ssize_t (*w1_t)(int, const void *, size_t, off_t);
typedef ssize_t (*rwv_t)(int, const struct iovec *, int, off_t);

#define DEFINE(NAME)                                                                   \
ssize_t NAME(int fd, void *buf, size_t len, off_t off)                                 \
{                                                                                      \
    REAL(NAME, rw1_t);                                                                 \
    ssize_t n = real_##NAME(fd, buf, len, off);                                        \
    struct iovec one = {buf, len};                                                     \
    maybe_corrupt(&one, 1, off, n);                                                    \
    return n;                                                                          \
}
DEFINE(pread)
DEFINE(pread64)
#undef DEFINE

#define DEFINE(NAME)                                                                   \
ssize_t NAME(int fd, const void *buf, size_t len, off_t off)                           \
{                                                                                      \
    REAL(NAME, w1_t);                                                                  \
    ssize_t n = real_##NAME(fd, buf, len, off);                                        \
    saw_write(off, n);                                                                 \
    return n;                                                                          \
}
DEFINE(pwrite)
DEFINE(pwrite64)
#undef DEFINE

#define DEFINE(NAME, AFTER)                                                            \
ssize_t NAME(int fd, const struct iovec *iov, int cnt, off_t off)                      \
{                                                                                      \
    REAL(NAME, rwv_t);                                                                 \
    ssize_t n = real_##NAME(fd, iov, cnt, off);                                        \
    AFTER;                                                                             \
    return n;                                                                          \
}
DEFINE(preadv, maybe_corrupt(iov, cnt, off, n))
DEFINE(preadv64, maybe_corrupt(iov, cnt, off, n))
DEFINE(pwritev, saw_write(off, n))
DEFINE(pwritev64, saw_write(off, n))
