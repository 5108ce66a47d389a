"""MCP2515 register map, SPI instruction set and the SPI accounting of the simulator.

The chip's static side (DS20001801 register addresses and bits, identifier packing) and what the
simulator counts on the SPI bus (transactions, INT-to-RTS windows), split from
:mod:`ivshmem_virtio.hwsim.mcp2515` (the chip's behaviour) so that each file reads on its own.
Every name stays importable from ``mcp2515`` as before.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# --- SPI instructions -------------------------------------------------------
INSTR_RESET = 0xC0
INSTR_READ = 0x03
INSTR_WRITE = 0x02
INSTR_BIT_MODIFY = 0x05
INSTR_READ_STATUS = 0xA0
INSTR_RX_STATUS = 0xB0
INSTR_READ_RXB = (0x90, 0x92, 0x94, 0x96)  # RXB0 SIDH, RXB0 D0, RXB1 SIDH, RXB1 D0
INSTR_LOAD_TXB = (0x40, 0x41, 0x42, 0x43, 0x44, 0x45)  # TXBn SIDH / D0, n = 0..2
INSTR_RTS_BASE = 0x80  # | buffer mask 0..7

# --- registers --------------------------------------------------------------
BFPCTRL = 0x0C
TXRTSCTRL = 0x0D
CANSTAT = 0x0E
CANCTRL = 0x0F
TEC = 0x1C
REC = 0x1D
RXM0SIDH = 0x20
RXM1SIDH = 0x24
CNF3 = 0x28
CNF2 = 0x29
CNF1 = 0x2A
CANINTE = 0x2B
CANINTF = 0x2C
EFLG = 0x2D
TXB_BASE = (0x30, 0x40, 0x50)
RXB_BASE = (0x60, 0x70)
RXF_SIDH = (0x00, 0x04, 0x08, 0x10, 0x14, 0x18)

# OPMOD / REQOP values
MODE_NORMAL = 0x00
MODE_SLEEP = 0x20
MODE_LOOPBACK = 0x40
MODE_LISTEN = 0x60
MODE_CONFIG = 0x80
MODE_NAMES = {
    MODE_NORMAL: "normal",
    MODE_SLEEP: "sleep",
    MODE_LOOPBACK: "loopback",
    MODE_LISTEN: "listen-only",
    MODE_CONFIG: "config",
}
CANCTRL_ABAT = 0x10
CANCTRL_RESET = 0x87

# CANINTE / CANINTF bits
INT_RX0 = 0x01
INT_RX1 = 0x02
INT_TX0 = 0x04
INT_TX1 = 0x08
INT_TX2 = 0x10
INT_ERR = 0x20
INT_WAK = 0x40
INT_MERR = 0x80
INT_TX = (INT_TX0, INT_TX1, INT_TX2)

# EFLG bits
EFLG_EWARN = 0x01
EFLG_RXWAR = 0x02
EFLG_TXWAR = 0x04
EFLG_RXEP = 0x08
EFLG_TXEP = 0x10
EFLG_TXBO = 0x20
EFLG_RX0OVR = 0x40
EFLG_RX1OVR = 0x80

# TXBnCTRL bits
TXB_ABTF = 0x40
TXB_MLOA = 0x20
TXB_TXERR = 0x10
TXB_TXREQ = 0x08
TXB_TXP = 0x03

# RXBnCTRL bits
RXB_RXM = 0x60
RXB_RXRTR = 0x08
RXB0_BUKT = 0x04
RXB0_BUKT1 = 0x02

SIDL_SRR = 0x10
SIDL_IDE = 0x08
DLC_RTR = 0x40

# Registers that only take writes in configuration mode.
CONFIG_ONLY = frozenset(
    [a for base in (0x00, 0x10) for a in range(base, base + 12)]
    + list(range(0x20, 0x28))
    + [CNF3, CNF2, CNF1, TXRTSCTRL]
)
# Registers BIT MODIFY works on; on any other the mask is forced to 0xFF.
BIT_MODIFIABLE = frozenset(
    [BFPCTRL, TXRTSCTRL, CANCTRL, CNF3, CNF2, CNF1, CANINTE, CANINTF, EFLG]
    + list(TXB_BASE)
    + list(RXB_BASE)
)

MAX_TRANSFER = 64
BUS_OFF_RECOVERY_BITS = 128 * 11


def _canon(addr: int) -> int:
    """CANSTAT and CANCTRL appear at xE/xF of every 16-byte block."""
    addr &= 0x7F
    if addr & 0x0F == 0x0E:
        return CANSTAT
    if addr & 0x0F == 0x0F:
        return CANCTRL
    return addr


def pack_id(arbitration_id: int, extended: bool) -> tuple[int, int, int, int]:
    """SIDH, SIDL (without SRR), EID8, EID0 for an identifier."""
    if extended:
        sid = (arbitration_id >> 18) & 0x7FF
        return (
            sid >> 3,
            ((sid & 7) << 5) | SIDL_IDE | ((arbitration_id >> 16) & 3),
            (arbitration_id >> 8) & 0xFF,
            arbitration_id & 0xFF,
        )
    return (arbitration_id >> 3) & 0xFF, (arbitration_id & 7) << 5, 0, 0


def unpack_id(sidh: int, sidl: int, eid8: int, eid0: int) -> tuple[int, bool]:
    """Identifier and extended flag from SIDH, SIDL, EID8, EID0."""
    sid = (sidh << 3) | (sidl >> 5)
    if sidl & SIDL_IDE:
        return (sid << 18) | ((sidl & 3) << 16) | (eid8 << 8) | eid0, True
    return sid, False


@dataclass
class SpiTransaction:
    """One CS-low window as the chip saw it."""

    t_ns: int
    opcode: int
    nbytes: int
    int_asserted: bool  # INT pin level when CS went low


@dataclass
class IntWindow:
    """From one INT assertion to the first RTS after it (or the next assertion).

    ``assert_*`` is when the pin went low.  ``observed_*`` is when the driver
    first learned of the frame: it read the pin as low (``observed_via ==
    "int"``, the hosted HAL's INT/WAIT requests) or a status read it issued
    returned an RX flag (``"status"``, counted from the start of that read).
    Byte counts are the chip's running total, RTS byte included.
    """

    assert_ns: int
    assert_bytes: int
    observed_ns: int | None = None
    observed_bytes: int | None = None
    observed_via: str | None = None
    rts_ns: int | None = None
    rts_bytes: int | None = None
    transactions: int = 0

    @property
    def bytes_from_assert(self) -> int | None:
        return None if self.rts_bytes is None else self.rts_bytes - self.assert_bytes

    @property
    def bytes_from_observed(self) -> int | None:
        if self.rts_bytes is None or self.observed_bytes is None:
            return None
        return self.rts_bytes - self.observed_bytes


class SpiStats:
    """SPI byte/transaction counters, a bounded transaction log, INT windows."""

    def __init__(self, log_len: int = 10000) -> None:
        self.total_bytes = 0
        self.total_transactions = 0
        self.by_opcode: dict[int, int] = {}
        self.log: deque[SpiTransaction] = deque(maxlen=log_len)
        self.windows: deque[IntWindow] = deque(maxlen=log_len)

    def record(self, t_ns: int, opcode: int, nbytes: int, int_asserted: bool) -> None:
        self.total_bytes += nbytes
        self.total_transactions += 1
        self.by_opcode[opcode] = self.by_opcode.get(opcode, 0) + 1
        self.log.append(SpiTransaction(t_ns, opcode, nbytes, int_asserted))
        if self.windows and self.windows[-1].rts_ns is None:
            self.windows[-1].transactions += 1

    def int_asserted(self, t_ns: int) -> None:
        self.windows.append(IntWindow(assert_ns=t_ns, assert_bytes=self.total_bytes))

    def int_observed(self, t_ns: int, via: str = "int", nbytes: int | None = None) -> None:
        """The driver learned of the pending frame; ``nbytes`` defaults to the total."""
        w = self.windows[-1] if self.windows else None
        if w is not None and w.observed_ns is None and w.rts_ns is None:
            w.observed_ns = t_ns
            w.observed_bytes = self.total_bytes if nbytes is None else nbytes
            w.observed_via = via

    def rts(self, t_ns: int) -> None:
        if self.windows and self.windows[-1].rts_ns is None:
            self.windows[-1].rts_ns = t_ns
            self.windows[-1].rts_bytes = self.total_bytes

    def fast_reply_windows(self) -> list[IntWindow]:
        """Windows that ended with an RTS."""
        return [w for w in self.windows if w.rts_ns is not None]
