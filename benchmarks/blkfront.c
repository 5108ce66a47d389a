/* An independent blocking virtio-blk frontend: 512 B reads at QD1, as Linux's virtio_blk does
 * them over its virtio_ivshmem transport.
 *
 *   blkfront [-c CPU] [-s] [-w WARMUP_MS] [-t TIMEOUT_MS] SOCKET IMAGE ROUNDS WARMUP OUTFILE
 *
 * Joins the sim hub at SOCKET as the frontend (peer ID 1) and brings the virtio-blk device up with
 * the C inmate's transport and split ring (rtos_inmate/core: probe, features, one queue, DRIVER_OK),
 * so nothing of the Python frontend is involved. Then WARMUP reads (and at least WARMUP_MS of them),
 * followed by ROUNDS measured ones: write the request header (type IN, sector), make the chain
 * header / 512 B data / status available, kick when the device asks for it, and SLEEP on the link's
 * interrupt eventfds (poll) until the used index moves. An interrupt is only a hint: the used ring is
 * checked before every sleep and after every wake-up, and each wait is bounded by TIMEOUT_MS. With
 * -s it never sleeps: it spins on the used index and asks for no interrupts (a polling driver),
 * which leaves the backend's own share of a round trip as the only cost beyond a C ring (the
 * floor of the Python frontend's). Each answer's status and data are checked against IMAGE after
 * the clock stops. The round trips (from writing the header to having the data) go to OUTFILE as
 * native uint64 nanoseconds.
 *
 * Pinned to CPU (-c) or else to the first CPU of IVSHMEM_BENCH_CPUS, as the other C programs.
 * Exit status: 0 ok, 2 usage, 3 no device (hub, backend or bring-up), 4 device error (status,
 * broken ring, reset, timeout), 5 wrong data, 1 local failure. Errors are one line on stderr.
 * Built at run time by benchmarks/cfront.py, together with the rtos_inmate sources.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench.h"
#include "hal.h"
#include "shared_layout.h"
#include "simlink.h"
#include "virtio_ivshmem.h"

/* virtio 1.x 5.2: request types, status values, config offset */
#define BLK_T_IN 0u
#define BLK_S_OK 0u
#define BLK_CFG_CAPACITY 0u
#define SECTOR 512u
#define QUEUE_SIZE 16u
/* one request in the R/W section: header (16 B), status (1 B), then the data, 512-aligned */
#define REQ_HDR 0u
#define REQ_STATUS 16u
#define REQ_DATA 512u
#define REQ_BYTES 1024u

enum { EXIT_LOCAL = 1, EXIT_USAGE = 2, EXIT_NODEV = 3, EXIT_DEVICE = 4, EXIT_DATA = 5 };

/* The last message of the transport (hal_log), appended to our one error line. */
static char last_log[160];

/* The HAL the portable core needs besides the link: time, a short sleep, diagnostics. */
uint64_t hal_now_ns(void)
{
	return now_ns();
}

void hal_delay_us(uint32_t us)
{
	usleep(us);
}

void hal_log(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(last_log, sizeof last_log, fmt, ap);
	va_end(ap);
}

static void die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));

static void die(int code, const char *fmt, ...)
{
	va_list ap;

	fputs("blkfront: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	if (last_log[0])
		fprintf(stderr, " (%s)", last_log);
	fputc('\n', stderr);
	exit(code);
}

struct front {
	struct simlink sl;
	struct vio_dev dev;
	struct vio_queue *q;
	uint32_t req;      /* the request's offset in the R/W section */
	uint64_t timeout_ns;
	int spin;          /* -s: spin on the used ring instead of sleeping */
	uint64_t sleeps;   /* waits that blocked in the link */
	uint64_t irqs;     /* wake-ups with the queue's vector set */
};

/* Leave the device as Linux's remove does (reset, then STATE 0) and the hub; then die. */
static void fail(struct front *f, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4), noreturn));

static void fail(struct front *f, int code, const char *fmt, ...)
{
	char msg[256];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (f->dev.probed) {
		if (vio_backend_ready(&f->dev))
			(void)vio_reset(&f->dev);
		vio_leave(&f->dev);
	}
	simlink_close(&f->sl);
	die(code, "%s", msg);
}

