/*
 * ivshmem-virtio: root-cell side of a virtio-blk and a virtio-can link on the Raspberry Pi 4.
 *
 * A fragment for Jailhouse's configs/arm64/rpi4.c (the root cell). Copy this file next to it
 * (configs/arm64/rpi4-virtio-root.h: a .h, so Kbuild does not build it as a cell of its own),
 * then edit rpi4.c in four places:
 *
 *   1. after "#include <jailhouse/cell-config.h>":  #include "rpi4-virtio-root.h"
 *   2. struct sizes:   mem_regions[14] -> mem_regions[22], pci_devices[2] -> pci_devices[4]
 *   3. .mem_regions:   IVV_RPI4_ROOT_MEM_REGIONS, as the LAST entry of the array (after
 *                      "RAM (4096M-8192M)", with a comma after that entry's closing brace), so
 *                      upstream's indexes stay valid and the two links start at regions 14 and
 *                      18. If your rpi4.c has another number of regions, change
 *                      .shmem_regions_start below (= index of the link's state table).
 *   4. .pci_devices:   IVV_RPI4_ROOT_PCI_DEVICES, as the last entry.
 *
 * Facts this relies on (from upstream rpi4.c and the ivshmem-v2 specification):
 *   - root RAM ends at 0x1fa10000; 0x1fa10000..0x1fc00000 is kept out of the root cell for shared
 *     memory (upstream uses 0x1faf0000.. for its demo and ivshmem-net links), the hypervisor
 *     sits at 0x1fc00000; the whole 0x10000000..0x20000000 must be "no-map" for Linux
 *     (reserved-memory in the device tree, see docs/deploy.md).
 *   - virtual PCI: domain 1, bus 0, ECAM at 0xff900000; slots 0 and 1 are upstream's demo and
 *     ivshmem-net devices, so virtio-blk takes slot 2 and virtio-can slot 3.
 *   - INTx only (no MSI-X on this platform): one vector per device, INTID =
 *     32 + vpci_irq_base + (slot & 3) = 32 + 150 + 2 = 184 (blk) and 185 (can). Both are in the
 *     root's irqchip pin range (160..223). The backend advertises vector 0 for every queue on a
 *     one-vector link by itself (Jailhouse drops doorbells for vectors >= 1 on INTx).
 *   - a virtio link has exactly 2 peers, no output sections: state table (read-only), R/W
 *     section (read-write), then two zero-size output regions.
 *
 * Layout of the free window 0x1fa10000..0x1faf0000 (896 KiB) used here:
 *   virtio-blk  state 0x1fa10000 (4 KiB)  R/W 0x1fa11000..0x1fad0000 (0xbf000 = 764 KiB)
 *   virtio-can  state 0x1fad0000 (4 KiB)  R/W 0x1fad1000..0x1faf0000 (0x1f000 = 124 KiB)
 * The guest cell (rpi4-linux-virtio.c) maps the same addresses with JAILHOUSE_MEM_ROOTSHARED.
 */

#ifndef IVV_RPI4_VIRTIO_ROOT_H
#define IVV_RPI4_VIRTIO_ROOT_H

#ifndef VIRTIO_DEV_CAN
#define VIRTIO_DEV_CAN			36	/* virtio device ID of CAN (virtio 1.4) */
#endif

#define IVV_RPI4_BLK_SHMEM		0x1fa10000
#define IVV_RPI4_BLK_RW_SIZE		0xbf000
#define IVV_RPI4_CAN_SHMEM		0x1fad0000
#define IVV_RPI4_CAN_RW_SIZE		0x1f000

#define IVV_RPI4_ROOT_MEM_REGIONS					\
	/* ivshmem-virtio: virtio-blk back-end 0001:00:02.0 (regions 14..17) */ \
	{								\
		.phys_start = IVV_RPI4_BLK_SHMEM,			\
		.virt_start = IVV_RPI4_BLK_SHMEM,			\
		.size = 0x1000,						\
		.flags = JAILHOUSE_MEM_READ,				\
	},								\
	{								\
		.phys_start = IVV_RPI4_BLK_SHMEM + 0x1000,		\
		.virt_start = IVV_RPI4_BLK_SHMEM + 0x1000,		\
		.size = IVV_RPI4_BLK_RW_SIZE,				\
		.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE,	\
	},								\
	{ 0 },								\
	{ 0 },								\
	/* ivshmem-virtio: virtio-can back-end 0001:00:03.0 (regions 18..21) */ \
	{								\
		.phys_start = IVV_RPI4_CAN_SHMEM,			\
		.virt_start = IVV_RPI4_CAN_SHMEM,			\
		.size = 0x1000,						\
		.flags = JAILHOUSE_MEM_READ,				\
	},								\
	{								\
		.phys_start = IVV_RPI4_CAN_SHMEM + 0x1000,		\
		.virt_start = IVV_RPI4_CAN_SHMEM + 0x1000,		\
		.size = IVV_RPI4_CAN_RW_SIZE,				\
		.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE,	\
	},								\
	{ 0 },								\
	{ 0 }

#define IVV_RPI4_ROOT_PCI_DEVICES					\
	{ /* IVSHMEM 0001:00:02.0 (virtio-blk back-end, ivshmem-virtio) */ \
		.type = JAILHOUSE_PCI_TYPE_IVSHMEM,			\
		.domain = 1,						\
		.bdf = 2 << 3,						\
		.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_INTX,		\
		.shmem_regions_start = 14,				\
		.shmem_dev_id = 0,					\
		.shmem_peers = 2,					\
		.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_BACK +	\
			VIRTIO_DEV_BLOCK,				\
	},								\
	{ /* IVSHMEM 0001:00:03.0 (virtio-can back-end, ivshmem-virtio) */ \
		.type = JAILHOUSE_PCI_TYPE_IVSHMEM,			\
		.domain = 1,						\
		.bdf = 3 << 3,						\
		.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_INTX,		\
		.shmem_regions_start = 18,				\
		.shmem_dev_id = 0,					\
		.shmem_peers = 2,					\
		.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_BACK +	\
			VIRTIO_DEV_CAN,					\
	}

#endif /* IVV_RPI4_VIRTIO_ROOT_H */
