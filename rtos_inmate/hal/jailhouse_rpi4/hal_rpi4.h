/* SPDX-License-Identifier: MIT */
/*
 * hal_rpi4.h - set-up of the Jailhouse/Raspberry Pi 4 HAL.
 * Include <inmate.h> (Jailhouse) before this header.
 */
#ifndef RTOS_INMATE_HAL_RPI4_H
#define RTOS_INMATE_HAL_RPI4_H

#include <stdbool.h>
#include <stdint.h>

struct hal_rpi4_config {
	uint32_t spi_hz;  /* wanted SCLK, <= 10 MHz (MCP2515 limit) */
	uint32_t core_hz; /* VPU core clock feeding SPI0: 500 MHz with core_freq_min=500 */
	bool pinmux;      /* set GPIO 8-11 to ALT0 and GPIO 25 to input here */
};

/*
 * Map GPIO/SPI0 uncached, optionally mux the pins, program the SPI clock.
 * Returns 0, or -1 for an impossible configuration.  *actual_hz (may be
 * NULL) receives the SCLK the even divider gives.
 */
int hal_rpi4_init(const struct hal_rpi4_config *cfg, uint32_t *actual_hz);

#endif /* RTOS_INMATE_HAL_RPI4_H */
