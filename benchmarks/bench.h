/* Helpers shared by the C baselines (pingpong.c, minring.c). */
#ifndef IVSHMEM_VIRTIO_BENCH_H
#define IVSHMEM_VIRTIO_BENCH_H

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One doorbell: add 1 to an eventfd (the sim link's primitive). */
static inline void efd_put(int fd)
{
	uint64_t one = 1;
	if (write(fd, &one, sizeof one) != sizeof one) {
		perror("eventfd write");
		_exit(1);
	}
}

/* Wait for a doorbell: a blocking read of the eventfd. */
static inline void efd_take(int fd)
{
	uint64_t v;
	while (read(fd, &v, sizeof v) != sizeof v) {
		if (errno != EINTR) {
			perror("eventfd read");
			_exit(1);
		}
	}
}

/* Pin the calling process to CPU number ``which`` (0: the parent's, 1: the child's) of
 * IVSHMEM_BENCH_CPUS="A,B", set by the bench: two cells always run on two different CPUs, and
 * an unpinned pair may share one (a wake-up without an IPI, ~1.4 us instead of 4-11 here). */
static inline void pin_from_env(int which)
{
	const char *env = getenv("IVSHMEM_BENCH_CPUS");
	int cpu[2];
	if (!env || sscanf(env, "%d,%d", &cpu[0], &cpu[1]) != 2)
		return;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu[which], &set);
	if (sched_setaffinity(0, sizeof set, &set) != 0)
		perror("sched_setaffinity");
}

/* fork() for a two-process round trip: parent and child each on its CPU, the child killed
 * with its parent (it may be spinning). Returns the child's pid in the parent, 0 in the child;
 * exits on failure. */
static inline pid_t fork_pinned(void)
{
	pin_from_env(0);
	pid_t child = fork();
	if (child < 0) {
		perror("fork");
		exit(1);
	}
	if (child == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		pin_from_env(1);
		if (getppid() == 1) /* the parent died before PDEATHSIG was armed */
			_exit(1);
	}
	return child;
}

/* Reap the answering child, write the samples (native uint64 ns); the exit status of main. */
static inline int finish(pid_t child, const char *path, const uint64_t *lat, long rounds)
{
	int status = 0;
	waitpid(child, &status, 0);
	FILE *out = fopen(path, "wb");
	if (!out || fwrite(lat, sizeof *lat, (size_t)rounds, out) != (size_t)rounds || fclose(out)) {
		perror(path);
		return 1;
	}
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

#endif
