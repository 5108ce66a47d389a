/* SPDX-License-Identifier: MIT */
/*
 * bcm2711.h - the few BCM2711 (Raspberry Pi 4) registers the CAN cell uses.
 * ARM physical addresses in low-peripheral mode (bus 0x7E... = 0xFE...).
 * Bits as in Linux drivers/spi/spi-bcm2835.c; see shared spec can.md 3.
 */
#ifndef RTOS_INMATE_BCM2711_H
#define RTOS_INMATE_BCM2711_H

#define BCM2711_GPIO_BASE 0xFE200000ul
#define BCM2711_SPI0_BASE 0xFE204000ul
/* one 2 MiB block covers both (map_range maps 2 MiB blocks) */
#define BCM2711_MAP_BASE BCM2711_GPIO_BASE
#define BCM2711_MAP_SIZE 0x5000ul

/* GPIO */
#define GPFSEL0 0x00u
#define GPFSEL1 0x04u
#define GPFSEL2 0x08u
#define GPLEV0 0x34u
#define GPFSEL_MASK 0x7u
#define GPFSEL_INPUT 0x0u
#define GPFSEL_ALT0 0x4u

/* SPI0 on GPIO 8 (CE0), 9 (MISO), 10 (MOSI), 11 (SCLK), all ALT0; INT on GPIO 25 */
#define PIN_CE0 8u
#define PIN_MISO 9u
#define PIN_MOSI 10u
#define PIN_SCLK 11u
#define PIN_CAN_INT 25u

/* SPI0 registers */
#define SPI_CS 0x00u
#define SPI_FIFO 0x04u
#define SPI_CLK 0x08u

/* SPI_CS bits */
#define SPI_CS_CS_MASK 0x00000003u /* 0 = CE0 */
#define SPI_CS_CPHA 0x00000004u
#define SPI_CS_CPOL 0x00000008u
#define SPI_CS_CLEAR_TX 0x00000010u
#define SPI_CS_CLEAR_RX 0x00000020u
#define SPI_CS_CSPOL 0x00000040u
#define SPI_CS_TA 0x00000080u
#define SPI_CS_DONE 0x00010000u
#define SPI_CS_RXD 0x00020000u
#define SPI_CS_TXD 0x00040000u

#define SPI_FIFO_DEPTH 64u
#define SPI_CDIV_MIN 2u
#define SPI_CDIV_MAX 65534u /* 0 would mean 65536; keep it explicit and even */

#endif /* RTOS_INMATE_BCM2711_H */
