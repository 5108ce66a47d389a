/*
 * ivshmem-virtio: a non-root Linux cell on the Raspberry Pi 4 that gets its disk (/dev/vda) and a
 * CAN controller (can0) from the root cell over virtio-ivshmem, plus upstream's ivshmem-net link.
 *
 * A complete cell config: copy it to Jailhouse's configs/arm64/ and build Jailhouse; it becomes
 * configs/arm64/rpi4-linux-virtio.cell. It replaces upstream's rpi4-linux-demo (same CPUs, RAM,
 * console and device tree, configs/arm64/dts/inmate-rpi4.dtb) and needs the root cell extended by
 * rpi4-virtio-root.h. Do not run it together with rpi4-linux-demo or rpi4-inmate-demo: they
 * claim interrupts (184..186) that this setup gives to other devices.
 *
 * Facts:
 *   - CPUs 2 and 3; RAM 0x1f900000 (64 KiB, loaded at guest 0 for the Linux loader) and
 *     0x10000000..0x18000000 (128 MiB), both inside the 256 MiB that the root Linux must not use;
 *     the 8250 mini UART at 0xfe215040 is shared with the root (SPI 93 = INTID 125).
 *   - virtual PCI: this cell sees the root's ECAM layout; inmate-rpi4.dtb maps INTx pin 1..4 to
 *     GIC SPI 153..156, i.e. vpci_irq_base = 153 and INTID = 32 + 153 + (slot & 3):
 *       slot 1 ivshmem-net 186, slot 2 virtio-blk 187, slot 3 virtio-can 188.
 *     Slot 0 (upstream's 3-peer ivshmem demo) is left out: its INTID 185 is the root's virtio-can
 *     interrupt in this setup.
 *   - the shared-memory regions are the root's, with JAILHOUSE_MEM_ROOTSHARED; this cell is ID 1
 *     (the frontend) on every link, with the frontend protocols 0x8000 + device ID.
 *   - INTx: one vector per link. Linux's virtio_ivshmem then shares vector 0 for the config and
 *     every queue (it reads config_event/queue_event to tell them apart).
 */

#include <jailhouse/types.h>
#include <jailhouse/cell-config.h>

#ifndef VIRTIO_DEV_CAN
#define VIRTIO_DEV_CAN			36	/* virtio device ID of CAN (virtio 1.4) */
#endif

#define IVV_BLK_SHMEM			0x1fa10000
#define IVV_BLK_RW_SIZE			0xbf000
#define IVV_CAN_SHMEM			0x1fad0000
#define IVV_CAN_RW_SIZE			0x1f000

