/* SPDX-License-Identifier: MIT */
/*
 * fuzz_virtio_can_rx.c - libFuzzer harness: the inmate's virtio-can RX path
 * (used ring -> parse_rx -> bridge -> MCP2515 TX) against a hostile device.
 *
 * The device side is played from the input, structure-aware: each completion
 * starts VALID (an id that is in flight, a frame Linux could send, used =
 * 16 + len) and a selector byte may then break one thing: msg_type, length,
 * flags, can_id, the used length or id, a duplicate completion, an index
 * jump, a stray byte.  So most inputs get past the virtqueue checks and the
 * parser is exercised on near-valid frames, not only on the first check.
 * The static functions of core/virtio_can.c are reached by including it.
 * "Deep" = at least one frame was handed to the bridge (rx_count).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/virtio_can.c"

void fuzz_chip_reset(void);
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define QSZ 8u
#define RING_DESC 0x000u
#define RING_AVAIL 0x100u
#define RING_USED 0x200u
#define POOL 0x1000u

static uint8_t shm[0x2000];
static unsigned long execs, deep, accepted, invalid, faults;

struct input {
	const uint8_t *p;
	size_t n, pos;
};

static uint8_t take(struct input *in)
{
	return in->pos < in->n ? in->p[in->pos++] : 0u;
}

static void report(void)
{
	printf("fuzz_virtio_can_rx: %lu execs, %lu reached 'frame accepted' (%.1f %%), "
	       "%lu frames, %lu rejected, %lu ring faults\n", execs, deep,
	       execs ? 100.0 * (double)deep / (double)execs : 0.0, accepted, invalid, faults);
	fflush(stdout);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	atexit(report);
	return 0;
}

/* One completion written by the "device": valid, then maybe one field broken. */
static void complete(struct vcan *vc, struct input *in, uint16_t *used_idx)
{
	struct virtqueue *vq = &vc->rxq->vq;
	uint8_t sel = take(in), x1 = take(in), x2 = take(in), x3 = take(in), x4 = take(in),
		x5 = take(in);
	uint32_t id = 0;
	unsigned int skip = x1 % QSZ;

	for (uint32_t k = 0, seen = 0; k < QSZ * 2u; k++) { /* the skip-th chain in flight */
		if (vq->chain_len[k % QSZ] != 0u && seen++ == skip) {
			id = k % QSZ;
			break;
		}
	}
	bool ext = (x1 & 0x10u) != 0u;
	bool rtr = (x1 & 0x20u) != 0u && vc->rtr;
	uint16_t len = (uint16_t)(rtr ? x2 % 16u : x2 % 9u);
	uint32_t can_id = ext ? (((uint32_t)x3 << 21) | ((uint32_t)x4 << 8) | x5) & 0x1FFFFFFFu
			      : (((uint32_t)x3 << 3) | (x4 & 7u)) & 0x7FFu;
	uint32_t flags = (ext ? IVV_CAN_FLAGS_EXTENDED : 0u) | (rtr ? IVV_CAN_FLAGS_RTR : 0u);
	uint8_t b[RX_STRIDE];
	uint32_t used = HDR + (rtr ? 0u : len);
	uint16_t type = IVV_CAN_MSG_RX;

	memset(b, 0, sizeof(b));
	for (unsigned int i = 0; i < 8u; i++)
		b[HDR + i] = (uint8_t)(x4 + 17u * i);
	if (sel >= 128u) {
		switch (sel & 15u) {
		case 0: type = (uint16_t)(x5 | (x4 << 8)); break;
		case 1: len = x5; break;
		case 2: flags |= 1u << (x5 % 32u); break;
		case 3: can_id = ((uint32_t)x4 << 24) | x5 | 0x800u; break;
		case 4: used = x5; break; /* beyond RX_LEN: a ring fault */
		case 5: used = used ? used - 1u : 0u; break; /* short payload */
		case 6: id = x5; break; /* an id never handed out */
		case 7: used = 0; break;
		case 8: *used_idx = (uint16_t)(*used_idx + x5); break; /* index jump */
		case 9: flags |= IVV_CAN_FLAGS_FD; break;
		case 10: len = 0xFFFFu; break;
		case 11: flags |= IVV_CAN_FLAGS_RTR; len = (uint16_t)(9u + x5 % 8u); break;
		default: b[x4 % RX_LEN] = x5; break;
		}
	}
	put16(&b[0], type);
	put16(&b[2], len);
	put32(&b[8], flags);
	put32(&b[12], can_id);
	if (id < QSZ && vq->chain_len[id] != 0u)
		memcpy(&shm[slot_off(&vc->rx, vq->cookie[id])], b, RX_LEN);
	size_t e = RING_USED + IVV_RING_USED_RING +
		   (size_t)IVV_RING_USED_ELEM_SIZE * (*used_idx & (QSZ - 1u));
	put32(&shm[e], id);
	put32(&shm[e + 4u], used);
	*used_idx = (uint16_t)(*used_idx + 1u);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct vcan vc;
	static struct bridge br;
	static struct vio_queue q;
	const struct bridge_config cfg = {
		.can = { .osc_hz = 16000000u, .bitrate = 500000u, .mode = MCP2515_MODE_NORMAL },
		.autostart = true,
	};
	struct input in = { data, size, 0 };
	bool rule_err;

	execs++;
	fuzz_chip_reset(); /* input-less chip: TX completes at the next status read */
	if (bridge_init(&br, &cfg, NULL, &rule_err) != 0)
		abort();
	memset(shm, 0, sizeof(shm));
	memset(&vc, 0, sizeof(vc));
	memset(&q, 0, sizeof(q));
	vc.br = &br;
	vc.rtr = (take(&in) & 1u) != 0u;
	vc.vio.rw.base = shm;
	vc.vio.rw.size = sizeof(shm);
	vc.rxq = &q;
	if (vq_init(&q.vq, &vc.vio.rw, QSZ, RING_DESC, RING_AVAIL, RING_USED) != VQ_OK)
		abort();
	slots_init(&vc.rx, POOL, RX_STRIDE, QSZ);
	for (unsigned int i = 0; i < QSZ; i++) {
		int slot = slot_get(&vc.rx);

		if (slot < 0 || !post_rx(&vc, (uint32_t)slot))
			abort();
	}
	uint16_t used_idx = 0;
	uint32_t before = vc.stats.rx_count;

	for (unsigned int round = 0; round < 16u && in.pos < in.n && !q.vq.broken; round++) {
		unsigned int k = take(&in) % (QSZ + 1u);

		for (unsigned int i = 0; i < k; i++)
			complete(&vc, &in, &used_idx);
		shm_st16(&vc.vio.rw, RING_USED + IVV_RING_USED_IDX, used_idx);
		(void)collect_rx(&vc);
		(void)bridge_poll(&br); /* the chip sends them: room for the next round */
	}
	/* frames the parser let through that the driver refused would be impossible frames */
	if (vc.stats.rx_send_fails != 0u) {
		fprintf(stderr, "parse_rx accepted a frame the MCP2515 driver refused\n");
		abort();
	}
	accepted += vc.stats.rx_count - before;
	invalid += vc.stats.rx_invalid;
	faults += q.vq.broken;
	if (vc.stats.rx_count != before)
		deep++;
	return 0;
}