static void bring_up(struct front *f, const char *sock, uint64_t *capacity)
{
	const struct ivshmem_link *l;
	int rc = simlink_open(&f->sl, sock, 1, (uint32_t)(f->timeout_ns / 1000000u));

	if (rc < 0)
		die(EXIT_NODEV, "cannot join the hub at %s: %s", sock, simlink_strerror(rc));
	l = &f->sl.link;
	if ((l->protocol & 0xC000u) != IVV_PROTO_VIRTIO_FRONT || (l->protocol & 0x3FFFu) != IVV_ID_BLOCK)
		fail(f, EXIT_NODEV, "link protocol 0x%04x is not a virtio-blk frontend (0x%04x)",
		     (unsigned int)l->protocol, (unsigned int)(IVV_PROTO_VIRTIO_FRONT | IVV_ID_BLOCK));
	rc = vio_init(&f->dev, l, f->timeout_ns, NULL, NULL);
	if (rc != VIO_OK)
		fail(f, EXIT_NODEV, "unusable link: %s", vio_strerror(rc));
	/* the backend may still be starting: wait for its READY (its STATE change rings vector 0) */
	uint64_t deadline = now_ns() + f->timeout_ns;

	while (!vio_backend_ready(&f->dev)) {
		uint64_t now = now_ns();

		if (now >= deadline)
			fail(f, EXIT_NODEV, "no backend on %s: peer 0 not READY within %llu ms", sock,
			     (unsigned long long)(f->timeout_ns / 1000000u));
		if (ivl_wait(l, deadline - now < 10000000u ? deadline - now : 10000000u) < 0)
			fail(f, EXIT_NODEV, "the link failed while waiting for the backend");
	}
	const char *step = "probe";

	rc = vio_probe(&f->dev);
	if (rc == VIO_OK) {
		step = "features";
		rc = vio_negotiate(&f->dev, 0); /* VERSION_1 (+ platform bits); no EVENT_IDX */
	}
	if (rc == VIO_OK) {
		step = "config";
		rc = vio_read_config(&f->dev, BLK_CFG_CAPACITY, capacity, sizeof *capacity);
	}
	if (rc == VIO_OK) {
		step = "queue";
		rc = vio_setup_queue(&f->dev, 0, 1, QUEUE_SIZE, &f->q);
	}
	if (rc == VIO_OK) {
		step = "buffers";
		rc = vio_alloc(&f->dev, REQ_BYTES, &f->req);
	}
	if (rc == VIO_OK) {
		step = "driver ok";
		rc = vio_driver_ok(&f->dev); /* INT_CONTROL 1, status 0xF */
	}
	if (rc != VIO_OK)
		fail(f, EXIT_NODEV, "bring-up failed at %s: %s", step, vio_strerror(rc));
	if (*capacity == 0)
		fail(f, EXIT_NODEV, "the device has no sectors");
}

/* Sleep until the request comes back: 1 with the cookie and length, or a vq_rc; fail()s on the rest. */
static int wait_used(struct front *f, uint32_t *cookie, uint32_t *len)
{
	const struct ivshmem_link *l = &f->sl.link;
	const int irq = 1 << f->q->driver_vector;
	uint64_t deadline = now_ns() + f->timeout_ns;

	for (;;) {
		int r = vq_get_used(&f->q->vq, cookie, len);

		if (r != 0)
			return r;
		unsigned int ev = vio_check(&f->dev);

		if (ev & VIO_EV_LOST)
			fail(f, EXIT_DEVICE, "the backend left READY with a request in flight");
		if (ev & VIO_EV_NEEDS_RESET)
			fail(f, EXIT_DEVICE, "the device set DEVICE_NEEDS_RESET");
		uint64_t now = now_ns();

		if (now >= deadline)
			fail(f, EXIT_DEVICE, "no completion within %llu ms",
			     (unsigned long long)(f->timeout_ns / 1000000u));
		if (f->spin)
			continue; /* the interrupts pile up in their eventfds: only hints */
		int m = ivl_wait(l, deadline - now);

		if (m < 0)
			fail(f, EXIT_DEVICE, "the link failed: %s", strerror(-m));
		f->sleeps++;
		if (m & irq)
			f->irqs++;
	}
}

/* One 512 B read of sector into out: the round trip in ns (status and data checked by caller). */
static uint64_t read_sector(struct front *f, uint64_t sector, uint32_t n, uint8_t *out,
			    uint8_t *status)
{
	const struct shm_region *rw = &f->dev.rw;
	const struct vq_buf hdr = { f->req + REQ_HDR, 16u };
	const struct vq_buf in[2] = { { f->req + REQ_DATA, SECTOR }, { f->req + REQ_STATUS, 1u } };
	uint32_t cookie, len;
	uint64_t t0 = now_ns();

	shm_st32(rw, f->req + REQ_HDR, BLK_T_IN);
	shm_st32(rw, f->req + REQ_HDR + 4u, 0u); /* reserved (ioprio) */
	shm_st64(rw, f->req + REQ_HDR + 8u, sector);
	shm_st8(rw, f->req + REQ_STATUS, 0xFFu); /* a device that never writes it is caught */
	int head = vq_add(&f->q->vq, &hdr, 1, in, 2, n);

	if (head < 0)
		fail(f, EXIT_DEVICE, "cannot queue the request: %d", head);
	if (vq_kick_needed(&f->q->vq))
		vio_kick(&f->dev, f->q);
	int r = wait_used(f, &cookie, &len);

	if (r < 0)
		fail(f, EXIT_DEVICE, "the device broke the ring: %s (0x%x)",
		     vq_fault_name(f->q->vq.fault), (unsigned int)f->q->vq.fault_value);
	if (cookie != n)
		fail(f, EXIT_DEVICE, "request %u answered as %u", (unsigned int)n, (unsigned int)cookie);
	shm_fence_acquire();
	*status = shm_ld8(rw, f->req + REQ_STATUS);
	shm_read(rw, f->req + REQ_DATA, out, SECTOR);
	return now_ns() - t0;
}

