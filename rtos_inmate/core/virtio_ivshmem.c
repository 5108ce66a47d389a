/* SPDX-License-Identifier: MIT */
/* virtio_ivshmem.c - frontend transport of virtio over ivshmem; see virtio_ivshmem.h. */
#include "virtio_ivshmem.h"

#include "hal.h"
#include "shared_layout.h"
#include "util.h"

/* Busy checks of write_transaction before the idle hook starts to run. */
#define FAST_SPINS 256u
/* Hard cap on loop iterations of one wait, should the clock be stuck. */
#define MAX_WAIT_ITERATIONS 50000000u
/* Attempts to read a config that keeps changing. */
#define CONFIG_TRIES 1000u

static uint64_t feature_bit(unsigned int n)
{
	return (uint64_t)1u << n;
}

uint32_t vio_chunk_size(uint64_t rw_size)
{
	uint64_t c = rw_size / 4096u;
	uint32_t p = IVV_SMP_CACHE_BYTES;

	if (c < IVV_SMP_CACHE_BYTES)
		c = IVV_SMP_CACHE_BYTES;
	if (c > IVV_PAGE_SIZE)
		c = IVV_PAGE_SIZE;
	while (p < c)
		p <<= 1;
	return p;
}

static void idle(struct vio_dev *d)
{
	if (d->idle != NULL)
		d->idle(d->idle_ctx);
	else
		hal_delay_us(2);
}

int vio_init(struct vio_dev *d, const struct ivshmem_link *link, uint64_t timeout_ns,
	     void (*idle_fn)(void *ctx), void *idle_ctx)
{
	if (d == NULL || link == NULL || link->ops == NULL)
		return VIO_E_INVAL;
	util_memset(d, 0, sizeof(*d));
	if (link->id > 1u || link->max_peers != 2u) {
		hal_log("virtio-ivshmem: a virtio link has 2 peers and ID 0 or 1 (got ID %u of %u)",
			(unsigned int)link->id, (unsigned int)link->max_peers);
		return VIO_E_INVAL;
	}
	if (link->rw.base == NULL || link->rw.size < 2u * IVV_PAGE_SIZE) {
		hal_log("virtio-ivshmem: R/W section of %zu bytes, need at least two pages",
			link->rw.size);
		return VIO_E_INVAL;
	}
	if (link->vectors == 0u || link->vectors > IVL_MAX_VECTORS)
		return VIO_E_INVAL;
	d->link = link;
	d->rw = link->rw;
	if (d->rw.size > 0xFFFFFFFFu)
		d->rw.size = 0xFFFFFFFFu; /* ring and buffer addresses are 32-bit here */
	d->peer = ivl_peer_id(link);
	d->timeout_ns = timeout_ns != 0u ? timeout_ns : VIO_DEFAULT_TIMEOUT_NS;
	d->idle = idle_fn;
	d->idle_ctx = idle_ctx;
	return VIO_OK;
}

bool vio_backend_ready(const struct vio_dev *d)
{
	return ivl_peer_state(d->link, d->peer) == IVV_STATE_READY;
}

/* ---- allocator (3.7) ------------------------------------------------------ */

static bool chunk_used(const struct vio_dev *d, uint32_t i)
{
	return (d->bitmap[i / 32u] >> (i % 32u)) & 1u;
}

static void chunk_mark(struct vio_dev *d, uint32_t i)
{
	d->bitmap[i / 32u] |= 1u << (i % 32u);
}

static void reset_allocator(struct vio_dev *d)
{
	uint64_t n;

	util_memset(d->bitmap, 0, sizeof(d->bitmap));
	d->chunk = vio_chunk_size(d->rw.size);
	n = d->rw.size / d->chunk;
	d->nchunks = n > VIO_MAX_CHUNKS ? VIO_MAX_CHUNKS : (uint32_t)n;
	d->header_chunks = (d->header_size + d->chunk - 1u) / d->chunk;
	for (uint32_t i = 0; i < d->header_chunks && i < d->nchunks; i++)
		chunk_mark(d, i);
}

int vio_alloc(struct vio_dev *d, uint32_t bytes, uint32_t *off)
{
	uint32_t chunks, n = 1;

	if (d == NULL || off == NULL || bytes == 0u || !d->probed)
		return VIO_E_INVAL;
	chunks = (uint32_t)(((uint64_t)bytes + d->chunk - 1u) / d->chunk);
	while (n < chunks && n <= d->nchunks)
		n <<= 1;
	if (n > d->nchunks)
		return VIO_E_NOMEM;
	/* first fit over naturally aligned regions, as bitmap_find_free_region */
	for (uint32_t first = 0; first + n <= d->nchunks; first += n) {
		bool free_run = true;

		for (uint32_t i = first; i < first + n; i++) {
			if (chunk_used(d, i)) {
				free_run = false;
				break;
			}
		}
		if (!free_run)
			continue;
		for (uint32_t i = first; i < first + n; i++)
			chunk_mark(d, i);
		*off = first * d->chunk;
		return VIO_OK;
	}
	return VIO_E_NOMEM;
}

