/* SPDX-License-Identifier: MIT */
/*
 * ivshmem_rpi4.h - the link HAL (ivshmem_link.h) on Jailhouse: the ivshmem
 * 2.0 virtual PCI device of a cell (virtio-ivshmem.md 1 and 6).
 * Include <inmate.h> (Jailhouse) before this header.
 *
 *   pci_init();                                  (once, by the cell's main)
 *   ivshmem_rpi4_open(&dev, 0x8024, 0);          finds 110A:4106 with class
 *                                                protocol 0x8024, maps BAR0 and
 *                                                the shared memory
 *   irq_init(handler); irq_enable(dev.irq);      optional: the handler calls
 *                                                ivshmem_rpi4_irq(&dev, irq)
 *   vcan_init(&vc, &br, &dev.link, &cfg);        the portable core takes over
 *
 * The core polls shared memory on every pass, so interrupts only shorten
 * ivshmem_link_ops.wait; a cell that spins on its own core may skip them.
 */
#ifndef RTOS_INMATE_IVSHMEM_RPI4_H
#define RTOS_INMATE_IVSHMEM_RPI4_H

#include <stdbool.h>
#include <stdint.h>

#include "ivshmem_link.h"

/* Where BAR0 (the register page) goes unless the caller says otherwise. */
#define IVSHMEM_RPI4_BAR0_DEFAULT 0xFF000000ul

struct ivshmem_rpi4 {
	uint16_t bdf;
	volatile uint32_t *regs; /* BAR0, mapped uncached */
	unsigned int irq;        /* INTx INTID: 32 + vpci_irq_base + (slot & 3) */
	bool msix;               /* an MSI-X capability exists (the arm lib cannot use it) */
	bool int_control;
	volatile uint32_t irq_count;
	uint32_t seen_irqs;
	struct ivshmem_link link;
};

/*
 * Find the ivshmem device whose class protocol is `protocol`, program BAR0 at
 * bar0 (0 = IVSHMEM_RPI4_BAR0_DEFAULT), enable memory decoding, map the
 * registers and the shared memory (state table, R/W section, output
 * sections, from the vendor capability's base address), validate every
 * value, and fill dev->link.  Returns 0, or -1 with a printk'd reason.
 */
int ivshmem_rpi4_open(struct ivshmem_rpi4 *dev, uint16_t protocol, unsigned long bar0);

/* Call from the cell's interrupt handler (any INTID; others are ignored). */
void ivshmem_rpi4_irq(struct ivshmem_rpi4 *dev, unsigned int irq);

#endif /* RTOS_INMATE_IVSHMEM_RPI4_H */
