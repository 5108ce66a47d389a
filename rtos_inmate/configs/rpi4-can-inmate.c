/*
 * ivshmem-virtio: the bare-metal MCP2515 CAN cell (rtos_inmate/, mcp2515-can.bin) on the
 * Raspberry Pi 4.
 *
 * A complete cell config: copy it with rpi4-can-root.h to Jailhouse's configs/arm64/ and build
 * Jailhouse; it becomes configs/arm64/rpi4-can-inmate.cell. The root cell needs the matching
 * back-end, rpi4-can-root.h (see there for the edits to rpi4.c and the physical address map).
 *
 * What the cell has, and why (rtos_inmate/README.md, README-virtio.md and hal/jailhouse_rpi4/):
 *   - CPU 1, as upstream's rpi4-inmate-demo, which it replaces; the Linux virtio guest
 *     (docs/jailhouse-cells/rpi4-linux-virtio.c) or upstream's rpi4-linux-demo keep CPUs 2-3,
 *     the root CPU 0.
 *   - 128 KiB of RAM at guest address 0 (physical 0x1f800000), loadable: the linked image with
 *     its 4 KiB stack and the inmate library's page tables needs 0x13000 bytes; the 64 KiB of
 *     rpi4-inmate-demo are not enough.
 *   - the communication region at 0x80000000 (COMM_REGION_BASE of the arm64 inmate library).
 *   - the mini UART at 0xfe215040, shared with the root (the console, as rpi4-inmate-demo).
 *   - GPIO page 0xfe200000, shared with the root (ROOTSHARED: Linux keeps its GPIOs): GPFSEL0..2
 *     for the SPI0 pins (pinmux=1, read-modify-write) and GPLEV0 bit 25 (the MCP2515's INT).
 *   - SPI0 page 0xfe204000, this cell's alone: the root loses SPI0 and SPI3..6 (same page)
 *     while the cell exists. The root Linux must not use SPI0 (dtparam=spi=off, no mcp2515
 *     overlay).
 *   - the virtio-can link 00:04.0 as the front-end: ID 1 of 2 peers, protocol 0x8000 + 36 =
 *     0x8024 (what main.c scans bus 0 for), INTx, the root's four regions with ROOTSHARED.
 *     Slot 4 and not 3: 00:03.0 is the Linux guest's virtio-can link, and a link has one ID 1.
 *   - INTx INTID 32 + vpci_irq_base + (4 & 3) = 191, in the irqchip below. main.c polls and does
 *     not enable it, but the hypervisor raises it on every doorbell, so the cell must own it.
 *     No GPIO (145) or SPI (150) interrupt: the inmate polls, and GPIO bank 0's interrupt is
 *     shared by all pins 0-27 of the root.
 *   - virtual PCI: the root's ECAM at 0xff900000 (bus 0 only) reaches the cell through the
 *     communication region; main.c puts BAR0 at 0xff000000, where this cell has no region.
 *
 * Load with the image at 0 and the command line at 0x1000 (the .cmdline section):
 *   jailhouse cell create rpi4-can-inmate.cell
 *   jailhouse cell load rpi4-can-inmate mcp2515-can.bin -s "mcp-osc=16000000 ..." -a 0x1000
 *   jailhouse cell start rpi4-can-inmate
 */

#include <jailhouse/types.h>
#include <jailhouse/cell-config.h>

#include "rpi4-can-root.h"

/* the irqchip below has the link's INTID in the first word of its bitmap (160..191) */
_Static_assert(RPI4_CAN_CELL_INTID >= 160 && RPI4_CAN_CELL_INTID < 192,
	       "RPI4_CAN_CELL_INTID outside pin_bitmap[0]");

