/*
 * ivshmem-virtio: root-cell side of the virtio-can link to the MCP2515 CAN cell
 * (rpi4-can-inmate.c, the bare-metal inmate of rtos_inmate/) on the Raspberry Pi 4.
 *
 * A fragment for Jailhouse's configs/arm64/rpi4.c (the root cell). rpi4-can-inmate.c includes it
 * too, for the addresses, so both cells are built from one set of numbers. Copy this file and
 * rpi4-can-inmate.c to configs/arm64/ (a .h, so Kbuild does not build it as a cell of its own),
 * then edit rpi4.c in five places. With docs/jailhouse-cells/rpi4-virtio-root.h (the Linux
 * virtio guest's links) the numbers in [brackets] apply, without it the others:
 *
 *   1. after "#include <jailhouse/cell-config.h>" (and after "rpi4-virtio-root.h", if used):
 *          #include "rpi4-can-root.h"
 *   2. struct sizes:  mem_regions[14] -> [18]   [22 -> 26]
 *                     pci_devices[2] -> [3]     [4 -> 5]
 *   3. "RAM (0M-~506M)": .size = 0x1fa10000 -> 0x1fa00000 (RPI4_CAN_ROOT_RAM0_END). The link's
 *      shared memory takes the 64 KiB at 0x1fa00000 that upstream leaves in the root's RAM for
 *      rpi4-inmate-demo; the CAN cell replaces that demo (it runs on the same CPU 1).
 *   4. .mem_regions:  RPI4_CAN_ROOT_MEM_REGIONS as the LAST entry of the array (after
 *                     "RAM (4096M-8192M)" [after IVV_RPI4_ROOT_MEM_REGIONS]), so the link's
 *                     regions are 14..17 [22..25]. RPI4_CAN_ROOT_REGIONS_START follows from
 *                     whether rpi4-virtio-root.h was included first; define it yourself before
 *                     the #include if your rpi4.c has another number of regions.
 *   5. .pci_devices:  RPI4_CAN_ROOT_PCI_DEVICES as the last entry.
 *
 * rtos_inmate/configs/check-configs.sh makes exactly these edits on a copy of upstream's rpi4.c,
 * builds the cells and runs jailhouse-config-check and check_coexistence.py on them.
 *
 * Facts this relies on (upstream rpi4.c and rpi4-inmate-demo.c at e57d1ef, cell-config.h, the
 * ivshmem 2.0 device model in hypervisor/ivshmem.c, docs/jailhouse-cells/):
 *   - links are matched by bdf alone (ivshmem_init), and every peer ID can be taken once. The
 *     Linux virtio guest is ID 1 of the virtio-can link at 00:03.0, so this cell gets its own
 *     link at slot 4 (00:04.0, the next free one) and can run at the same time.
 *   - shared memory must lie outside the root's RAM regions (else the root cell has two
 *     overlapping regions); 0x1fa10000..0x1fc00000 is already used (rpi4-virtio-root.h from
 *     0x1fa10000, upstream's demo and ivshmem-net from 0x1faf0000, the hypervisor from
 *     0x1fc00000), hence edit 3. 0x1fa00000 is inside the 0x10000000..0x20000000 window the
 *     root Linux must not map (docs/deploy.md, reserved-memory no-map).
 *   - INTx only on this platform: one vector per device, INTID = 32 + vpci_irq_base +
 *     (slot & 3). Root: 32 + 150 + (4 & 3) = 182, the INTID of upstream's demo device 00:00.0
 *     (the root has only four INTx INTIDs, 182..185, for all its slots). Both root-side
 *     drivers are uio_ivshmem, which requests its IRQ with IRQF_SHARED; a shared line only
 *     wakes the other device's user space for nothing (the virtio back-end looks at shared
 *     memory anyway). 182 is in the root's irqchip (160..223).
 *   - the CAN cell sees the same slot with vpci_irq_base 159: INTID 191 (GIC SPI 159), not used
 *     by the Linux guest (186..188), the root (182..185), GENET (189, 190) or any other device
 *     of the BCM2711 device trees. The inmate polls and never enables it, but the cell must own
 *     it: the hypervisor raises INTx by setting the SPI pending in the GICD.
 *   - a virtio link has 2 peers and no output sections: state table (read-only), R/W section
 *     (read-write), two zero-size output regions. The back-end (root, ID 0) has protocol
 *     0xC000 + 36 = 0xC024, the front-end (the inmate, ID 1) 0x8000 + 36 = 0x8024.
 *   - R/W section 0xf000 (60 KiB): the inmate's driver needs about 13 KiB (rings of 128/64/8
 *     entries plus 32/24/16-byte buffers, README-virtio.md "Memory"), and its probe wants at
 *     least 2 pages.
 *
 * Physical address map, 0x10000000..0x20000000 (the root Linux's no-map reservation):
 *   0x10000000..0x18000000  RAM of the Linux guest (rpi4-linux-virtio / upstream linux-demo)
 *   0x1f800000..0x1f820000  RAM of the CAN cell, 128 KiB, guest address 0     (this file)
 *   0x1f900000..0x1f910000  RAM of the Linux guest at guest address 0 (loader)
 *   0x1fa00000..0x1fa10000  virtio-can link of the CAN cell, 00:04.0         (this file)
 *   0x1fa10000..0x1fad0000  virtio-blk link of the Linux guest, 00:02.0      (rpi4-virtio-root.h)
 *   0x1fad0000..0x1faf0000  virtio-can link of the Linux guest, 00:03.0      (rpi4-virtio-root.h)
 *   0x1faf0000..0x1fb00000  upstream ivshmem demo, 00:00.0 (3 peers)
 *   0x1fb00000..0x1fbff000  upstream ivshmem-net, 00:01.0
 *   0x1fc00000..0x20000000  hypervisor
 * The cells' RAM stays inside the root's RAM region 0..0x1fa00000: Jailhouse takes it from the
 * root when a cell is created and gives it back when the cell is destroyed.
 */

