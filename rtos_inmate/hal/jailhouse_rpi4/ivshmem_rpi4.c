/* SPDX-License-Identifier: MIT */
/*
 * ivshmem_rpi4.c - ivshmem_link.h on the Jailhouse ivshmem 2.0 PCI device
 * (virtio-ivshmem.md 1.1-1.4 and 6).  Built only inside a Jailhouse tree
 * (rtos_inmate/Makefile target "jailhouse"); see ivshmem_rpi4.h.
 *
 * Flow, as Jailhouse's own ivshmem-demo: scan 110A:4106 for the class dword
 * 0xFF000000 | protocol << 8, walk to the vendor capability, put BAR0 at a
 * free address, enable MEM (+ MASTER), map BAR0 uncached, read ID and
 * MAX_PEERS, read the section sizes and the 64-bit base address from the
 * capability and map the shared memory cached.  Privileged Control is
 * written 0 (no one-shot interrupts), as Linux's virtio_ivshmem does.
 * Register accesses are single aligned 32-bit MMIO accesses (they trap).
 */
#include <inmate.h>

#include "ivshmem_rpi4.h"
#include "shared_layout.h"

#define MAX_SECTION (1ull << 30) /* refuse sections above 1 GiB */
#define MAX_PEERS_SUPPORTED 16u

static uint64_t cfg_read64(uint16_t bdf, unsigned int addr)
{
	return pci_read_config(bdf, addr, 4) | ((uint64_t)pci_read_config(bdf, addr + 4, 4) << 32);
}

static uint32_t reg_read(const struct ivshmem_rpi4 *d, unsigned int off)
{
	return mmio_read32((void *)((unsigned long)d->regs + off));
}

static void reg_write(const struct ivshmem_rpi4 *d, unsigned int off, uint32_t v)
{
	mmio_write32((void *)((unsigned long)d->regs + off), v);
}

/* ---- ivshmem_link_ops --------------------------------------------------- */

static void op_set_state(void *ctx, uint32_t value)
{
	/* the hypervisor stores it in the state table and raises vector 0 on the peers */
	reg_write(ctx, IVV_REG_STATE, value);
}

static void op_doorbell(void *ctx, uint32_t peer, uint32_t vector)
{
	struct ivshmem_rpi4 *d = ctx;

	if (peer >= d->link.max_peers || vector >= d->link.vectors)
		return; /* Jailhouse would drop it anyway */
	reg_write(d, IVV_REG_DOORBELL, (peer << 16) | vector);
}

static void op_set_int_control(void *ctx, bool enabled)
{
	struct ivshmem_rpi4 *d = ctx;

	d->seen_irqs = d->irq_count; /* what arrived while disabled is lost */
	d->int_control = enabled;
	reg_write(d, IVV_REG_INT_CONTROL, enabled ? 1u : 0u);
}

static int op_wait(void *ctx, uint64_t timeout_ns)
{
	struct ivshmem_rpi4 *d = ctx;
	uint64_t freq = timer_get_frequency();
	uint64_t start = timer_get_ticks();
	uint64_t ticks = freq != 0u ? timeout_ns / 1000u * freq / 1000000u : 0u;

	do {
		uint32_t now = d->irq_count;

		if (now != d->seen_irqs) {
			d->seen_irqs = now;
			return d->int_control ? 1 : 0; /* INTx: everything is vector 0 */
		}
	} while (timer_get_ticks() - start < ticks);
	return 0;
}

static const struct ivshmem_link_ops rpi4_ops = {
	.set_state = op_set_state,
	.doorbell = op_doorbell,
	.set_int_control = op_set_int_control,
	.wait = op_wait,
};

void ivshmem_rpi4_irq(struct ivshmem_rpi4 *dev, unsigned int irq)
{
	if (dev != NULL && irq == dev->irq)
		dev->irq_count++;
}

/* ---- discovery ------------------------------------------------------------ */

static int find_device(uint16_t protocol)
{
	const uint32_t want = (uint32_t)IVV_PCI_CLASS_BASE << 24 | (uint32_t)protocol << 8;
	int bdf = pci_find_device(IVV_PCI_VENDOR, IVV_PCI_DEVICE, 0);

	for (unsigned int guard = 0; bdf >= 0 && guard < 0x10000u; guard++) {
		if ((pci_read_config((uint16_t)bdf, 0x08, 4) & 0xFFFFFF00u) == want)
			return bdf;
		if (bdf >= 0xFFFF)
			break;
		bdf = pci_find_device(IVV_PCI_VENDOR, IVV_PCI_DEVICE, (uint16_t)(bdf + 1));
	}
	return -1;
}