struct {
	struct jailhouse_cell_desc cell;
	__u64 cpus[1];
	struct jailhouse_memory mem_regions[16];
	struct jailhouse_irqchip irqchips[2];
	struct jailhouse_pci_device pci_devices[3];
} __attribute__((packed)) config = {
	.cell = {
		.signature = JAILHOUSE_CELL_DESC_SIGNATURE,
		.revision = JAILHOUSE_CONFIG_REVISION,
		.architecture = JAILHOUSE_ARM64,
		.name = "rpi4-linux-virtio",
		.flags = JAILHOUSE_CELL_PASSIVE_COMMREG |
			JAILHOUSE_CELL_VIRTUAL_CONSOLE_PERMITTED,

		.cpu_set_size = sizeof(config.cpus),
		.num_memory_regions = ARRAY_SIZE(config.mem_regions),
		.num_irqchips = ARRAY_SIZE(config.irqchips),
		.num_pci_devices = ARRAY_SIZE(config.pci_devices),

		.vpci_irq_base = 153,	/* INTx pin 1 = SPI 153, as in inmate-rpi4.dts */

		.console = {
			.address = 0xfe215040,
			.type = JAILHOUSE_CON_TYPE_8250,
			.flags = JAILHOUSE_CON_ACCESS_MMIO |
				 JAILHOUSE_CON_REGDIST_4,
		},
	},

	.cpus = {
		0b1100,
	},

	.mem_regions = {
		/* 0..3: virtio-blk link, frontend side (00:02.0) */
		{
			.phys_start = IVV_BLK_SHMEM,
			.virt_start = IVV_BLK_SHMEM,
			.size = 0x1000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_ROOTSHARED,
		},
		{
			.phys_start = IVV_BLK_SHMEM + 0x1000,
			.virt_start = IVV_BLK_SHMEM + 0x1000,
			.size = IVV_BLK_RW_SIZE,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_ROOTSHARED,
		},
		{ 0 },
		{ 0 },
		/* 4..7: virtio-can link, frontend side (00:03.0) */
		{
			.phys_start = IVV_CAN_SHMEM,
			.virt_start = IVV_CAN_SHMEM,
			.size = 0x1000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_ROOTSHARED,
		},
		{
			.phys_start = IVV_CAN_SHMEM + 0x1000,
			.virt_start = IVV_CAN_SHMEM + 0x1000,
			.size = IVV_CAN_RW_SIZE,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_ROOTSHARED,
		},
		{ 0 },
		{ 0 },
		/* 8..11: ivshmem-net link (00:01.0), as upstream */
		JAILHOUSE_SHMEM_NET_REGIONS(0x1fb00000, 1),
		/* 12: mini UART, shared with the root cell */ {
			.phys_start = 0xfe215040,
			.virt_start = 0xfe215040,
			.size = 0x40,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_IO | JAILHOUSE_MEM_IO_8 |
				JAILHOUSE_MEM_IO_32 | JAILHOUSE_MEM_ROOTSHARED,
		},
		/* 13: RAM at guest address 0 (the Linux loader) */ {
			.phys_start = 0x1f900000,
			.virt_start = 0,
			.size = 0x10000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_EXECUTE | JAILHOUSE_MEM_LOADABLE,
		},
		/* 14: RAM, 128 MiB */ {
			.phys_start = 0x10000000,
			.virt_start = 0x10000000,
			.size = 0x8000000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_EXECUTE | JAILHOUSE_MEM_DMA |
				JAILHOUSE_MEM_LOADABLE,
		},
		/* 15: communication region */ {
			.virt_start = 0x80000000,
			.size = 0x00001000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_COMM_REGION,
		},
	},

	.irqchips = {
		/* GIC, INTIDs 32..159: the mini UART (125) */ {
			.address = 0xff841000,
			.pin_base = 32,
			.pin_bitmap = {
				0,
				0,
				1 << (125 - 96),
				0,
			},
		},
		/* GIC, INTIDs 160..287: the three ivshmem links (186, 187, 188) */ {
			.address = 0xff841000,
			.pin_base = 160,
			.pin_bitmap = {
				(1 << (186 - 160)) | (1 << (187 - 160)) |
				(1 << (188 - 160)),
				0,
				0,
				0,
			},
		},
	},

	.pci_devices = {
		{ /* IVSHMEM 00:01.0 (ivshmem-net) */
			.type = JAILHOUSE_PCI_TYPE_IVSHMEM,
			.domain = 1,
			.bdf = 1 << 3,
			.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_INTX,
			.shmem_regions_start = 8,
			.shmem_dev_id = 1,
			.shmem_peers = 2,
			.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VETH,
		},
		{ /* IVSHMEM 00:02.0 (virtio-blk front-end) -> /dev/vda */
			.type = JAILHOUSE_PCI_TYPE_IVSHMEM,
			.domain = 1,
			.bdf = 2 << 3,
			.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_INTX,
			.shmem_regions_start = 0,
			.shmem_dev_id = 1,
			.shmem_peers = 2,
			.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_FRONT +
				VIRTIO_DEV_BLOCK,
		},
		{ /* IVSHMEM 00:03.0 (virtio-can front-end) -> can0 */
			.type = JAILHOUSE_PCI_TYPE_IVSHMEM,
			.domain = 1,
			.bdf = 3 << 3,
			.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_INTX,
			.shmem_regions_start = 4,
			.shmem_dev_id = 1,
			.shmem_peers = 2,
			.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_FRONT +
				VIRTIO_DEV_CAN,
		},
	},
};
