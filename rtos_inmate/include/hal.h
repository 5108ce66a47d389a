/* SPDX-License-Identifier: MIT */
/*
 * hal.h - the whole platform surface the portable inmate code calls.
 *
 * Core and driver code include only this header (plus <stdint.h>,
 * <stddef.h>, <stdbool.h>); the implementation is chosen at build time:
 *
 *   hal/hosted/          Linux process; SPI and the INT pin go to the Python
 *                        MCP2515 simulator over a UNIX socket.
 *   hal/jailhouse_rpi4/  Jailhouse cell on a Raspberry Pi 4: BCM2711 SPI0
 *                        (polled), GPIO 25 level, CNTPCT.
 *
 * Platform set-up (socket path, SPI clock, pin muxing) is not part of this
 * interface: each platform's own entry point does it before calling core code.
 *
 * Nothing here is for the ivshmem/virtio link; that side brings its own
 * interface later.
 */
#ifndef RTOS_INMATE_HAL_H
#define RTOS_INMATE_HAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Largest single CS-low window any implementation must accept. */
#define HAL_SPI_MAX_XFER 64u

/*
 * One SPI transaction: CS low, clock out n bytes of tx while clocking in n
 * bytes, CS high.  rx may be NULL when the answer is not wanted.  tx must not
 * be NULL.  1 <= n <= HAL_SPI_MAX_XFER.
 * Returns 0 on success, a negative value on failure (timeout, link lost);
 * on failure the contents of rx are unspecified.
 */
int hal_spi_transfer(const uint8_t *tx, uint8_t *rx, size_t n);

/* Level of the MCP2515 INT pin: true while the (active-low) pin is low. */
bool hal_int_asserted(void);

/*
 * Wait until INT is asserted or timeout_ns has passed, whichever comes
 * first; returns hal_int_asserted() at the end.  Bare metal spins on the pin
 * level; the hosted build blocks in the simulator so idle loops do not burn
 * a host CPU.  A timeout of 0 is a plain level read.
 */
bool hal_int_wait(uint64_t timeout_ns);

/* Monotonic time in nanoseconds since an arbitrary origin. */
uint64_t hal_now_ns(void);

/* Busy or sleeping delay of at least us microseconds. */
void hal_delay_us(uint32_t us);

/*
 * printf-style diagnostics (one line per call, no trailing newline needed).
 * Formats the core uses: %s %c %d %u %x %X %p with optional 0/width and
 * l/ll/z length modifiers.  Not for the hot path.
 */
void hal_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif /* RTOS_INMATE_HAL_H */