struct {
	struct jailhouse_cell_desc cell;
	__u64 cpus[1];
	struct jailhouse_memory mem_regions[9];
	struct jailhouse_irqchip irqchips[1];
	struct jailhouse_pci_device pci_devices[1];
} __attribute__((packed)) config = {
	.cell = {
		.signature = JAILHOUSE_CELL_DESC_SIGNATURE,
		.revision = JAILHOUSE_CONFIG_REVISION,
		.architecture = JAILHOUSE_ARM64,
		.name = "rpi4-can-inmate",
		.flags = JAILHOUSE_CELL_PASSIVE_COMMREG |
			JAILHOUSE_CELL_VIRTUAL_CONSOLE_PERMITTED,

		.cpu_set_size = sizeof(config.cpus),
		.num_memory_regions = ARRAY_SIZE(config.mem_regions),
		.num_irqchips = ARRAY_SIZE(config.irqchips),
		.num_pci_devices = ARRAY_SIZE(config.pci_devices),

		/* INTx of slot 4 (pin A) = 32 + 159 = INTID 191 */
		.vpci_irq_base = RPI4_CAN_CELL_VPCI_IRQ_BASE,

		.console = {
			.address = 0xfe215040,
			.type = JAILHOUSE_CON_TYPE_8250,
			.flags = JAILHOUSE_CON_ACCESS_MMIO |
				 JAILHOUSE_CON_REGDIST_4,
		},
	},

	.cpus = {
		0b0010,
	},

	.mem_regions = {
		/* 0..3: virtio-can link, front-end side (00:04.0) */
		{
			.phys_start = RPI4_CAN_LINK_SHMEM,
			.virt_start = RPI4_CAN_LINK_SHMEM,
			.size = RPI4_CAN_LINK_STATE_SIZE,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_ROOTSHARED,
		},
		{
			.phys_start = RPI4_CAN_LINK_SHMEM +
				RPI4_CAN_LINK_STATE_SIZE,
			.virt_start = RPI4_CAN_LINK_SHMEM +
				RPI4_CAN_LINK_STATE_SIZE,
			.size = RPI4_CAN_LINK_RW_SIZE,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_ROOTSHARED,
		},
		{ 0 },
		{ 0 },
		/* 4: mini UART (console), shared with the root cell */ {
			.phys_start = 0xfe215040,
			.virt_start = 0xfe215040,
			.size = 0x40,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_IO | JAILHOUSE_MEM_IO_8 |
				JAILHOUSE_MEM_IO_32 | JAILHOUSE_MEM_ROOTSHARED,
		},
		/* 5: GPIO (pin mux, INT on GPIO 25), shared with the root cell */ {
			.phys_start = 0xfe200000,
			.virt_start = 0xfe200000,
			.size = 0x1000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_IO | JAILHOUSE_MEM_ROOTSHARED,
		},
		/* 6: SPI0 (and SPI3..6: same page), this cell's alone */ {
			.phys_start = 0xfe204000,
			.virt_start = 0xfe204000,
			.size = 0x1000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_IO,
		},
		/* 7: RAM, 128 KiB at guest address 0 */ {
			.phys_start = RPI4_CAN_CELL_RAM,
			.virt_start = 0,
			.size = RPI4_CAN_CELL_RAM_SIZE,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_EXECUTE | JAILHOUSE_MEM_LOADABLE,
		},
		/* 8: communication region */ {
			.virt_start = 0x80000000,
			.size = 0x00001000,
			.flags = JAILHOUSE_MEM_READ | JAILHOUSE_MEM_WRITE |
				JAILHOUSE_MEM_COMM_REGION,
		},
	},

	.irqchips = {
		/* GIC, INTIDs 160..287: the link's INTx (191) only */ {
			.address = 0xff841000,
			.pin_base = 160,
			.pin_bitmap = {
				1u << (RPI4_CAN_CELL_INTID - 160),
				0,
				0,
				0,
			},
		},
	},

	.pci_devices = {
		{ /* IVSHMEM 00:04.0 (virtio-can front-end, the inmate's driver) */
			.type = JAILHOUSE_PCI_TYPE_IVSHMEM,
			.domain = 1,
			.bdf = RPI4_CAN_LINK_SLOT << 3,
			.bar_mask = JAILHOUSE_IVSHMEM_BAR_MASK_INTX,
			.shmem_regions_start = 0,
			.shmem_dev_id = 1,
			.shmem_peers = 2,
			.shmem_protocol = JAILHOUSE_SHMEM_PROTO_VIRTIO_FRONT +
				VIRTIO_DEV_CAN,
		},
	},
};