/* ---- probe, leave ---------------------------------------------------------- */

static void forget_queues(struct vio_dev *d)
{
	for (uint32_t i = 0; i < VIO_MAX_QUEUES; i++)
		d->q[i].live = false;
}

int vio_probe(struct vio_dev *d)
{
	uint32_t rev, size;

	if (d == NULL || d->link == NULL)
		return VIO_E_INVAL;
	if (!vio_backend_ready(d))
		return VIO_E_GONE;
	rev = shm_ld32(&d->rw, IVV_HDR_REVISION);
	size = shm_ld32(&d->rw, IVV_HDR_SIZE);
	if (rev < 1u || size < IVV_HDR_CONFIG || size > d->rw.size / 2u) {
		d->stats.proto_errors++;
		hal_log("virtio-ivshmem: impossible backend header (revision %u, size %u)",
			(unsigned int)rev, (unsigned int)size);
		return VIO_E_PROTO;
	}
	d->header_size = size;
	d->features = 0;
	d->device_features = 0;
	forget_queues(d);
	reset_allocator(d);
	d->probed = true;
	ivl_set_state(d->link, IVV_STATE_READY);
	d->stats.probes++;
	return VIO_OK;
}

void vio_leave(struct vio_dev *d)
{
	if (d == NULL || d->link == NULL)
		return;
	forget_queues(d);
	d->probed = false;
	ivl_set_state(d->link, IVV_STATE_RESET);
}

/* ---- transactions (3.3) ---------------------------------------------------- */

static int wait_idle(struct vio_dev *d)
{
	uint64_t start = hal_now_ns();

	for (uint32_t spins = 0; spins < MAX_WAIT_ITERATIONS; spins++) {
		if (shm_ld32(&d->rw, IVV_HDR_WRITE_TRANSACTION) == 0u)
			return VIO_OK;
		if (!vio_backend_ready(d)) {
			d->stats.backend_lost++;
			return VIO_E_GONE;
		}
		if (spins < FAST_SPINS)
			continue;
		if (hal_now_ns() - start > d->timeout_ns)
			break;
		idle(d);
	}
	d->stats.timeouts++;
	hal_log("virtio-ivshmem: backend does not answer transactions");
	return VIO_E_TIMEOUT;
}

int vio_write(struct vio_dev *d, uint32_t off, unsigned int size, uint64_t value)
{
	int rc;

	if (d == NULL || !d->probed || off == 0u ||
	    (size != 1u && size != 2u && size != 4u && size != 8u) || off % size != 0u ||
	    (uint64_t)off + size > d->header_size)
		return VIO_E_INVAL;
	rc = wait_idle(d);
	if (rc != VIO_OK)
		return rc;
	switch (size) {
	case 1:
		shm_st8(&d->rw, off, (uint8_t)value);
		break;
	case 2:
		shm_st16(&d->rw, off, (uint16_t)value);
		break;
	case 4:
		shm_st32(&d->rw, off, (uint32_t)value);
		break;
	default:
		shm_st64(&d->rw, off, value);
		break;
	}
	shm_fence(); /* the field before the transaction */
	shm_st32(&d->rw, IVV_HDR_WRITE_TRANSACTION, off);
	shm_fence(); /* the transaction before the doorbell */
	ivl_doorbell(d->link, d->peer, 0);
	d->stats.transactions++;
	return wait_idle(d);
}

uint8_t vio_status(const struct vio_dev *d)
{
	return (uint8_t)(shm_ld32(&d->rw, IVV_HDR_DEVICE_STATUS) & 0xFFu);
}

static int set_status(struct vio_dev *d, uint8_t status)
{
	return vio_write(d, IVV_HDR_DEVICE_STATUS, 4, status);
}

int vio_reset(struct vio_dev *d)
{
	int rc;

	if (d == NULL || !d->probed)
		return VIO_E_INVAL;
	forget_queues(d);
	reset_allocator(d);
	d->features = 0;
	rc = set_status(d, 0);
	if (rc == VIO_OK)
		d->stats.resets++;
	return rc;
}

