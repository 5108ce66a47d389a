/* SPDX-License-Identifier: MIT */
/* virtqueue.c - driver side of a split virtqueue; see virtqueue.h. */
#include "virtqueue.h"

#include "shared_layout.h"
#include "util.h"

#define DESC_OFF(vq, i) ((size_t)(vq)->desc + (size_t)IVV_RING_DESC_SIZE * (i))

static size_t avail_bytes(uint32_t n)
{
	return IVV_RING_AVAIL_RING + 2u * (size_t)n + 2u; /* + used_event */
}

static size_t used_bytes(uint32_t n)
{
	return IVV_RING_USED_RING + (size_t)IVV_RING_USED_ELEM_SIZE * n + 2u; /* + avail_event */
}

void vq_ring_layout(uint32_t n, uint32_t align, uint32_t *avail, uint32_t *used)
{
	uint32_t a = IVV_RING_DESC_SIZE * n;
	uint32_t end = a + (uint32_t)avail_bytes(n);

	if (align == 0u)
		align = 1u;
	*avail = a;
	*used = (end + align - 1u) / align * align;
}

uint32_t vq_ring_bytes(uint32_t n, uint32_t align)
{
	uint32_t a, u;

	vq_ring_layout(n, align, &a, &u);
	return u + (uint32_t)used_bytes(n);
}

int vq_init(struct virtqueue *vq, const struct shm_region *mem, uint16_t size, uint32_t desc,
	    uint32_t avail, uint32_t used)
{
	if (vq == NULL || mem == NULL || size == 0u || size > VQ_MAX_SIZE ||
	    (size & (size - 1u)) != 0u)
		return VQ_E_INVAL;
	if (desc % IVV_RING_DESC_ALIGN != 0u || avail % IVV_RING_AVAIL_ALIGN != 0u ||
	    used % IVV_RING_USED_ALIGN != 0u)
		return VQ_E_INVAL;
	if (!shm_contains(mem, desc, (uint64_t)IVV_RING_DESC_SIZE * size) ||
	    !shm_contains(mem, avail, avail_bytes(size)) || !shm_contains(mem, used, used_bytes(size)))
		return VQ_E_INVAL;
	util_memset(vq, 0, sizeof(*vq));
	vq->mem = mem;
	vq->size = size;
	vq->mask = (uint16_t)(size - 1u);
	vq->desc = desc;
	vq->avail = avail;
	vq->used = used;
	shm_zero(mem, desc, (size_t)IVV_RING_DESC_SIZE * size);
	shm_zero(mem, avail, avail_bytes(size));
	shm_zero(mem, used, used_bytes(size));
	for (uint32_t i = 0; i < size; i++)
		vq->next[i] = (uint16_t)((i + 1u) & vq->mask);
	vq->free_head = 0;
	vq->num_free = size;
	shm_fence();
	return VQ_OK;
}

static uint16_t pop_free(struct virtqueue *vq)
{
	uint16_t i = vq->free_head;

	vq->free_head = vq->next[i];
	vq->num_free--;
	return i;
}

int vq_add(struct virtqueue *vq, const struct vq_buf *out, unsigned int n_out,
	   const struct vq_buf *in, unsigned int n_in, uint32_t cookie)
{
	unsigned int total = n_out + n_in;
	uint16_t idx[VQ_MAX_CHAIN];
	uint32_t in_len = 0;

	if (vq == NULL || total == 0u || total > VQ_MAX_CHAIN || (n_out > 0u && out == NULL) ||
	    (n_in > 0u && in == NULL))
		return VQ_E_INVAL;
	if (vq->broken)
		return VQ_E_BROKEN;
	for (unsigned int i = 0; i < total; i++) {
		const struct vq_buf *b = i < n_out ? &out[i] : &in[i - n_out];

		if (b->len == 0u || !shm_contains(vq->mem, b->addr, b->len))
			return VQ_E_INVAL;
		if (i >= n_out)
			in_len += b->len;
	}
	if (vq->num_free < total)
		return VQ_E_FULL;
	for (unsigned int i = 0; i < total; i++)
		idx[i] = pop_free(vq);
	for (unsigned int i = 0; i < total; i++) {
		const struct vq_buf *b = i < n_out ? &out[i] : &in[i - n_out];
		uint16_t flags = i >= n_out ? (uint16_t)IVV_RING_DESC_F_WRITE : 0u;
		uint16_t nxt = 0;
		size_t d = DESC_OFF(vq, idx[i]);

		if (i + 1u < total) {
			flags |= IVV_RING_DESC_F_NEXT;
			nxt = idx[i + 1u];
		}
		vq->next[idx[i]] = nxt;
		shm_st64(vq->mem, d + 0u, b->addr);
		shm_st32(vq->mem, d + 8u, b->len);
		shm_st16(vq->mem, d + 12u, flags);
		shm_st16(vq->mem, d + 14u, nxt);
	}
	uint16_t head = idx[0];

	vq->chain_len[head] = (uint8_t)total;
	vq->in_len[head] = in_len;
	vq->cookie[head] = cookie;
	shm_st16(vq->mem, vq->avail + IVV_RING_AVAIL_RING + 2u * (size_t)(vq->avail_idx & vq->mask),
		 head);
	vq->avail_idx++;
	shm_fence(); /* descriptors and ring entry before avail->idx */
	shm_st16(vq->mem, vq->avail + IVV_RING_AVAIL_IDX, vq->avail_idx);
	vq->stats.added++;
	return head;
}