int ivshmem_rpi4_open(struct ivshmem_rpi4 *dev, uint16_t protocol, unsigned long bar0)
{
	int bdf, cap, msix;
	uint32_t id, max_peers, vectors = 1;
	uint64_t st_size, rw_size, out_size, base, total;

	if (dev == NULL)
		return -1;
	*dev = (struct ivshmem_rpi4){ 0 };
	if (bar0 == 0u)
		bar0 = IVSHMEM_RPI4_BAR0_DEFAULT;
	bdf = find_device(protocol);
	if (bdf < 0) {
		printk("ivshmem: no 110a:4106 device with protocol 0x%x\n", protocol);
		return -1;
	}
	cap = pci_find_cap((uint16_t)bdf, PCI_CAP_VENDOR);
	if (cap < 0) {
		printk("ivshmem: %02x:%02x.%x has no vendor capability\n", bdf >> 8,
		       (bdf >> 3) & 0x1f, bdf & 7);
		return -1;
	}
	dev->bdf = (uint16_t)bdf;
	pci_write_config(dev->bdf, PCI_CFG_BAR, (uint32_t)bar0, 4);
	pci_write_config(dev->bdf, PCI_CFG_COMMAND, PCI_CMD_MEM | PCI_CMD_MASTER, 2);
	map_range((void *)bar0, PAGE_SIZE, MAP_UNCACHED);
	dev->regs = (volatile uint32_t *)bar0;
	pci_write_config(dev->bdf, (unsigned int)cap + IVV_CAP_PRIV_CONTROL, 0, 1);

	id = reg_read(dev, IVV_REG_ID);
	max_peers = reg_read(dev, IVV_REG_MAX_PEERS);
	st_size = pci_read_config(dev->bdf, (unsigned int)cap + IVV_CAP_STATE_TABLE_SIZE, 4);
	rw_size = cfg_read64(dev->bdf, (unsigned int)cap + IVV_CAP_RW_SIZE);
	out_size = cfg_read64(dev->bdf, (unsigned int)cap + IVV_CAP_OUTPUT_SIZE);
	base = cfg_read64(dev->bdf, (unsigned int)cap + IVV_CAP_BASE_ADDR);
	if (max_peers < 2u || max_peers > MAX_PEERS_SUPPORTED || id >= max_peers ||
	    st_size < 4u * max_peers || st_size > MAX_SECTION || rw_size > MAX_SECTION ||
	    out_size > MAX_SECTION || base == 0u || (base & (PAGE_SIZE - 1u)) != 0u) {
		printk("ivshmem: impossible geometry (id %u of %u, sizes 0x%llx/0x%llx/0x%llx "
		       "at 0x%llx)\n", id, max_peers, (unsigned long long)st_size,
		       (unsigned long long)rw_size, (unsigned long long)out_size,
		       (unsigned long long)base);
		return -1;
	}
	total = st_size + rw_size + (uint64_t)max_peers * out_size;
	map_range((void *)(unsigned long)base, (unsigned long)total, MAP_CACHED);

	msix = pci_find_cap(dev->bdf, PCI_CAP_MSIX);
	if (msix >= 0) {
		/* every peer sees the same count; we poll, since the arm lib has no MSI-X */
		dev->msix = true;
		vectors = (pci_read_config(dev->bdf, (unsigned int)msix + 2, 2) & 0x7FFu) + 1u;
		if (vectors > IVL_MAX_VECTORS)
			vectors = IVL_MAX_VECTORS;
	}
	dev->irq = 32u + comm_region->vpci_irq_base + (((unsigned int)bdf >> 3) & 3u);
	dev->link = (struct ivshmem_link){
		.id = id,
		.max_peers = max_peers,
		.vectors = vectors,
		.protocol = protocol,
		.state_table = { (volatile uint8_t *)(unsigned long)base, (size_t)st_size },
		.rw = { (volatile uint8_t *)(unsigned long)(base + st_size), (size_t)rw_size },
		.ops = &rpi4_ops,
		.ctx = dev,
	};
	printk("ivshmem: %02x:%02x.%x protocol 0x%x, ID %u of %u, R/W 0x%llx at 0x%llx, "
	       "%s, INTID %u\n", bdf >> 8, (bdf >> 3) & 0x1f, bdf & 7, protocol, id, max_peers,
	       (unsigned long long)rw_size, (unsigned long long)(base + st_size),
	       dev->msix ? "MSI-X (polled)" : "INTx", dev->irq);
	return 0;
}
