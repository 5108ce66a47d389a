/* Two-process ping-pong: the machine's floor for a cross-process round trip.
 *
 *   pingpong eventfd|spin ROUNDS WARMUP OUTFILE
 *
 * The parent pings, the forked child answers. "eventfd" blocks in read(2) on one eventfd per
 * direction (the sim link's doorbell primitive); "spin" busy-polls a sequence number in a shared
 * anonymous mapping (the polled-ring primitive). Every measured round trip is written to OUTFILE
 * as a native uint64 in nanoseconds. Built at run time by benchmarks/baselines.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"

struct flags {
	_Alignas(64) _Atomic uint64_t ping;
	_Alignas(64) _Atomic uint64_t pong;
};

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s eventfd|spin ROUNDS WARMUP OUTFILE\n", argv[0]);
		return 2;
	}
	int spin = strcmp(argv[1], "spin") == 0;
	if (!spin && strcmp(argv[1], "eventfd") != 0) {
		fprintf(stderr, "unknown mode %s\n", argv[1]);
		return 2;
	}
	long rounds = atol(argv[2]), warmup = atol(argv[3]);
	if (rounds <= 0 || warmup < 0)
		return 2;
	uint64_t *lat = calloc((size_t)rounds, sizeof *lat);
	int to_child = eventfd(0, EFD_CLOEXEC), to_parent = eventfd(0, EFD_CLOEXEC);
	struct flags *f = mmap(NULL, sizeof *f, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
			       -1, 0);
	if (!lat || to_child < 0 || to_parent < 0 || f == MAP_FAILED) {
		perror("setup");
		return 1;
	}
	long total = rounds + warmup;
	pid_t child = fork_pinned();
	if (child == 0) {
		for (long i = 1; i <= total; i++) {
			if (spin) {
				while (atomic_load_explicit(&f->ping, memory_order_acquire) != (uint64_t)i)
					;
				atomic_store_explicit(&f->pong, (uint64_t)i, memory_order_release);
			} else {
				efd_take(to_child);
				efd_put(to_parent);
			}
		}
		_exit(0);
	}
	for (long i = 1; i <= total; i++) {
		uint64_t t0 = now_ns();
		if (spin) {
			atomic_store_explicit(&f->ping, (uint64_t)i, memory_order_release);
			while (atomic_load_explicit(&f->pong, memory_order_acquire) != (uint64_t)i)
				;
		} else {
			efd_put(to_child);
			efd_take(to_parent);
		}
		uint64_t dt = now_ns() - t0;
		if (i > warmup)
			lat[i - warmup - 1] = dt;
	}
	return finish(child, argv[4], lat, rounds);
}