#ifndef RPI4_CAN_ROOT_H
#define RPI4_CAN_ROOT_H

#ifndef VIRTIO_DEV_CAN
#define VIRTIO_DEV_CAN			36	/* virtio device ID of CAN (virtio 1.4) */
#endif

/* the link: state table at RPI4_CAN_LINK_SHMEM, R/W section right after it */
#define RPI4_CAN_LINK_SHMEM		0x1fa00000
#define RPI4_CAN_LINK_STATE_SIZE	0x1000
#define RPI4_CAN_LINK_RW_SIZE		0xf000
#define RPI4_CAN_LINK_SLOT		4	/* 0001:00:04.0 in the root, 00:04.0 in the cell */

/* edit 3: the end of the root's "RAM (0M-~506M)" region (upstream: 0x1fa10000) */
#define RPI4_CAN_ROOT_RAM0_END		RPI4_CAN_LINK_SHMEM

/* the CAN cell (rpi4-can-inmate.c) */
#define RPI4_CAN_CELL_RAM		0x1f800000
#define RPI4_CAN_CELL_RAM_SIZE		0x20000	/* the inmate needs 0x13000 */
#define RPI4_CAN_CELL_INTID		191	/* INTx of 00:04.0 in the CAN cell */
#define RPI4_CAN_CELL_VPCI_IRQ_BASE	\
	(RPI4_CAN_CELL_INTID - 32 - (RPI4_CAN_LINK_SLOT & 3))

#ifndef RPI4_CAN_ROOT_REGIONS_START
#ifdef IVV_RPI4_VIRTIO_ROOT_H
#define RPI4_CAN_ROOT_REGIONS_START	22	/* 14 upstream + 8 of rpi4-virtio-root.h */
#else
#define RPI4_CAN_ROOT_REGIONS_START	14	/* upstream rpi4.c has 14 regions */
#endif
#endif

#define RPI4_CAN_ROOT_MEM_REGIONS					\
	/* ivshmem-virtio: virtio-can back-end 0001:00:04.0 (CAN cell) */ \
	{								\
		.phys_start = RPI4_CAN_LINK_SHMEM,			\
		.virt_start = RPI4_CAN_LINK_SHMEM,			\
		.size = RPI4_CAN_LINK_STATE_SIZE,			\
		.flags = JAILHOUSE_MEM_READ,				\
	},								\
	{								\
		.phys_start = RPI4_CAN_LINK_SHMEM +			\
			RPI4_CAN_LINK_STATE_SIZE,			\
		.virt_start = RPI4_CAN_LINK_SHMEM +			\
			RPI4_CAN_LINK_STATE_SIZE,			\
		.size = RPI4_CAN_LINK_RW_SIZE,				\
		.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE,	\
	},								\
	{ 0 },								\
	{ 0 }

#define RPI4_CAN_ROOT_PCI_DEVICES					\
	{ /* IVSHMEM 0001:00:04.0 (virtio-can back-end for the CAN cell) */ \
		.type = JAILHOUSE_PCI_TYPE_IVSHMEM,			\
		.domain = 1,						\
		.bdf = RPI4_CAN_LINK_SLOT << 3,				\
		.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_INTX,		\
		.shmem_regions_start = RPI4_CAN_ROOT_REGIONS_START,	\
		.shmem_dev_id = 0,					\
		.shmem_peers = 2,					\
		.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_BACK +	\
			VIRTIO_DEV_CAN,					\
	}

#endif /* RPI4_CAN_ROOT_H */
