/* SPDX-License-Identifier: MIT */
/*
 * spi_proto.h - wire format between the hosted HAL (client) and the Python
 * MCP2515 simulator (server, ivshmem_virtio/hwsim/spisock.py) over a UNIX
 * stream socket.  tests/inmate checks these numbers against the Python side.
 *
 * Every message, both directions, is a 4-byte header then `len` payload
 * bytes:
 *
 *   u8  op     request op; the answer carries op | SPIP_REPLY
 *   u8  zero   must be 0
 *   u16 len    payload length, little endian
 *
 *   op          request payload            reply payload
 *   HELLO 0x01  u32 magic, u16 version     u16 version
 *   XFER  0x02  1..64 MOSI bytes (one      the same number of MISO bytes
 *               CS-low window)
 *   INT   0x03  none                       u8 INT pin level (0 = low = asserted)
 *   WAIT  0x04  u32 timeout_us (<= 1 s)    u8 INT pin level, sent as soon as
 *                                          the pin is low or the time is up
 *   UART  0x05  1..64 bytes of console     none (the simulator records them
 *               output (the log drain)     and when they were written)
 *   TIME  0x06  none                       u64 the chip's time in ns, LE
 *   DELAY 0x07  u32 us (<= 1 s)            none, once that time has passed
 *
 * TIME and DELAY (version 2) put hal_now_ns/hal_delay_us on the simulator's
 * clock: with simulated bus time the driver's timers and the bus agree.
 *
 * The client sends HELLO first and then one request at a time, waiting for
 * its reply.  Anything unexpected (bad op, nonzero byte 1, wrong length,
 * wrong magic or version) makes the receiver close the connection.
 */
#ifndef RTOS_INMATE_SPI_PROTO_H
#define RTOS_INMATE_SPI_PROTO_H

#define SPIP_MAGIC 0x5350434Du /* "MCPS" little endian */
#define SPIP_VERSION 2u
#define SPIP_HDR_LEN 4u
#define SPIP_MAX_XFER 64u
#define SPIP_MAX_WAIT_US 1000000u

#define SPIP_OP_HELLO 0x01u
#define SPIP_OP_XFER 0x02u
#define SPIP_OP_INT 0x03u
#define SPIP_OP_WAIT 0x04u
#define SPIP_OP_UART 0x05u
#define SPIP_OP_TIME 0x06u
#define SPIP_OP_DELAY 0x07u
#define SPIP_REPLY 0x80u

#endif /* RTOS_INMATE_SPI_PROTO_H */
