/* The bare-ring 512 B virtio-blk read of minring.py, in C: what a native data path would cost.
 *
 *   minring spin|eventfd IMAGE ROUNDS WARMUP OUTFILE
 *
 * Same protocol steps as minring.py, on the same layout (a split ring of 256 entries laid out as
 * Linux's vring_init with 4096 alignment, then header, data and status buffers): the parent as
 * driver writes the request header, three descriptors, the avail entry and avail->idx (release),
 * then waits; the forked child as device reads avail->idx (acquire), the entry, walks the chain,
 * preadv()s 512 B of IMAGE into the data buffer, writes status, the used element and used->idx
 * (release); the driver copies the data out. Waiting is a busy poll or one blocking eventfd per
 * direction. Each read is checked against IMAGE after the clock stops. Round trips go to OUTFILE
 * as native uint64 nanoseconds. Built at run time by benchmarks/baselines.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

#define QSIZE 256u
#define F_NEXT 1u
#define F_WRITE 2u

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s spin|eventfd IMAGE ROUNDS WARMUP OUTFILE\n", argv[0]);
		return 2;
	}
	int spin = strcmp(argv[1], "spin") == 0;
	if (!spin && strcmp(argv[1], "eventfd") != 0)
		return 2;
	long rounds = atol(argv[3]), warmup = atol(argv[4]);
	int fd = open(argv[2], O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (rounds <= 0 || warmup < 0 || fd < 0 || fstat(fd, &st) != 0 || st.st_size < 1024) {
		perror(argv[2]);
		return 2;
	}
	uint64_t sectors = (uint64_t)st.st_size / 512;

	/* layout: desc | avail (+ used_event) | pad to 4096 | used (+ avail_event) | hdr data status */
	const size_t desc_off = 0, avail_off = 16 * QSIZE;
	const size_t used_off = (avail_off + 4 + 2 * QSIZE + 2 + 4095) & ~(size_t)4095;
	const size_t hdr_off = (used_off + 4 + 8 * QSIZE + 2 + 63) & ~(size_t)63;
	const size_t data_off = hdr_off + 64, status_off = data_off + 4096;
	const size_t size = status_off + 64;
	uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	uint64_t *lat = calloc((size_t)rounds, sizeof *lat);
	int to_dev = eventfd(0, EFD_CLOEXEC), to_drv = eventfd(0, EFD_CLOEXEC);
	if (mem == MAP_FAILED || !lat || to_dev < 0 || to_drv < 0) {
		perror("setup");
		return 1;
	}
	struct desc *desc = (struct desc *)(mem + desc_off);
	_Atomic uint16_t *avail_idx = (_Atomic uint16_t *)(mem + avail_off + 2);
	uint16_t *avail_ring = (uint16_t *)(mem + avail_off + 4);
	_Atomic uint16_t *used_idx = (_Atomic uint16_t *)(mem + used_off + 2);
	uint32_t *used_ring = (uint32_t *)(mem + used_off + 4);
	long total = rounds + warmup;

	pid_t child = fork_pinned();
	if (child == 0) { /* the device */
		uint16_t last = 0;
		for (long r = 0; r < total; r++) {
			if (!spin)
				efd_take(to_dev);
			while (atomic_load_explicit(avail_idx, memory_order_acquire) == last)
				;
			uint16_t head = avail_ring[last % QSIZE];
			uint64_t addr[3];
			uint32_t len[3];
			unsigned n = 0;
			for (uint16_t i = head;; i = desc[i].next) { /* walk: shape not assumed */
				if (n == 3 || i >= QSIZE)
					_exit(1);
				addr[n] = desc[i].addr;
				len[n] = desc[i].len;
				n++;
				if (!(desc[i].flags & F_NEXT))
					break;
			}
			if (n != 3 || addr[0] + 16 > size || addr[1] + len[1] > size || addr[2] >= size)
				_exit(1);
			uint64_t sector;
			memcpy(&sector, mem + addr[0] + 8, sizeof sector);
			struct iovec iov = {mem + addr[1], len[1]};
			ssize_t got = preadv(fd, &iov, 1, (off_t)(sector * 512));
			mem[addr[2]] = got == (ssize_t)len[1] ? 0 : 1;
			used_ring[2 * (last % QSIZE)] = head;
			used_ring[2 * (last % QSIZE) + 1] = (uint32_t)got + 1;
			last++;
			atomic_store_explicit(used_idx, last, memory_order_release);
			if (!spin)
				efd_put(to_drv);
		}
		_exit(0);
	}

	uint8_t out[512], want[512];
	uint16_t idx = 0;
	for (long r = 0; r < total; r++) {
		uint64_t sector = (uint64_t)(r * 7919) % sectors;
		uint64_t t0 = now_ns();
		uint32_t hdr[2] = {0, 0}; /* type IN, reserved */
		memcpy(mem + hdr_off, hdr, sizeof hdr);
		memcpy(mem + hdr_off + 8, &sector, sizeof sector);
		desc[0] = (struct desc){hdr_off, 16, F_NEXT, 1};
		desc[1] = (struct desc){data_off, 512, F_NEXT | F_WRITE, 2};
		desc[2] = (struct desc){status_off, 1, F_WRITE, 0};
		avail_ring[idx % QSIZE] = 0;
		idx++;
		atomic_store_explicit(avail_idx, idx, memory_order_release);
		if (!spin) {
			efd_put(to_dev);
			efd_take(to_drv);
		}
		while (atomic_load_explicit(used_idx, memory_order_acquire) != idx)
			;
		int status = mem[status_off];
		memcpy(out, mem + data_off, sizeof out);
		uint64_t dt = now_ns() - t0;
		if (r >= warmup)
			lat[r - warmup] = dt;
		if (status != 0 || pread(fd, want, sizeof want, (off_t)(sector * 512)) != 512
		    || memcmp(out, want, sizeof out) != 0) {
			fprintf(stderr, "minring: wrong answer for sector %llu\n",
				(unsigned long long)sector);
			kill(child, SIGKILL);
			return 1;
		}
	}
	return finish(child, argv[5], lat, rounds);
}