static long parse_num(const char *s, long max, const char *what)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0' || v < 0 || v > max)
		die(EXIT_USAGE, "bad %s: %s", what, s);
	return v;
}

static void pin_to(long cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET((int)cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set) != 0)
		die(EXIT_LOCAL, "cannot pin to CPU %ld: %s", cpu, strerror(errno));
}

int main(int argc, char **argv)
{
	static struct front f;
	long cpu = -1, warmup_ms = 0, timeout_ms = 5000;
	int opt, bad = 0;

	while (!bad && (opt = getopt(argc, argv, "c:sw:t:")) != -1) {
		if (opt == 's')
			f.spin = 1;
		else if (opt == 'c')
			cpu = parse_num(optarg, CPU_SETSIZE - 1, "CPU");
		else if (opt == 'w')
			warmup_ms = parse_num(optarg, 600000, "WARMUP_MS");
		else if (opt == 't')
			timeout_ms = parse_num(optarg, 600000, "TIMEOUT_MS");
		else
			bad = 1;
	}
	if (bad || argc - optind != 5 || timeout_ms == 0)
		die(EXIT_USAGE, "usage: %s [-c CPU] [-s] [-w WARMUP_MS] [-t TIMEOUT_MS] SOCKET IMAGE "
			"ROUNDS WARMUP OUTFILE", argv[0]);
	const char *sock = argv[optind], *image = argv[optind + 1], *outfile = argv[optind + 4];
	long rounds = parse_num(argv[optind + 2], 100000000, "ROUNDS");
	long warmup = parse_num(argv[optind + 3], 100000000, "WARMUP");
	int fd = open(image, O_RDONLY | O_CLOEXEC);
	struct stat st;

	if (rounds == 0)
		die(EXIT_USAGE, "ROUNDS must be at least 1");
	if (fd < 0 || fstat(fd, &st) != 0)
		die(EXIT_LOCAL, "%s: %s", image, strerror(errno));
	if (cpu >= 0)
		pin_to(cpu);
	else
		pin_from_env(0);
	uint64_t *lat = calloc((size_t)rounds, sizeof *lat);

	if (lat == NULL)
		die(EXIT_LOCAL, "out of memory for %ld samples", rounds);

	uint64_t capacity = 0;

	f.timeout_ns = (uint64_t)timeout_ms * 1000000u;
	bring_up(&f, sock, &capacity);
	if (f.spin) /* a polling driver asks for no interrupts (VRING_AVAIL_F_NO_INTERRUPT), as
		     * Linux's virtqueue_disable_cb: the backend then skips the doorbell */
		shm_st16(f.q->vq.mem, f.q->vq.avail, 1u);
	uint64_t sectors = (uint64_t)st.st_size / SECTOR;

	if (sectors > capacity)
		sectors = capacity; /* read what both have; a differing image shows in the data */
	if (sectors == 0)
		fail(&f, EXIT_LOCAL, "%s holds no whole sector", image);

	uint8_t got[SECTOR], want[SECTOR], status;
	uint64_t settle = now_ns() + (uint64_t)warmup_ms * 1000000u;
	long measured = 0;

	for (uint32_t n = 0; measured < rounds; n++) {
		uint64_t sector = ((uint64_t)n * 7919u) % sectors;
		uint64_t dt = read_sector(&f, sector, n, got, &status);

		if (status != BLK_S_OK)
			fail(&f, EXIT_DEVICE, "sector %llu: device status %u",
			     (unsigned long long)sector, (unsigned int)status);
		if (pread(fd, want, SECTOR, (off_t)(sector * SECTOR)) != (ssize_t)SECTOR)
			fail(&f, EXIT_LOCAL, "%s: cannot read sector %llu", image,
			     (unsigned long long)sector);
		if (memcmp(got, want, SECTOR) != 0)
			fail(&f, EXIT_DATA, "sector %llu: the device's data differ from %s",
			     (unsigned long long)sector, image);
		if ((long)n >= warmup && now_ns() >= settle)
			lat[measured++] = dt;
	}
	if (vio_reset(&f.dev) != VIO_OK)
		fail(&f, EXIT_DEVICE, "the device did not take the final reset");
	vio_leave(&f.dev);
	simlink_close(&f.sl);
	close(fd);

	FILE *out = fopen(outfile, "wb");

	if (!out || fwrite(lat, sizeof *lat, (size_t)rounds, out) != (size_t)rounds || fclose(out))
		die(EXIT_LOCAL, "%s: %s", outfile, strerror(errno));
	printf("blkfront: %ld reads of %u B at QD1, %llu sleeps, %llu queue interrupts, "
	       "%u kicks (warm-up included)\n", rounds, SECTOR, (unsigned long long)f.sleeps,
	       (unsigned long long)f.irqs, (unsigned int)f.q->vq.stats.kicks);
	free(lat);
	return 0;
}
