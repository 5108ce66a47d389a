/* SPDX-License-Identifier: MIT */
/*
 * hal_hosted.h - set-up of the hosted HAL (Linux process talking to the
 * Python MCP2515 simulator).  Only hosted entry points include this.
 */
#ifndef RTOS_INMATE_HAL_HOSTED_H
#define RTOS_INMATE_HAL_HOSTED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Connect to the simulator's UNIX socket and say HELLO.  0 or -errno. */
int hal_hosted_open(const char *socket_path);
void hal_hosted_close(void);

/* False once the link failed; every HAL call then fails fast. */
bool hal_hosted_ok(void);

/* Log lines go to stderr unless quiet. */
void hal_hosted_set_quiet(bool quiet);

/*
 * hal_log only fills the RAM ring (core/logring.h).  The main loop calls
 * this when logring_idle() says so: up to max (<= 64) bytes go to stderr
 * and, as UART output, to the simulator, which counts bytes written while
 * the driver handles received frames.  Returns the bytes written.
 */
size_t hal_hosted_log_drain(size_t max);

/* Everything left, to stderr only (exit paths). */
void hal_hosted_log_flush(void);

/* SPI bytes this process sent (for cross-checks against the simulator). */
uint64_t hal_hosted_spi_bytes(void);

#endif /* RTOS_INMATE_HAL_HOSTED_H */