bool vq_kick_needed(struct virtqueue *vq)
{
	uint16_t old, flags;

	if (vq == NULL || vq->broken)
		return false;
	shm_fence(); /* avail->idx before reading the device's suppression flag */
	old = vq->kicked_idx;
	vq->kicked_idx = vq->avail_idx;
	if (old == vq->avail_idx)
		return false;
	flags = shm_ld16(vq->mem, vq->used + IVV_RING_USED_FLAGS);
	if (flags & IVV_RING_USED_F_NO_NOTIFY)
		return false;
	vq->stats.kicks++;
	return true;
}

bool vq_has_used(const struct virtqueue *vq)
{
	if (vq == NULL || vq->broken)
		return false;
	return shm_ld16(vq->mem, vq->used + IVV_RING_USED_IDX) != vq->last_used;
}

static int fail(struct virtqueue *vq, enum vq_fault f, uint32_t value)
{
	vq->broken = true;
	vq->fault = f;
	vq->fault_value = value;
	return VQ_E_BROKEN;
}

int vq_get_used(struct virtqueue *vq, uint32_t *cookie, uint32_t *len)
{
	if (vq == NULL || cookie == NULL || len == NULL)
		return VQ_E_INVAL;
	if (vq->broken)
		return VQ_E_BROKEN;
	uint16_t used_idx = shm_ld16(vq->mem, vq->used + IVV_RING_USED_IDX);
	uint16_t pending = (uint16_t)(used_idx - vq->last_used);

	if (pending == 0u)
		return 0;
	if (pending > vq_in_flight(vq))
		return fail(vq, VQ_FAULT_USED_IDX, used_idx);
	shm_fence_acquire(); /* used->idx before the entries it covers */
	size_t e = vq->used + IVV_RING_USED_RING +
		   (size_t)IVV_RING_USED_ELEM_SIZE * (vq->last_used & vq->mask);
	uint32_t id = shm_ld32(vq->mem, e);
	uint32_t n = shm_ld32(vq->mem, e + 4u);

	if (id >= vq->size)
		return fail(vq, VQ_FAULT_USED_ID, id);
	if (vq->chain_len[id] == 0u)
		return fail(vq, VQ_FAULT_NOT_IN_FLIGHT, id);
	if (n > vq->in_len[id])
		return fail(vq, VQ_FAULT_USED_LEN, n);
	*cookie = vq->cookie[id];
	*len = n;
	/* give the chain back: walk our private links, never the shared table */
	uint16_t d = (uint16_t)id;
	uint8_t count = vq->chain_len[id];

	vq->chain_len[id] = 0;
	for (uint8_t k = 0; k < count && k < VQ_MAX_CHAIN; k++) {
		uint16_t nxt = vq->next[d];

		vq->next[d] = vq->free_head;
		vq->free_head = d;
		vq->num_free++;
		d = nxt;
	}
	vq->last_used++;
	vq->stats.completed++;
	return 1;
}

const char *vq_fault_name(enum vq_fault f)
{
	switch (f) {
	case VQ_FAULT_NONE:
		return "none";
	case VQ_FAULT_USED_IDX:
		return "used idx ahead of the chains in flight";
	case VQ_FAULT_USED_ID:
		return "used id out of range";
	case VQ_FAULT_NOT_IN_FLIGHT:
		return "used id not in flight";
	case VQ_FAULT_USED_LEN:
		return "used len larger than the buffer";
	default:
		return "?";
	}
}
