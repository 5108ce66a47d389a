/* SPDX-License-Identifier: MIT */
/*
 * mcp2515_regs.h - MCP2515 SPI instructions and register map (wire format
 * only).  Facts from Microchip DS20001801 as used by Linux mcp251x.c and
 * Zephyr can_mcp2515.c; the Python simulator (ivshmem_virtio/hwsim/mcp2515.py)
 * carries the same numbers.
 */
#ifndef RTOS_INMATE_MCP2515_REGS_H
#define RTOS_INMATE_MCP2515_REGS_H

/* SPI instructions (one per CS-low window) */
#define MCP_INSTR_RESET 0xC0u
#define MCP_INSTR_READ 0x03u
#define MCP_INSTR_WRITE 0x02u
#define MCP_INSTR_BIT_MODIFY 0x05u
#define MCP_INSTR_READ_STATUS 0xA0u
#define MCP_INSTR_RX_STATUS 0xB0u
#define MCP_INSTR_READ_RXB0_SIDH 0x90u /* clears RX0IF when CS rises */
#define MCP_INSTR_READ_RXB0_D0 0x92u
#define MCP_INSTR_READ_RXB1_SIDH 0x94u /* clears RX1IF when CS rises */
#define MCP_INSTR_READ_RXB1_D0 0x96u
#define MCP_INSTR_LOAD_TXB0_SIDH 0x40u
#define MCP_INSTR_LOAD_TXB0_D0 0x41u
#define MCP_INSTR_RTS_TXB0 0x81u
#define MCP_INSTR_LOAD_TXB1_SIDH 0x42u
#define MCP_INSTR_LOAD_TXB1_D0 0x43u
#define MCP_INSTR_RTS_TXB1 0x82u

/* READ STATUS answer bits */
#define MCP_STAT_RX0IF 0x01u
#define MCP_STAT_RX1IF 0x02u
#define MCP_STAT_TXB0_TXREQ 0x04u
#define MCP_STAT_TX0IF 0x08u
#define MCP_STAT_TXB1_TXREQ 0x10u
#define MCP_STAT_TX1IF 0x20u

/* Registers */
#define MCP_RXF0SIDH 0x00u
#define MCP_BFPCTRL 0x0Cu
#define MCP_TXRTSCTRL 0x0Du
#define MCP_CANSTAT 0x0Eu
#define MCP_CANCTRL 0x0Fu
#define MCP_RXF3SIDH 0x10u
#define MCP_TEC 0x1Cu
#define MCP_REC 0x1Du
#define MCP_RXM0SIDH 0x20u
#define MCP_RXM1SIDH 0x24u
#define MCP_CNF3 0x28u
#define MCP_CNF2 0x29u
#define MCP_CNF1 0x2Au
#define MCP_CANINTE 0x2Bu
#define MCP_CANINTF 0x2Cu
#define MCP_EFLG 0x2Du
#define MCP_TXB0CTRL 0x30u
#define MCP_TXB1CTRL 0x40u
#define MCP_RXB0CTRL 0x60u
#define MCP_RXB1CTRL 0x70u

/* CANSTAT / CANCTRL */
#define MCP_OPMOD_MASK 0xE0u
#define MCP_MODE_NORMAL 0x00u
#define MCP_MODE_SLEEP 0x20u
#define MCP_MODE_LOOPBACK 0x40u
#define MCP_MODE_LISTEN 0x60u
#define MCP_MODE_CONFIG 0x80u
#define MCP_CANCTRL_ABAT 0x10u
#define MCP_CANCTRL_OSM 0x08u
/* Power-on/reset CANCTRL is 0x87; Linux probes (CANCTRL & 0x17) == 0x07. */
#define MCP_CANCTRL_PROBE_MASK 0x17u
#define MCP_CANCTRL_PROBE_VAL 0x07u

/* CNF2 / CNF3 fields */
#define MCP_CNF2_BTLMODE 0x80u
#define MCP_CNF2_SAM 0x40u

/* CANINTE / CANINTF */
#define MCP_INT_RX0 0x01u
#define MCP_INT_RX1 0x02u
#define MCP_INT_TX0 0x04u
#define MCP_INT_TX1 0x08u
#define MCP_INT_TX2 0x10u
#define MCP_INT_ERR 0x20u
#define MCP_INT_WAK 0x40u
#define MCP_INT_MERR 0x80u

/* EFLG */
#define MCP_EFLG_EWARN 0x01u
#define MCP_EFLG_RXWAR 0x02u
#define MCP_EFLG_TXWAR 0x04u
#define MCP_EFLG_RXEP 0x08u
#define MCP_EFLG_TXEP 0x10u
#define MCP_EFLG_TXBO 0x20u
#define MCP_EFLG_RX0OVR 0x40u
#define MCP_EFLG_RX1OVR 0x80u

/* TXBnCTRL */
#define MCP_TXBCTRL_ABTF 0x40u
#define MCP_TXBCTRL_MLOA 0x20u
#define MCP_TXBCTRL_TXERR 0x10u
#define MCP_TXBCTRL_TXREQ 0x08u
#define MCP_TXBCTRL_TXP_MASK 0x03u /* 3 = highest priority */

/* RXBnCTRL */
#define MCP_RXBCTRL_RXM_ANY 0x60u /* masks/filters off */
#define MCP_RXBCTRL_RXRTR 0x08u
#define MCP_RXBCTRL_BUKT 0x04u

/* ID / DLC packing in SIDH, SIDL, EID8, EID0, DLC (TX and RX buffers) */
#define MCP_SIDL_SRR 0x10u /* RX, standard frame: remote request */
#define MCP_SIDL_IDE 0x08u /* extended identifier */
#define MCP_SIDL_EID_MASK 0x03u
#define MCP_DLC_RTR 0x40u
#define MCP_DLC_MASK 0x0Fu

/* Bytes after a READ RX BUFFER instruction: SIDH SIDL EID8 EID0 DLC D0..D7 */
#define MCP_RXB_PAYLOAD 13u

#endif /* RTOS_INMATE_MCP2515_REGS_H */