int vio_negotiate(struct vio_dev *d, uint64_t wanted)
{
	const uint8_t ack = IVV_STATUS_ACKNOWLEDGE;
	const uint8_t drv = IVV_STATUS_ACKNOWLEDGE | IVV_STATUS_DRIVER;
	const uint8_t fok = IVV_STATUS_ACKNOWLEDGE | IVV_STATUS_DRIVER | IVV_STATUS_FEATURES_OK;
	uint64_t feats;
	uint32_t lo, hi;
	int rc;

	rc = vio_reset(d);
	if (rc == VIO_OK)
		rc = set_status(d, ack);
	if (rc == VIO_OK)
		rc = set_status(d, drv);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_DEVICE_FEATURES_SEL, 4, 1);
	if (rc != VIO_OK)
		return rc;
	hi = shm_ld32(&d->rw, IVV_HDR_DEVICE_FEATURES);
	rc = vio_write(d, IVV_HDR_DEVICE_FEATURES_SEL, 4, 0);
	if (rc != VIO_OK)
		return rc;
	lo = shm_ld32(&d->rw, IVV_HDR_DEVICE_FEATURES);
	d->device_features = (uint64_t)hi << 32 | lo;
	if (!(d->device_features & feature_bit(IVV_F_VERSION_1))) {
		hal_log("virtio-ivshmem: device does not offer VERSION_1 (features 0x%llx)",
			(unsigned long long)d->device_features);
		return VIO_E_FEATURES;
	}
	feats = (wanted | feature_bit(IVV_F_VERSION_1) | feature_bit(IVV_F_ACCESS_PLATFORM) |
		 feature_bit(IVV_F_ORDER_PLATFORM)) &
		d->device_features;
	rc = vio_write(d, IVV_HDR_DRIVER_FEATURES_SEL, 4, 1);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_DRIVER_FEATURES, 4, feats >> 32);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_DRIVER_FEATURES_SEL, 4, 0);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_DRIVER_FEATURES, 4, feats & 0xFFFFFFFFu);
	if (rc == VIO_OK)
		rc = set_status(d, fok);
	if (rc != VIO_OK)
		return rc;
	uint8_t st = vio_status(d);

	if (!(st & IVV_STATUS_FEATURES_OK) || (st & IVV_STATUS_NEEDS_RESET)) {
		hal_log("virtio-ivshmem: device refused features 0x%llx (status 0x%02x)",
			(unsigned long long)feats, (unsigned int)st);
		return VIO_E_FEATURES;
	}
	d->features = feats;
	return VIO_OK;
}

/* ---- queues ------------------------------------------------------------------ */

static uint16_t driver_vector(const struct vio_dev *d, uint16_t index, uint16_t nqueues)
{
	uint32_t vectors = d->link->vectors;

	if (vectors >= 1u + (uint32_t)nqueues)
		return (uint16_t)(index + 1u);
	return vectors >= 2u ? 1u : 0u;
}

int vio_setup_queue(struct vio_dev *d, uint16_t index, uint16_t nqueues, uint16_t want,
		    struct vio_queue **out)
{
	struct vio_queue *q;
	uint16_t max, enabled, dev_vector;
	uint32_t size = 1, base = 0, a, u;
	int rc;

	if (d == NULL || out == NULL || !d->probed || index >= VIO_MAX_QUEUES || want == 0u)
		return VIO_E_INVAL;
	q = &d->q[index];
	q->live = false;
	rc = vio_write(d, IVV_HDR_QUEUE_SEL, 4, index);
	if (rc != VIO_OK)
		return rc;
	max = shm_ld16(&d->rw, IVV_HDR_QUEUE_SIZE);
	enabled = shm_ld16(&d->rw, IVV_HDR_QUEUE_ENABLE);
	dev_vector = shm_ld16(&d->rw, IVV_HDR_QUEUE_DEVICE_VECTOR);
	if (max == 0u || enabled != 0u) {
		d->stats.proto_errors++;
		hal_log("virtio-ivshmem: queue %u %s", (unsigned int)index,
			max == 0u ? "does not exist" : "is already enabled");
		return VIO_E_PROTO;
	}
	if (dev_vector >= d->link->vectors) {
		/* Jailhouse would drop such kicks: use vector 0, which every backend scans */
		d->stats.proto_errors++;
		hal_log("virtio-ivshmem: queue %u asks for kick vector %u of %u; using 0",
			(unsigned int)index, (unsigned int)dev_vector, (unsigned int)d->link->vectors);
		dev_vector = 0;
	}
	while (size * 2u <= want && size * 2u <= max && size * 2u <= VQ_MAX_SIZE)
		size *= 2u;
	for (;;) {
		rc = vio_alloc(d, vq_ring_bytes(size, IVV_VRING_ALIGN), &base);
		if (rc == VIO_OK)
			break;
		if (rc != VIO_E_NOMEM || size == 1u)
			return rc;
		size /= 2u; /* allowed to shrink when memory is short, as Linux */
	}
	vq_ring_layout(size, IVV_VRING_ALIGN, &a, &u);
	if (vq_init(&q->vq, &d->rw, (uint16_t)size, base, base + a, base + u) != VQ_OK)
		return VIO_E_INVAL;
	q->index = index;
	q->device_vector = dev_vector;
	q->driver_vector = driver_vector(d, index, nqueues);
	rc = vio_write(d, IVV_HDR_QUEUE_SIZE, 2, size);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_QUEUE_DRIVER_VECTOR, 2, q->driver_vector);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_QUEUE_DESC, 8, base);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_QUEUE_DRIVER, 8, (uint64_t)base + a);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_QUEUE_DEVICE, 8, (uint64_t)base + u);
	if (rc == VIO_OK)
		rc = vio_write(d, IVV_HDR_QUEUE_ENABLE, 2, 1);
	if (rc != VIO_OK)
		return rc;
	if (shm_ld16(&d->rw, IVV_HDR_QUEUE_ENABLE) != 1u ||
	    (vio_status(d) & IVV_STATUS_NEEDS_RESET)) {
		hal_log("virtio-ivshmem: device refused queue %u", (unsigned int)index);
		return VIO_E_REFUSED;
	}
	q->live = true;
	*out = q;
	return VIO_OK;
}

