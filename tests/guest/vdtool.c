/* vdtool: the guest side's helper for tests/test_vhost_user_guest.py, built static into the
 * guest's initramfs (tests/guest/build.py). busybox does the I/O (dd, blkdiscard, blockdev);
 * this does what busybox cannot:
 *
 *   vdtool pat SEED OFF LEN           the pattern bytes [OFF, OFF+LEN) of SEED to stdout
 *   vdtool chk OFF SEED:LEN...        stdin must be exactly those segments (seed 0: zeros,
 *                                     seed s: LEN bytes not checked)
 *   vdtool zero DEV OFF LEN           ioctl BLKZEROOUT (write-zeroes, no unmap; falls back to
 *                                     writing zero pages when the disk has no write-zeroes)
 *   vdtool punch DEV OFF LEN          fallocate PUNCH_HOLE: write-zeroes with unmap, no fallback
 *   vdtool wrfail DEV                 a write to DEV (read-only) must be refused
 *
 * The pattern is the one of tests/guest/pattern.py: byte OFF is byte OFF % 8 (little endian) of
 * splitmix64(SEED * 2^32 + OFF / 8), so every 8-byte word of the disk differs from every other,
 * under every seed, and a sector read from the wrong place never matches. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static uint64_t word(uint64_t seed, uint64_t index)
{
    uint64_t z = (seed << 32) + index + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static unsigned char pattern_byte(uint64_t seed, uint64_t off)
{
    if (seed == 0)
        return 0;
    return (unsigned char)(word(seed, off >> 3) >> (8 * (off & 7)));
}

static uint64_t num(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || end == s) {
        fprintf(stderr, "vdtool: not a number: %s\n", s);
        exit(2);
    }
    return v;
}

static void fill(unsigned char *buf, uint64_t seed, uint64_t off, size_t n)
{
    size_t i = 0;
    if (seed == 0) {
        memset(buf, 0, n);
        return;
    }
    for (; i < n && ((off + i) & 7); i++)
        buf[i] = pattern_byte(seed, off + i);
    for (; i + 8 <= n; i += 8) {
        uint64_t w = word(seed, (off + i) >> 3);
        memcpy(buf + i, &w, 8); /* x86: little endian, as the host's numpy '<u8' */
    }
    for (; i < n; i++)
        buf[i] = pattern_byte(seed, off + i);
}

enum { CHUNK = 1 << 16 };

static int cmd_pat(uint64_t seed, uint64_t off, uint64_t len)
{
    static unsigned char buf[CHUNK];
    while (len) {
        size_t n = len < CHUNK ? (size_t)len : CHUNK;
        fill(buf, seed, off, n);
        for (size_t done = 0; done < n;) {
            ssize_t w = write(1, buf + done, n - done);
            if (w < 0) {
                perror("vdtool pat: write");
                return 1;
            }
            done += (size_t)w;
        }
        off += n;
        len -= n;
    }
    return 0;
}

static size_t read_full(int fd, unsigned char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            perror("vdtool chk: read");
            exit(1);
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return got;
}

static int cmd_chk(uint64_t off, int nseg, char **segs)
{
    static unsigned char got[CHUNK], want[CHUNK];
    uint64_t start = off;
    for (int s = 0; s < nseg; s++) {
        char *colon = strchr(segs[s], ':');
        if (!colon) {
            fprintf(stderr, "vdtool chk: segment is SEED:LEN, not %s\n", segs[s]);
            return 2;
        }
        *colon = 0;
        int skip = !strcmp(segs[s], "s");
        uint64_t seed = skip ? 0 : num(segs[s]), len = num(colon + 1);
        while (len) {
            size_t n = len < CHUNK ? (size_t)len : CHUNK;
            size_t r = read_full(0, got, n);
            fill(want, seed, off, n);
            for (size_t i = 0; i < n; i++) {
                if (i >= r) {
                    printf("MISMATCH short read: %" PRIu64 " bytes from %" PRIu64 "\n",
                           off + i - start, start);
                    return 1;
                }
                if (!skip && got[i] != want[i]) {
                    printf("MISMATCH at byte %" PRIu64 " (seed %" PRIu64 "): got 0x%02x want "
                           "0x%02x\n", off + i, seed, got[i], want[i]);
                    return 1;
                }
            }
            off += n;
            len -= n;
        }
    }
    if (read_full(0, got, 1) != 0) {
        printf("MISMATCH more data than the %" PRIu64 " bytes expected\n", off - start);
        return 1;
    }
    return 0;
}

static int open_dev(const char *dev, int flags)
{
    int fd = open(dev, flags);
    if (fd < 0) {
        fprintf(stderr, "vdtool: open %s: %s\n", dev, strerror(errno));
        exit(1);
    }
    return fd;
}

static int cmd_zero(const char *dev, uint64_t off, uint64_t len)
{
    uint64_t range[2] = {off, len};
    int fd = open_dev(dev, O_RDWR);
    if (ioctl(fd, BLKZEROOUT, range) < 0) {
        printf("vdtool zero: BLKZEROOUT %" PRIu64 "+%" PRIu64 ": %s\n", off, len,
               strerror(errno));
        return 1;
    }
    return close(fd) < 0;
}

static int cmd_punch(const char *dev, uint64_t off, uint64_t len)
{
    int fd = open_dev(dev, O_RDWR);
    if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0) {
        printf("vdtool punch: fallocate %" PRIu64 "+%" PRIu64 ": %s\n", off, len,
               strerror(errno));
        return 1;
    }
    return close(fd) < 0;
}

static int cmd_wrfail(const char *dev)
{
    static unsigned char sector[512];
    int fd = open(dev, O_RDWR);
    if (fd < 0) {
        printf("vdtool wrfail: open %s for writing: %s (refused)\n", dev, strerror(errno));
        return 0;
    }
    /* Linux >= 5.x lets a read-only disk be opened for writing and refuses each write */
    ssize_t w = pwrite(fd, sector, sizeof sector, 0);
    if (w >= 0) {
        printf("vdtool wrfail: pwrite to read-only %s wrote %zd bytes\n", dev, w);
        return 1;
    }
    printf("vdtool wrfail: pwrite to %s: %s (refused)\n", dev, strerror(errno));
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 5 && !strcmp(argv[1], "pat"))
        return cmd_pat(num(argv[2]), num(argv[3]), num(argv[4]));
    if (argc >= 3 && !strcmp(argv[1], "chk"))
        return cmd_chk(num(argv[2]), argc - 3, argv + 3);
    if (argc == 5 && !strcmp(argv[1], "zero"))
        return cmd_zero(argv[2], num(argv[3]), num(argv[4]));
    if (argc == 5 && !strcmp(argv[1], "punch"))
        return cmd_punch(argv[2], num(argv[3]), num(argv[4]));
    if (argc == 3 && !strcmp(argv[1], "wrfail"))
        return cmd_wrfail(argv[2]);
    fprintf(stderr, "usage: vdtool pat|chk|zero|punch|wrfail ...\n");
    return 2;
}
