/* SPDX-License-Identifier: MIT */
/*
 * hal_rpi4.h - set-up of the Jailhouse/Raspberry Pi 4 HAL.
 * Include <inmate.h> (Jailhouse) before this header.
 */
#ifndef RTOS_INMATE_HAL_RPI4_H
#define RTOS_INMATE_HAL_RPI4_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct hal_rpi4_config {
	uint32_t spi_hz;      /* highest SCLK allowed, <= 10 MHz (MCP2515 limit) */
	uint32_t core_hz;     /* VPU core clock feeding SPI0: 500 MHz with core_freq_min=500 */
	uint32_t core_hz_max; /* the highest it can ever be: CDIV is computed for this */
	bool pinmux;      /* set GPIO 8-11 to ALT0 and GPIO 25 to input here */
};

/*
 * Map GPIO/SPI0 uncached, optionally mux the pins, program the SPI clock.
 * Returns 0, or -1 for an impossible configuration.  *actual_hz (may be
 * NULL) receives the SCLK the even divider gives at core_hz; at core_hz_max
 * it is still <= spi_hz.
 */
int hal_rpi4_init(const struct hal_rpi4_config *cfg, uint32_t *actual_hz);

/* Map the hypervisor's console UART for hal_rpi4_log_drain. */
void hal_rpi4_log_init(void);

/*
 * Up to max bytes of the log ring into the UART TX FIFO, as many as it takes
 * without waiting (one short wait per line for the CR).  Call only when
 * logring_idle() says the CAN side is idle.  Returns the bytes written.
 */
size_t hal_rpi4_log_drain(size_t max);

#endif /* RTOS_INMATE_HAL_RPI4_H */