int vio_driver_ok(struct vio_dev *d)
{
	int rc;

	if (d == NULL || !d->probed)
		return VIO_E_INVAL;
	ivl_set_int_control(d->link, true);
	rc = set_status(d, IVV_STATUS_LIVE);
	if (rc != VIO_OK)
		return rc;
	if ((vio_status(d) & (IVV_STATUS_LIVE | IVV_STATUS_NEEDS_RESET)) != IVV_STATUS_LIVE)
		return VIO_E_REFUSED;
	return VIO_OK;
}

void vio_kick(const struct vio_dev *d, const struct vio_queue *q)
{
	if (d != NULL && q != NULL && q->live)
		ivl_doorbell(d->link, d->peer, q->device_vector);
}

unsigned int vio_check(struct vio_dev *d)
{
	unsigned int ev = 0;

	if (!vio_backend_ready(d))
		ev |= VIO_EV_LOST;
	if (!d->probed)
		return ev;
	if (shm_ld8(&d->rw, IVV_HDR_CONFIG_EVENT) != 0u) {
		shm_st8(&d->rw, IVV_HDR_CONFIG_EVENT, 0);
		d->stats.config_events++;
		ev |= VIO_EV_CONFIG;
	}
	if (shm_ld8(&d->rw, IVV_HDR_QUEUE_EVENT) != 0u) {
		shm_st8(&d->rw, IVV_HDR_QUEUE_EVENT, 0);
		ev |= VIO_EV_QUEUE;
	}
	if (vio_status(d) & IVV_STATUS_NEEDS_RESET)
		ev |= VIO_EV_NEEDS_RESET;
	return ev;
}

int vio_read_config(struct vio_dev *d, uint32_t off, void *buf, uint32_t len)
{
	if (d == NULL || buf == NULL || !d->probed || len == 0u ||
	    (uint64_t)IVV_HDR_CONFIG + off + len > d->header_size)
		return VIO_E_INVAL;
	for (uint32_t i = 0; i < CONFIG_TRIES; i++) {
		uint32_t gen = shm_ld32(&d->rw, IVV_HDR_CONFIG_GENERATION);

		if (gen & 1u)
			continue; /* the backend is updating it */
		shm_fence_acquire();
		shm_read(&d->rw, IVV_HDR_CONFIG + off, buf, len);
		shm_fence_acquire();
		if (shm_ld32(&d->rw, IVV_HDR_CONFIG_GENERATION) == gen)
			return VIO_OK;
	}
	d->stats.proto_errors++;
	return VIO_E_PROTO;
}

const char *vio_strerror(int rc)
{
	switch (rc) {
	case VIO_OK:
		return "ok";
	case VIO_E_INVAL:
		return "invalid argument";
	case VIO_E_GONE:
		return "backend left READY";
	case VIO_E_TIMEOUT:
		return "backend does not answer";
	case VIO_E_PROTO:
		return "impossible backend header";
	case VIO_E_NOMEM:
		return "shared memory is full";
	case VIO_E_FEATURES:
		return "features refused";
	case VIO_E_REFUSED:
		return "device refused the setup";
	default:
		return "unknown error";
	}
}
