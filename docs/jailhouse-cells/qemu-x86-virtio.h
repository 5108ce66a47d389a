/*
 * ivshmem-virtio: a virtio-blk and a virtio-can link between the root cell and the Linux cell of
 * Jailhouse's QEMU x86 demo (configs/x86/qemu-x86.c and configs/x86/linux-x86-demo.c).
 *
 * Upstream already carries two virtio links in both files, and both keep their memory here:
 *   - 01:0c.0  virtio-blk   state 0x3f000000, R/W 0x3f001000 (0xdf000)  regions 0..3, 2 MSI-X
 *              vectors. Nothing to change: ivshmem-virtio serves it as it is.
 *   - 01:0d.0  virtio-console (reference tool) state 0x3f0e0000, R/W 0x3f0e1000 (0xf000),
 *              regions 4..7. This becomes the virtio-can link: same memory regions, only the
 *              PCI entry changes (protocol 0xC024 / 0x8024, and 4 MSI-X vectors: one for the
 *              config and one per queue, Tx, Rx, control).
 * (The 1 MiB window 0x3f000000..0x3f100000 is full: the ivshmem demo sits at 0x3f0f0000 and
 *  ivshmem-net at 0x3f100000, so virtio-can takes the console's place rather than new memory.)
 *
 * Use: copy this file to configs/x86/, add  #include "qemu-x86-virtio.h"  after
 * "#include <jailhouse/cell-config.h>" in both .c files, and replace the whole
 * "IVSHMEM (virtio-con back-end)" entry of qemu-x86.c's .pci_devices by
 * IVV_QEMU_X86_ROOT_CAN_PCI_DEVICE, and the virtio-console front-end entry (bdf 0x0d) of
 * linux-x86-demo.c by IVV_QEMU_X86_GUEST_CAN_PCI_DEVICE. Array sizes stay the same.
 *
 * x86 has no INTx for ivshmem (Jailhouse's x86 INTx hook does nothing), so every link uses
 * MSI-X and both peers of a link get the same vector count.
 *
 * The R/W section of the CAN link is 60 KiB: give the device queue_size = 64 in the daemon's
 * config (three rings, 64 receive buffers and up to 64 frames in flight fit in ~26 KiB of the
 * frontend's bounce pool; the default 256 would not).
 */

#ifndef IVV_QEMU_X86_VIRTIO_H
#define IVV_QEMU_X86_VIRTIO_H

#ifndef VIRTIO_DEV_CAN
#define VIRTIO_DEV_CAN			36	/* virtio device ID of CAN (virtio 1.4) */
#endif

/* root cell (qemu-x86.c): ID 0, back-end protocol 0xC024 */
#define IVV_QEMU_X86_ROOT_CAN_PCI_DEVICE				\
	{ /* IVSHMEM 01:0d.0 (virtio-can back-end, ivshmem-virtio) */	\
		.type = JAILHOUSE_PCI_TYPE_IVSHMEM,			\
		.domain = 0x0,						\
		.bdf = 0x100 | (0x0d << 3),				\
		.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_MSIX,		\
		.num_msix_vectors = 4,					\
		.shmem_regions_start = 4,				\
		.shmem_dev_id = 0,					\
		.shmem_peers = 2,					\
		.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_BACK +	\
			VIRTIO_DEV_CAN,					\
	}

/* Linux cell (linux-x86-demo.c): ID 1, front-end protocol 0x8024 */
#define IVV_QEMU_X86_GUEST_CAN_PCI_DEVICE				\
	{ /* IVSHMEM 01:0d.0 (virtio-can front-end) -> can0 */		\
		.type = JAILHOUSE_PCI_TYPE_IVSHMEM,			\
		.domain = 0x0,						\
		.bdf = 0x100 | (0x0d << 3),				\
		.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_MSIX,		\
		.num_msix_vectors = 4,					\
		.shmem_regions_start = 4,				\
		.shmem_dev_id = 1,					\
		.shmem_peers = 2,					\
		.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_FRONT +	\
			VIRTIO_DEV_CAN,					\
	}

/*
 * For reference, the virtio-blk link as upstream has it (unchanged; shown so that a config
 * written from scratch can use it): regions 0..3 in both cells, the guest's with
 * JAILHOUSE_MEM_ROOTSHARED added to the state table and R/W section flags.
 */
#define IVV_QEMU_X86_BLK_SHMEM		0x3f000000
#define IVV_QEMU_X86_BLK_RW_SIZE	0xdf000

#define IVV_QEMU_X86_ROOT_BLK_MEM_REGIONS				\
	{								\
		.phys_start = IVV_QEMU_X86_BLK_SHMEM,			\
		.virt_start = IVV_QEMU_X86_BLK_SHMEM,			\
		.size = 0x1000,						\
		.flags = JAILHOUSE_MEM_READ,				\
	},								\
	{								\
		.phys_start = IVV_QEMU_X86_BLK_SHMEM + 0x1000,		\
		.virt_start = IVV_QEMU_X86_BLK_SHMEM + 0x1000,		\
		.size = IVV_QEMU_X86_BLK_RW_SIZE,			\
		.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE,	\
	},								\
	{ 0 },								\
	{ 0 }

#define IVV_QEMU_X86_GUEST_BLK_MEM_REGIONS				\
	{								\
		.phys_start = IVV_QEMU_X86_BLK_SHMEM,			\
		.virt_start = IVV_QEMU_X86_BLK_SHMEM,			\
		.size = 0x1000,						\
		.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_ROOTSHARED,	\
	},								\
	{								\
		.phys_start = IVV_QEMU_X86_BLK_SHMEM + 0x1000,		\
		.virt_start = IVV_QEMU_X86_BLK_SHMEM + 0x1000,		\
		.size = IVV_QEMU_X86_BLK_RW_SIZE,			\
		.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |	\
			JAILHOUSE_MEM_ROOTSHARED,			\
	},								\
	{ 0 },								\
	{ 0 }

#define IVV_QEMU_X86_ROOT_BLK_PCI_DEVICE				\
	{ /* IVSHMEM 01:0c.0 (virtio-blk back-end) */			\
		.type = JAILHOUSE_PCI_TYPE_IVSHMEM,			\
		.domain = 0x0,						\
		.bdf = 0x100 | (0x0c << 3),				\
		.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_MSIX,		\
		.num_msix_vectors = 2,					\
		.shmem_regions_start = 0,				\
		.shmem_dev_id = 0,					\
		.shmem_peers = 2,					\
		.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_BACK +	\
			VIRTIO_DEV_BLOCK,				\
	}

#define IVV_QEMU_X86_GUEST_BLK_PCI_DEVICE				\
	{ /* IVSHMEM 01:0c.0 (virtio-blk front-end) -> /dev/vda */	\
		.type = JAILHOUSE_PCI_TYPE_IVSHMEM,			\
		.domain = 0x0,						\
		.bdf = 0x100 | (0x0c << 3),				\
		.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_MSIX,		\
		.num_msix_vectors = 2,					\
		.shmem_regions_start = 0,				\
		.shmem_dev_id = 1,					\
		.shmem_peers = 2,					\
		.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_FRONT +	\
			VIRTIO_DEV_BLOCK,				\
	}

#endif /* IVV_QEMU_X86_VIRTIO_H */
