"""MCP2515 stand-alone CAN controller, simulated at the SPI-instruction level.

The model follows Microchip DS20001801 (register map, instruction set, receive
flow with filters, masks and RXB0 rollover, interrupt flags and the INT pin) as
far as a driver can observe it through SPI.  What is *not* modelled: bit-level
bus timing (a frame is on the wire the moment RTS is executed), arbitration
and the one-shot mode; CLKOUT, RXnBF and TXnRTS pins; sleep/wake-up beyond
"no TX/RX while asleep".

Deliberate simplifications, each documented where it lives:
- a failed transmission is retried at once, so error injection drives TEC up
  synchronously (32 failures reach bus-off inside one RTS);
- entering configuration mode clears TEC, REC and the error flags;
- bus-off recovery (128 x 11 recessive bits) happens in normal mode after that
  many bit times at the bitrate programmed in CNF1..3 for ``osc_hz``.

The SPI side is :meth:`Mcp2515.transfer` (one CS-low window per call).  The
wire side is :meth:`Mcp2515.receive` (frames arriving from the bus) and
``tx_sink`` (frames the chip transmits); :meth:`Mcp2515.attach_bus` connects
both to a python-can bus.  :mod:`ivshmem_virtio.hwsim.spisock` serves
``transfer`` and the INT pin to the hosted C inmate over a UNIX socket.

Run as a process (the process owns both the socket and the CAN bus):
``python -m ivshmem_virtio.hwsim --socket PATH --bus virtual:NAME`` (hwsim/__main__.py).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import can

from .canbits import frame_time_ns
from .mcp2515_regs import (  # noqa: F401 - re-exported: the chip module keeps every name
    BFPCTRL,
    BIT_MODIFIABLE,
    BUS_OFF_RECOVERY_BITS,
    CANCTRL,
    CANCTRL_ABAT,
    CANCTRL_RESET,
    CANINTE,
    CANINTF,
    CANSTAT,
    CNF1,
    CNF2,
    CNF3,
    CONFIG_ONLY,
    DLC_RTR,
    EFLG,
    EFLG_EWARN,
    EFLG_RX0OVR,
    EFLG_RX1OVR,
    EFLG_RXEP,
    EFLG_RXWAR,
    EFLG_TXBO,
    EFLG_TXEP,
    EFLG_TXWAR,
    INSTR_BIT_MODIFY,
    INSTR_LOAD_TXB,
    INSTR_READ,
    INSTR_READ_RXB,
    INSTR_READ_STATUS,
    INSTR_RESET,
    INSTR_RTS_BASE,
    INSTR_RX_STATUS,
    INSTR_WRITE,
    INT_ERR,
    INT_MERR,
    INT_RX0,
    INT_RX1,
    INT_TX,
    INT_TX0,
    INT_TX1,
    INT_TX2,
    INT_WAK,
    MAX_TRANSFER,
    MODE_CONFIG,
    MODE_LISTEN,
    MODE_LOOPBACK,
    MODE_NAMES,
    MODE_NORMAL,
    MODE_SLEEP,
    REC,
    RXB0_BUKT,
    RXB0_BUKT1,
    RXB_BASE,
    RXB_RXM,
    RXB_RXRTR,
    RXF_SIDH,
    RXM0SIDH,
    RXM1SIDH,
    SIDL_IDE,
    SIDL_SRR,
    TEC,
    TXB_ABTF,
    TXB_BASE,
    TXB_MLOA,
    TXB_TXERR,
    TXB_TXP,
    TXB_TXREQ,
    TXRTSCTRL,
    IntWindow,
    SpiStats,
    SpiTransaction,
    _canon,
    pack_id,
    unpack_id,
)
from .simclock import SimClock

#: bits an error frame and its delimiter hold the bus after a failed attempt (6 flag bits,
#: up to 6 echoed by the other nodes, 8 delimiter bits, 3 intermission)
ERROR_FRAME_BITS = 23
#: recessive bits the chip waits for before a mode change takes effect (bus idle)
MODE_CHANGE_BITS = 11


def arbitration_key(msg: can.Message) -> tuple[int, int, int, int, int]:
    """Order in which frames win arbitration (lowest first), bit by bit as on the wire.

    Base id first; then a standard frame's RTR against an extended frame's SRR (recessive),
    then IDE; an extended id's low 18 bits; finally its RTR. A standard data frame beats an
    extended frame with the same base id, and a data frame beats a remote frame of its id.
    """
    rtr = int(bool(msg.is_remote_frame))
    if msg.is_extended_id:
        return (msg.arbitration_id >> 18, 1, 1, msg.arbitration_id & 0x3FFFF, rtr)
    return (msg.arbitration_id, rtr, 0, 0, 0)


@dataclass
class _OnBus:
    """The frame holding the bus: from another node (``txb`` None) or one of our buffers."""

    msg: can.Message
    start_ns: int
    end_ns: int
    txb: int | None
    fails: bool = False


class Mcp2515:
    """The chip.  Thread-safe: SPI, the wire and tests may call from any thread.

    ``rx_mode`` decides what happens to frames from the bus:
    - ``"wire"``: as on a real bus, a frame is accepted into a free RX buffer
      or lost with RXnOVR at the moment it arrives;
    - ``"backpressure"``: a frame waits on the wire until both RX buffers are
      empty, then goes to RXB0.  Never lost, never reordered: for functional
      tests of a driver that is slower than a real bus (a hosted process).

    ``sim_clock`` turns on bus time (:mod:`.simclock`): a frame holds the bus for its
    stuffed bit length at the programmed bitrate (TXREQ stays set meanwhile, TXnIF at its
    end), frames from other nodes (``receive``, ``schedule``) and the chip's own buffers
    arbitrate by id at every bus idle, a frame reaches the RX buffers at its end of frame,
    failed attempts take their bit time plus an error frame, and mode changes wait for the
    bus and 11 recessive bits. Without it a transmission completes at RTS (functional tests
    whose clock is the host's).
    """

    def __init__(
        self,
        *,
        osc_hz: int = 16_000_000,
        rx_mode: str = "wire",
        tx_sink: Callable[[can.Message], None] | None = None,
        mode_change_reads: int = 0,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        sim_clock: SimClock | None = None,
    ) -> None:
        if rx_mode not in ("wire", "backpressure"):
            raise ValueError(f"rx_mode must be 'wire' or 'backpressure', not {rx_mode!r}")
        if not 1_000_000 <= osc_hz <= 40_000_000:
            raise ValueError(f"osc_hz out of range: {osc_hz}")
        if mode_change_reads < 0:
            raise ValueError("mode_change_reads must be >= 0")
        self.osc_hz = osc_hz
        self.rx_mode = rx_mode
        self.tx_sink = tx_sink
        self.mode_change_reads = mode_change_reads
        self._clock = clock_ns if sim_clock is None else sim_clock.now_ns
        self.sim_clock = sim_clock
        # bus time (sim_clock only): the frame on the bus, when the bus went idle, frames of
        # other nodes waiting for it (sorted by the time they are ready), when each TX
        # buffer's TXREQ was set, and a mode change waiting for the bus
        self._on_bus: _OnBus | None = None
        self._bus_idle_ns = self._clock()
        self._ext: list[tuple[int, int, can.Message, str]] = []
        self._ext_seq = itertools.count()
        self._tx_ready_ns = [0, 0, 0]
        self._mode_due_ns: int | None = None
        self._arrivals = 0
        self.bus_frames = 0
        self.bus_busy_ns = 0
        self.arbitration_lost = 0
        #: (time, SPI byte total, id) of every frame put into an RX buffer, and of every RTS
        #: (time, SPI byte total, buffer mask): per-frame SPI budgets under load
        self.rx_log: deque[tuple[int, int, int]] = deque(maxlen=100_000)
        self.rts_log: deque[tuple[int, int, int]] = deque(maxlen=100_000)
        self._lock = threading.RLock()
        self._int_cond = threading.Condition(self._lock)
        self.stats = SpiStats()
        self.violations: list[str] = []
        self.tx_count = 0
        self.rx_count = 0
        self.rx_filtered = 0
        self.rx_overflows = 0
        self.rx_dropped_mode = 0
        self.rx_ignored = 0
        self.tx_sink_errors = 0
        self._backlog: deque[can.Message] = deque()
        self._tx_fail_remaining = 0
        self._bus_fault = False
        self._no_ack = False
        self.stalled_ids: set[int] = set()
        self._int_forced_low = False
        # UART output of the hosted inmate (SpiSocketServer's UART op), and how much of it
        # was written while the driver was handling received frames (see uart_write)
        self.uart = bytearray()
        self.uart_bytes_in_rx = 0
        self.uart_bytes_int_pending = 0
        self._rx_handling = False
        self._bus_thread: threading.Thread | None = None
        self._bus_stop = threading.Event()
        self._bus: can.BusABC | None = None
        self.regs = bytearray(0x80)
        self._int_level_low = False
        self._reset_state()

    # ------------------------------------------------------------ state
    def _reset_state(self) -> None:
        for i in range(len(self.regs)):
            self.regs[i] = 0
        self.regs[CANCTRL] = CANCTRL_RESET
        self._mode = MODE_CONFIG
        self._pending_mode: int | None = None
        self._pending_reads = 0
        self._tec = 0
        self._rec = 0
        self._bus_off = False
        self._bus_off_ns = 0
        self._update_int()

    @property
    def mode(self) -> int:
        with self._lock:
            return self._mode

    @property
    def int_asserted(self) -> bool:
        """INT pin low: some CANINTF flag whose CANINTE bit is set (or forced low)."""
        with self._lock:
            return bool(self.regs[CANINTE] & self.regs[CANINTF]) or self._int_forced_low

    def force_int_low(self, on: bool) -> None:
        """Hold the INT pin low with no flag behind it (noise, a wiring fault)."""
        with self._int_cond:
            self._int_forced_low = on
            if on:
                self._int_cond.notify_all()

    def uart_write(self, data: bytes) -> None:
        """The inmate's UART output; bytes written while it handles frames are counted.

        "Handling" runs from a READ RX BUFFER until a status read shows no RX flag:
        the driver's RX callbacks (relay, fast-reply dispatch) run inside it, so a log
        line emitted from them lands in ``uart_bytes_in_rx``. Bytes written while a frame
        waits unseen (INT low) go to ``uart_bytes_int_pending``: a drain that started just
        before a frame arrived, bounded by the driver's chunk size.
        """
        with self._lock:
            self.uart += data
            if self._rx_handling:
                self.uart_bytes_in_rx += len(data)
            elif self.regs[CANINTF] & (INT_RX0 | INT_RX1):
                self.uart_bytes_int_pending += len(data)

    @property
    def tec(self) -> int:
        with self._lock:
            return min(self._tec, 255)

    @property
    def rec(self) -> int:
        with self._lock:
            return min(self._rec, 255)

    @property
    def bus_off(self) -> bool:
        with self._lock:
            return self._bus_off

    def register(self, addr: int) -> int:
        """Register value without read side effects (for tests)."""
        with self._lock:
            if _canon(addr) == CANSTAT:
                return self._mode | (self._icod() << 1)
            return self._read_reg(addr)

    def cnf(self) -> tuple[int, int, int]:
        """CNF1, CNF2, CNF3."""
        with self._lock:
            return self.regs[CNF1], self.regs[CNF2], self.regs[CNF3]

    def bit_timing(self) -> dict[str, int] | None:
        """BRP and segments decoded from CNF1..3, plus the bitrate at osc_hz."""
        with self._lock:
            cnf1, cnf2, cnf3 = self.regs[CNF1], self.regs[CNF2], self.regs[CNF3]
        brp = cnf1 & 0x3F
        sjw = (cnf1 >> 6) + 1
        prop = (cnf2 & 7) + 1
        ps1 = ((cnf2 >> 3) & 7) + 1
        ps2 = (cnf3 & 7) + 1 if cnf2 & 0x80 else max(ps1, 2)
        ntq = 1 + prop + ps1 + ps2
        return {
            "brp": brp,
            "sjw": sjw,
            "prop": prop,
            "ps1": ps1,
            "ps2": ps2,
            "ntq": ntq,
            "bitrate": self.osc_hz // (2 * (brp + 1) * ntq),
            "sample_point_permille": (1 + prop + ps1) * 1000 // ntq,
        }

    def _bitrate(self) -> int:
        timing = self.bit_timing()
        return timing["bitrate"] if timing and timing["bitrate"] > 0 else 125_000

    def _now(self) -> int:
        return self._clock()

    def now_ns(self) -> int:
        """The chip's time: the sim_clock's, else the host's monotonic clock."""
        return self._clock()

    def _violation(self, text: str) -> None:
        self.violations.append(text)

    # ------------------------------------------------------------ INT pin
    def _update_int(self) -> None:
        low = bool(self.regs[CANINTE] & self.regs[CANINTF])
        if low and not self._int_level_low:
            self.stats.int_asserted(self._now())
            self._int_cond.notify_all()
        self._int_level_low = low

    def wait_int(self, timeout_s: float) -> bool:
        """Block until INT is asserted or timeout_s passes; returns the level.

        With a ``sim_clock`` the timeout is simulated time: the clock jumps to the next
        scheduled bus event while one comes before the deadline; with nothing scheduled it
        waits for the host (a frame from a python-can bus, a test's call) and advances by
        the host time that passed.
        """
        if self.sim_clock is not None:
            return self._wait_int_sim(self.sim_clock, int(max(0.0, timeout_s) * 1e9))
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._int_cond:
            while True:
                self._tick()
                if self.regs[CANINTE] & self.regs[CANINTF] or self._int_forced_low:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # wake at least every 5 ms for time-based events (bus-off recovery)
                self._int_cond.wait(min(left, 0.005))

    def _wait_int_sim(self, clock: SimClock, timeout_ns: int) -> bool:
        deadline = clock.now_ns() + timeout_ns
        with self._int_cond:
            while True:
                self._tick()
                if self.regs[CANINTE] & self.regs[CANINTF] or self._int_forced_low:
                    return True
                now = clock.now_ns()
                if now >= deadline:
                    return False
                nxt = self._next_event_ns()
                if nxt is not None and nxt <= deadline:
                    clock.advance_to(nxt)
                    continue
                t0 = time.monotonic_ns()
                arrivals = self._arrivals
                self._int_cond.wait(min(deadline - now, 5_000_000) / 1e9)
                if self._arrivals != arrivals:
                    # woken by a frame (or a test's call) stamped with the time it came:
                    # the host's wake-up delay is not bus time, or back-to-back frames
                    # would all end at once and overflow
                    continue
                clock.advance_to(min(deadline, now + time.monotonic_ns() - t0))

    def spend(self, ns: int) -> None:
        """Simulated time the driver spends outside SPI (a delay, a GPIO read)."""
        if self.sim_clock is not None:
            with self._lock:
                self.sim_clock.advance(ns)
                self._tick()
                self._update_int()

    def note_int_observed(self) -> None:
        """The driver read INT as asserted (called by the SPI socket server)."""
        with self._lock:
            self.stats.int_observed(self._now())

    # ------------------------------------------------------------ SPI
    def transfer(self, mosi: bytes | bytearray) -> bytes:
        """One CS-low window: clock out ``mosi``, return the MISO bytes."""
        n = len(mosi)
        if not 1 <= n <= MAX_TRANSFER:
            raise ValueError(f"SPI transfer of {n} bytes (1..{MAX_TRANSFER})")
        data = bytes(mosi)
        with self._lock:
            if self.sim_clock is not None:
                # the window's effects land at CS rise, after its bytes' wire time
                self.sim_clock.advance(self.sim_clock.spi_ns(n))
            self._tick()
            t = self._now()
            before = self.stats.total_bytes
            rx_pending = self.regs[CANINTF] & (INT_RX0 | INT_RX1)
            self.stats.record(t, data[0], n, self._int_level_low)
            if rx_pending and self._reveals_rx_flags(data):
                self.stats.int_observed(t, "status", before)
            miso = self._execute(data)
            if self._rx_handling and self._reveals_rx_flags(data) and not rx_pending:
                self._rx_handling = False  # the driver looked and found nothing more
            self._update_int()
            return miso

    @staticmethod
    def _reveals_rx_flags(d: bytes) -> bool:
        """Does this transaction show the driver RX0IF/RX1IF?"""
        if d[0] in (INSTR_READ_STATUS, INSTR_RX_STATUS):
            return len(d) >= 2
        if d[0] == INSTR_READ and len(d) >= 3:
            first = d[1] & 0x7F
            return first <= CANINTF < first + len(d) - 2
        return False

    def _execute(self, d: bytes) -> bytes:
        op = d[0]
        n = len(d)
        miso = bytearray(b"\xff" * n)
        if op == INSTR_RESET:
            self._reset_state()
            self._backlog_pump()
        elif op == INSTR_READ:
            if n >= 2:
                addr = d[1]
                for i in range(2, n):
                    miso[i] = self._read_reg(addr)
                    addr = (addr + 1) & 0x7F
        elif op == INSTR_WRITE:
            if n >= 2:
                addr = d[1]
                for i in range(2, n):
                    self._write_reg(addr, d[i], 0xFF, "WRITE")
                    addr = (addr + 1) & 0x7F
        elif op == INSTR_BIT_MODIFY:
            if n >= 4:
                addr = _canon(d[1])
                mask = d[2] if addr in BIT_MODIFIABLE else 0xFF
                self._write_reg(addr, d[3], mask, "BIT MODIFY")
            else:
                self._violation(f"BIT MODIFY with {n} bytes (needs 4)")
        elif op == INSTR_READ_STATUS:
            st = self._read_status()
            for i in range(1, n):
                miso[i] = st
        elif op == INSTR_RX_STATUS:
            st = self._rx_status()
            for i in range(1, n):
                miso[i] = st
        elif op in INSTR_READ_RXB:
            buf = (op >> 2) & 1
            addr = RXB_BASE[buf] + (6 if op & 0x02 else 1)
            for i in range(1, n):
                miso[i] = self._read_reg(addr)
                addr = (addr + 1) & 0x7F
            # RXnIF clears when CS rises at the end of the instruction
            self.regs[CANINTF] &= ~(INT_RX0 if buf == 0 else INT_RX1) & 0xFF
            self._rx_handling = True
            self._backlog_pump()
        elif op in INSTR_LOAD_TXB:
            buf = (op - 0x40) >> 1
            addr = TXB_BASE[buf] + (6 if op & 1 else 1)
            for i in range(1, n):
                self._write_reg(addr, d[i], 0xFF, "LOAD TX BUFFER")
                addr += 1
                if addr > TXB_BASE[buf] + 13:
                    break
        elif op & 0xF8 == INSTR_RTS_BASE:
            if n != 1:
                self._violation(f"RTS with {n} bytes")
            self._rts(op & 0x07)
        else:
            self._violation(f"unknown instruction 0x{op:02x}")
        return bytes(miso)

    def _read_status(self) -> int:
        intf = self.regs[CANINTF]
        st = intf & (INT_RX0 | INT_RX1)
        for i, bits in enumerate(((2, 3), (4, 5), (6, 7))):
            if self.regs[TXB_BASE[i]] & TXB_TXREQ:
                st |= 1 << bits[0]
            if intf & INT_TX[i]:
                st |= 1 << bits[1]
        return st

    def _rx_status(self) -> int:
        intf = self.regs[CANINTF]
        full = intf & (INT_RX0 | INT_RX1)
        st = full << 6
        if full == 0:
            return st
        buf = 0 if full & INT_RX0 else 1
        base = RXB_BASE[buf]
        ext = bool(self.regs[base + 2] & SIDL_IDE)
        rtr = bool(self.regs[base] & RXB_RXRTR)
        st |= ((2 if ext else 0) | (1 if rtr else 0)) << 3
        if buf == 0:
            st |= self.regs[base] & 0x01
        else:
            filhit = self.regs[base] & 0x07
            # a rolled-over RXF0/RXF1 hit is reported as 110/111
            st |= (6 + filhit) if filhit < 2 else filhit
        return st

    def _read_reg(self, addr: int) -> int:
        addr = _canon(addr)
        if addr == CANSTAT:
            if self._pending_mode is not None and self.sim_clock is None:
                self._pending_reads -= 1
                if self._pending_reads <= 0:
                    mode = self._pending_mode
                    self._pending_mode = None
                    self._enter_mode(mode)
            return self._mode | (self._icod() << 1)
        if addr == TEC:
            return min(self._tec, 255)
        if addr == REC:
            return min(self._rec, 255)
        return self.regs[addr]

    def _icod(self) -> int:
        pending = self.regs[CANINTE] & self.regs[CANINTF]
        for bit, code in (
            (INT_ERR, 1),
            (INT_WAK, 2),
            (INT_TX0, 3),
            (INT_TX1, 4),
            (INT_TX2, 5),
            (INT_RX0, 6),
            (INT_RX1, 7),
        ):
            if pending & bit:
                return code
        return 0

    def _write_reg(self, addr: int, value: int, mask: int, how: str) -> None:
        addr = _canon(addr)
        old = self.regs[addr]
        new = (old & ~mask | value & mask) & 0xFF
        if addr == CANSTAT or addr in (TEC, REC):
            return  # read-only
        if addr in CONFIG_ONLY and self._mode != MODE_CONFIG:
            self._violation(f"{how} 0x{addr:02x} outside configuration mode (ignored)")
            return
        if addr == CANCTRL:
            self.regs[CANCTRL] = new
            self._canctrl_written()
            return
        if addr == EFLG:
            # only RX0OVR/RX1OVR are writable, and only to clear them
            keep = old & 0x3F
            self.regs[EFLG] = keep | (old & new & 0xC0)
            return
        if addr == TXRTSCTRL:
            self.regs[addr] = (old & 0x38) | (new & 0x07)
            return
        for i, base in enumerate(TXB_BASE):
            if addr == base:
                self._txbctrl_written(i, old, new)
                return
            if base < addr <= base + 13:
                if old != new and self.regs[base] & TXB_TXREQ:
                    self._violation(f"{how} TXB{i} 0x{addr:02x} while TXREQ is set (ignored)")
                    return
                self.regs[addr] = new
                return
        for i, base in enumerate(RXB_BASE):
            if addr == base:
                writable = RXB_RXM | (RXB0_BUKT if i == 0 else 0)
                ro = old & ~writable & 0xFF
                self.regs[addr] = ro | (new & writable)
                if i == 0:
                    bukt1 = RXB0_BUKT1 if new & RXB0_BUKT else 0
                    self.regs[addr] = (self.regs[addr] & ~RXB0_BUKT1 & 0xFF) | bukt1
                return
            if base < addr <= base + 13:
                self._violation(f"{how} to read-only RXB{i} register 0x{addr:02x}")
                return
        self.regs[addr] = new
        if addr in (CANINTE, CANINTF):
            self._backlog_pump()

    def _canctrl_written(self) -> None:
        v = self.regs[CANCTRL]
        if v & CANCTRL_ABAT:
            self._abort_all()
        req = v & 0xE0
        if req > MODE_CONFIG:
            req = MODE_CONFIG  # 101..111: invalid, treated as configuration
        if req == self._mode:
            self._pending_mode = None
            self._mode_due_ns = None
            return
        if self.sim_clock is not None:
            # the chip waits for the frame on the bus to end, then for bus idle
            busy_until = self._on_bus.end_ns if self._on_bus is not None else self._now()
            self._pending_mode = req
            self._mode_due_ns = busy_until + MODE_CHANGE_BITS * self._bit_ns()
        elif self.mode_change_reads > 0:
            self._pending_mode = req
            self._pending_reads = self.mode_change_reads
        else:
            self._enter_mode(req)

    def _enter_mode(self, mode: int) -> None:
        self._mode = mode
        if mode == MODE_CONFIG:
            # simplification: the error counters (and so the error flags) reset
            self._tec = 0
            self._rec = 0
            self._bus_off = False
            self._update_error_flags(signal=False)
        self._try_transmit()
        self._backlog_pump()

    def _txbctrl_written(self, i: int, old: int, new: int) -> None:
        base = TXB_BASE[i]
        writable = TXB_TXREQ | TXB_TXP
        val = (old & ~writable & 0xFF) | (new & writable)
        if val & TXB_TXREQ and not old & TXB_TXREQ:
            val &= ~(TXB_ABTF | TXB_MLOA | TXB_TXERR) & 0xFF
        elif old & TXB_TXREQ and not val & TXB_TXREQ:
            val |= TXB_ABTF  # clearing TXREQ of a pending buffer aborts it
        self.regs[base] = val
        if val & TXB_TXREQ and not old & TXB_TXREQ:
            self._tx_ready_ns[i] = self._now()
            self._try_transmit()

    def _rts(self, mask: int) -> None:
        for i in range(3):
            if mask & (1 << i):
                ctrl = self.regs[TXB_BASE[i]]
                self.regs[TXB_BASE[i]] = (ctrl | TXB_TXREQ) & ~(TXB_ABTF | TXB_MLOA | TXB_TXERR)
                if not ctrl & TXB_TXREQ:
                    self._tx_ready_ns[i] = self._now()
        if mask:
            self.stats.rts(self._now())
            self.rts_log.append((self._now(), self.stats.total_bytes, mask))
        self._try_transmit()

    def _abort_all(self) -> None:
        for base in TXB_BASE:
            if self.regs[base] & TXB_TXREQ:
                self.regs[base] = (self.regs[base] & ~TXB_TXREQ & 0xFF) | TXB_ABTF

    # ------------------------------------------------------------ TX
    def _pending_tx(self) -> list[int]:
        """Buffers with TXREQ, in the order the chip sends them."""
        pend = [i for i in range(3) if self.regs[TXB_BASE[i]] & TXB_TXREQ]
        # higher TXP first; equal TXP: higher buffer number first
        return sorted(pend, key=lambda i: (self.regs[TXB_BASE[i]] & TXB_TXP, i), reverse=True)

    def _frame_from_txb(self, i: int) -> can.Message:
        base = TXB_BASE[i]
        r = self.regs
        arb_id, ext = unpack_id(r[base + 1], r[base + 2], r[base + 3], r[base + 4])
        dlc = r[base + 5] & 0x0F
        rtr = bool(r[base + 5] & DLC_RTR)
        n = min(dlc, 8)
        return can.Message(
            timestamp=time.time(),
            arbitration_id=arb_id,
            is_extended_id=ext,
            is_remote_frame=rtr,
            dlc=n,
            data=None if rtr else bytes(r[base + 6 : base + 6 + n]),
            check=False,
        )

    def _try_transmit(self) -> None:
        if self.sim_clock is not None:
            self._advance_bus(self._now())
            return
        if self._mode not in (MODE_NORMAL, MODE_LOOPBACK) or self._bus_off:
            return
        for _ in range(3):
            if self.regs[CANCTRL] & CANCTRL_ABAT:
                self._abort_all()
                return
            # a buffer that cannot complete stays pending; the next one in priority order
            # gets the following attempt (the chip re-arbitrates at every bus idle)
            pend = [i for i in self._pending_tx() if not self._stalled(i)]
            if not pend:
                return
            i = pend[0]
            base = TXB_BASE[i]
            if self._mode == MODE_NORMAL:
                while self._bus_fault or self._tx_fail_remaining > 0:
                    # a failed attempt: TEC += 8, retried at once
                    if self._tx_fail_remaining > 0:
                        self._tx_fail_remaining -= 1
                    self.regs[base] |= TXB_TXERR
                    self._tec += 8
                    self._update_error_flags()
                    if self._bus_off:
                        return
                if self._no_ack:
                    self._fail_no_ack(base)
                    continue
            self._complete_tx(i)

    def _stalled(self, i: int) -> bool:
        """Does TXBi lose arbitration at every attempt (``stalled_ids``)?"""
        if self._mode != MODE_NORMAL:
            return False
        base = TXB_BASE[i]
        if self._no_ack and self.regs[base] & TXB_TXERR and self._tec >= 128:
            return True  # retried in the background, never completes
        if not self.stalled_ids:
            return False
        r = self.regs
        arb_id, _ = unpack_id(r[base + 1], r[base + 2], r[base + 3], r[base + 4])
        if arb_id in self.stalled_ids:
            self.regs[base] |= TXB_MLOA
            return True
        return False

    def _fail_no_ack(self, base: int) -> None:
        """No node acknowledges: TEC += 8 per attempt until error-passive, then no more.

        ISO 11898-1 fault confinement, exception to the TEC rule: an error-passive
        transmitter that sees an ACK error (and no dominant bit in its passive error flag)
        does not increment TEC. A lone node therefore stays error-passive with TXREQ set
        for ever and never goes bus-off. The attempts are summed up at once: 16 reach
        TEC 128; the buffer then stays pending (``stalled``) until aborted.
        """
        self.regs[base] |= TXB_TXERR
        while self._tec < 128:
            self._tec += 8
        self._update_error_flags()

    def _complete_tx(self, i: int, msg: can.Message | None = None) -> None:
        base = TXB_BASE[i]
        if msg is None:
            msg = self._frame_from_txb(i)
        self.regs[base] &= ~(TXB_TXREQ | TXB_TXERR | TXB_MLOA) & 0xFF
        self.regs[CANINTF] |= INT_TX[i]
        self.tx_count += 1
        if self._tec > 0:
            self._tec -= 1
            self._update_error_flags()
        if self._mode == MODE_LOOPBACK:
            self._accept(msg)
        elif self.tx_sink is not None:
            try:
                self.tx_sink(msg)
            except can.CanError:
                self.tx_sink_errors += 1

    # ------------------------------------------------------------ bus time (sim_clock)
    def _bit_ns(self) -> int:
        return 1_000_000_000 // self._bitrate()

    def _frame_ns(self, msg: can.Message) -> int:
        return frame_time_ns(self._bitrate(), msg.arbitration_id,
                             b"" if msg.is_remote_frame else bytes(msg.data or b""),
                             extended=bool(msg.is_extended_id), rtr=bool(msg.is_remote_frame),
                             dlc=int(msg.dlc))

    def schedule(self, frames: Iterable[tuple[int, can.Message]], node: str = "load") -> None:
        """Frames another node queues for the bus at given simulated times (a bus load).

        Each still has to find the bus idle and win arbitration, so a schedule denser than
        the bus can carry queues up behind it, as the other node's controller would. One
        node sends its frames in order (its head frame is its only contender); frames from
        ``receive`` are node ``"bus"``.
        """
        if self.sim_clock is None:
            raise RuntimeError("schedule() needs a sim_clock")
        with self._lock:
            for t_ns, msg in frames:
                self._queue_ext(t_ns, msg, node)
            self._int_cond.notify_all()

    def schedule_relative(self, nodes: dict[str, Iterable[tuple[int, can.Message]]],
                          lead_ns: int = 1_000_000) -> int:
        """:meth:`schedule` for several nodes, times counted from ``now + lead_ns``; returns
        that base time.

        The base is taken under the chip's lock in the same step that queues the frames: an
        idle driver's wait advances simulated time by host time, so a base read earlier (and
        a schedule built from it for a while) may already lie in the past, and every frame
        due meanwhile would land at once and overflow the receive buffers.
        """
        if self.sim_clock is None:
            raise RuntimeError("schedule_relative() needs a sim_clock")
        with self._lock:
            base = self.sim_clock.now_ns() + lead_ns
            for node, frames in nodes.items():
                for t_ns, msg in frames:
                    self._queue_ext(base + t_ns, msg, node)
            self._int_cond.notify_all()
        return base

    def _queue_ext(self, t_ns: int, msg: can.Message, node: str = "bus") -> None:
        self._arrivals += 1
        bisect.insort(self._ext, (t_ns, next(self._ext_seq), msg, node))

    def _chip_contender(self) -> int | None:
        """The TX buffer the chip would put up for arbitration now, if any."""
        if (self._mode not in (MODE_NORMAL, MODE_LOOPBACK) or self._bus_off
                or self.regs[CANCTRL] & CANCTRL_ABAT):
            return None
        pend = [i for i in self._pending_tx() if not self._stalled(i)]
        return pend[0] if pend else None

    def _next_start_ns(self) -> int | None:
        """When the bus would start its next frame (both sides' ready times, bus idle)."""
        ready = [self._ext[0][0]] if self._ext else []
        i = self._chip_contender()
        if i is not None:
            ready.append(self._tx_ready_ns[i])
        return max(self._bus_idle_ns, min(ready)) if ready else None

    def _next_event_ns(self) -> int | None:
        """The next moment something happens on its own (for a waiting driver)."""
        times = []
        if self._on_bus is not None:
            times.append(self._on_bus.end_ns)
        else:
            start = self._next_start_ns()
            if start is not None:
                times.append(start)
        if self._mode_due_ns is not None:
            times.append(self._mode_due_ns)
        if self._bus_off and self._mode == MODE_NORMAL and not self._bus_fault:
            times.append(self._bus_off_ns + BUS_OFF_RECOVERY_BITS * self._bit_ns())
        return min(times) if times else None

    _in_bus = False

    def _advance_bus(self, now: int) -> None:
        """Run the bus up to ``now``: end frames, apply due mode changes, arbitrate."""
        if self._in_bus:
            return
        self._in_bus = True
        try:
            while True:
                ob = self._on_bus
                if ob is not None:
                    if ob.end_ns > now:
                        return
                    self._finish_frame(ob)
                    continue
                start = self._next_start_ns()
                due = self._mode_due_ns
                if due is not None and due <= now and (start is None or due <= start):
                    self._mode_due_ns = None
                    mode, self._pending_mode = self._pending_mode, None
                    self._bus_idle_ns = max(self._bus_idle_ns, due)
                    if mode is not None:
                        self._enter_mode(mode)
                    continue
                if start is None or start > now:
                    return
                self._start_frame(start)
        finally:
            self._in_bus = False

    def _start_frame(self, start: int) -> None:
        best: int | None = None
        heads: set[str] = set()
        for k, (ready, _seq, msg, node) in enumerate(self._ext):
            if ready > start:
                break
            if node in heads:
                continue  # behind that node's earlier frame
            heads.add(node)
            if best is None or arbitration_key(msg) < arbitration_key(self._ext[best][2]):
                best = k
        i = self._chip_contender()
        if i is not None and self._tx_ready_ns[i] > start:
            i = None
        ours = None if i is None else self._frame_from_txb(i)
        if ours is not None and (best is None
                                 or arbitration_key(ours) <= arbitration_key(self._ext[best][2])):
            assert i is not None
            fails = self._mode == MODE_NORMAL and (
                self._bus_fault or self._tx_fail_remaining > 0 or self._no_ack)
            dur = self._frame_ns(ours)
            self._on_bus = _OnBus(ours, start, start + dur, i, fails)
        else:
            assert best is not None
            if i is not None:
                self.regs[TXB_BASE[i]] |= TXB_MLOA
                self.arbitration_lost += 1
            msg = self._ext.pop(best)[2]
            dur = self._frame_ns(msg)
            self._on_bus = _OnBus(msg, start, start + dur, None)
        self.bus_frames += 1
        self.bus_busy_ns += dur

    def _finish_frame(self, ob: _OnBus) -> None:
        self._on_bus = None
        self._bus_idle_ns = ob.end_ns
        if ob.txb is None:
            if self._mode in (MODE_NORMAL, MODE_LISTEN):
                self._backlog.append(ob.msg)
                self._backlog_pump()
            else:
                self.rx_dropped_mode += 1
            return
        base = TXB_BASE[ob.txb]
        if ob.fails:
            # an error frame follows; the buffer stays pending and is retried (unless aborted)
            self._bus_idle_ns += ERROR_FRAME_BITS * self._bit_ns()
            self.regs[base] |= TXB_TXERR
            if self._bus_fault or self._tx_fail_remaining > 0:
                self._tx_fail_remaining = max(0, self._tx_fail_remaining - 1)
                self._tec += 8
            elif self._tec < 128:
                self._tec += 8  # no ACK: error-passive stops the climb (see _fail_no_ack)
            self._update_error_flags()
            return
        if not self.regs[base] & TXB_TXREQ:
            # aborted while on the wire: it made it out after all, ABTF says not aborted
            self.regs[base] &= ~TXB_ABTF & 0xFF
        self._complete_tx(ob.txb, ob.msg)

    # ------------------------------------------------------------ errors
    def _update_error_flags(self, signal: bool = True) -> None:
        old = self.regs[EFLG]
        tec, rec = self._tec, self._rec
        if tec > 255 and not self._bus_off:
            self._bus_off = True
            self._bus_off_ns = self._now()
        new = old & (EFLG_RX0OVR | EFLG_RX1OVR)
        if tec >= 96 or rec >= 96:
            new |= EFLG_EWARN
        if rec >= 96:
            new |= EFLG_RXWAR
        if tec >= 96:
            new |= EFLG_TXWAR
        if rec >= 128:
            new |= EFLG_RXEP
        if tec >= 128:
            new |= EFLG_TXEP
        if self._bus_off:
            new |= EFLG_TXBO
        self.regs[EFLG] = new
        if signal and (old ^ new) & 0x3F:
            self.regs[CANINTF] |= INT_ERR

    def _tick(self) -> None:
        """Time-driven events: the bus (sim_clock), a mode change, bus-off recovery."""
        if self.sim_clock is not None:
            self._advance_bus(self._now())
        if self._bus_off and self._mode == MODE_NORMAL and not self._bus_fault:
            need_ns = BUS_OFF_RECOVERY_BITS * 1_000_000_000 // self._bitrate()
            if self._now() - self._bus_off_ns >= need_ns:
                self._bus_off = False
                self._tec = 0
                self._rec = 0
                self._update_error_flags()
                self._try_transmit()
                self._update_int()

    def inject_tx_errors(self, count: int) -> None:
        """The next ``count`` transmission attempts fail (TEC += 8 each)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            self._tx_fail_remaining += count
            self._try_transmit()
            self._update_int()

    def set_bus_fault(self, on: bool) -> None:
        """While on, every transmission attempt fails (no ACK, shorted bus)."""
        with self._lock:
            self._bus_fault = on
            self._try_transmit()
            self._update_int()

    def set_no_ack(self, on: bool) -> None:
        """While on, no other node acknowledges (a lone node): see ``_fail_no_ack``."""
        with self._lock:
            self._no_ack = on
            if not on:
                for base in TXB_BASE:
                    self.regs[base] &= ~TXB_TXERR & 0xFF
            self._try_transmit()
            self._update_int()

    def set_stalled_ids(self, ids: set[int]) -> None:
        """Frames with these ids lose arbitration at every attempt (TXREQ stays set, MLOA).

        Stands for a bus saturated by higher-priority traffic against them; the chip's
        other pending buffers still get their turn.
        """
        with self._lock:
            self.stalled_ids = set(ids)
            self._try_transmit()
            self._update_int()

    def add_rx_errors(self, count: int) -> None:
        """``count`` receive errors (REC += 1 each, capped at 255)."""
        if count < 0:
            raise ValueError("count must be >= 0")
        with self._lock:
            if self._mode in (MODE_NORMAL, MODE_LISTEN):
                self._rec = min(255, self._rec + count)
                self._update_error_flags()
                self._update_int()

    def force_bus_off(self) -> None:
        """TEC past 255 at once."""
        with self._lock:
            if self._mode == MODE_NORMAL:
                self._tec = 256
                self._update_error_flags()
                self._update_int()

    # ------------------------------------------------------------ RX
    def receive(self, msg: can.Message) -> None:
        """A frame on the bus (from another node).

        With a ``sim_clock`` the frame is queued now and still has to win the bus.
        """
        with self._lock:
            if msg.is_error_frame or msg.is_fd:
                self.rx_ignored += 1
                return
            if self.sim_clock is not None:
                self._queue_ext(self._now(), msg)
                self._tick()
                self._update_int()
                self._int_cond.notify_all()
                return
            self._backlog.append(msg)
            self._backlog_pump()
            self._update_int()

    def _backlog_pump(self) -> None:
        while self._backlog:
            if self._mode not in (MODE_NORMAL, MODE_LISTEN):
                # the chip is not listening: the frame passes unseen
                self._backlog.popleft()
                self.rx_dropped_mode += 1
                continue
            if self.rx_mode == "backpressure" and self.regs[CANINTF] & (INT_RX0 | INT_RX1):
                return
            self._accept(self._backlog.popleft())

    def _filter_matches(self, f: int, m: int, msg: can.Message) -> bool:
        r = self.regs
        fs = RXF_SIDH[f]
        if bool(r[fs + 1] & SIDL_IDE) != msg.is_extended_id:
            return False
        ms = (RXM0SIDH, RXM1SIDH)[m]
        if msg.is_extended_id:
            fid, _ = unpack_id(r[fs], r[fs + 1], r[fs + 2], r[fs + 3])
            mid, _ = unpack_id(r[ms], r[ms + 1] | SIDL_IDE, r[ms + 2], r[ms + 3])
            return (msg.arbitration_id ^ fid) & mid == 0
        fsid = (r[fs] << 3) | (r[fs + 1] >> 5)
        msid = (r[ms] << 3) | (r[ms + 1] >> 5)
        if (msg.arbitration_id ^ fsid) & msid:
            return False
        # standard frames: EID8/EID0 of mask and filter apply to data bytes 0 and 1
        data = bytes(msg.data or b"") + b"\x00\x00"
        return (data[0] ^ r[fs + 2]) & r[ms + 2] == 0 and (data[1] ^ r[fs + 3]) & r[ms + 3] == 0

    def _filter_hit(self, buf: int, msg: can.Message) -> int | None:
        rxm = self.regs[RXB_BASE[buf]] & RXB_RXM
        if rxm == RXB_RXM:
            return 0  # masks and filters off: anything goes
        for f in (0, 1) if buf == 0 else (2, 3, 4, 5):
            if self._filter_matches(f, buf, msg):
                return f
        return None

    def _accept(self, msg: can.Message) -> None:
        intf = self.regs[CANINTF]
        hit0 = self._filter_hit(0, msg)
        if hit0 is not None:
            if not intf & INT_RX0:
                self._place(0, msg, hit0)
            elif self.regs[RXB_BASE[0]] & RXB0_BUKT:
                if not intf & INT_RX1:
                    self._place(1, msg, hit0)  # rollover keeps the RXF0/RXF1 hit
                else:
                    self._overflow(EFLG_RX1OVR)
            else:
                self._overflow(EFLG_RX0OVR)
            return
        hit1 = self._filter_hit(1, msg)
        if hit1 is None:
            self.rx_filtered += 1
            return
        if not intf & INT_RX1:
            self._place(1, msg, hit1)
        else:
            self._overflow(EFLG_RX1OVR)

    def _overflow(self, bit: int) -> None:
        self.rx_overflows += 1
        self.regs[EFLG] |= bit
        self.regs[CANINTF] |= INT_ERR

    def _place(self, buf: int, msg: can.Message, filhit: int) -> None:
        base = RXB_BASE[buf]
        r = self.regs
        sidh, sidl, eid8, eid0 = pack_id(msg.arbitration_id, msg.is_extended_id)
        rtr = bool(msg.is_remote_frame)
        if rtr and not msg.is_extended_id:
            sidl |= SIDL_SRR
        dlc = min(int(msg.dlc), 15)
        r[base + 1 : base + 5] = bytes((sidh, sidl, eid8, eid0))
        r[base + 5] = dlc | (DLC_RTR if rtr and msg.is_extended_id else 0)
        data = b"" if rtr else bytes(msg.data or b"")[:8]
        r[base + 6 : base + 14] = data + bytes(8 - len(data))
        ctrl = r[base] & (RXB_RXM | (RXB0_BUKT | RXB0_BUKT1 if buf == 0 else 0))
        if rtr:
            ctrl |= RXB_RXRTR
        ctrl |= (filhit & 0x01) if buf == 0 else (filhit & 0x07)
        r[base] = ctrl
        r[CANINTF] |= INT_RX0 if buf == 0 else INT_RX1
        self.rx_count += 1
        self.rx_log.append((self._now(), self.stats.total_bytes, msg.arbitration_id))

    # ------------------------------------------------------------ bus
    def attach_bus(self, bus: can.BusABC) -> None:
        """Transmit onto ``bus`` and receive from it (a reader thread)."""
        if self._bus_thread is not None:
            raise RuntimeError("a bus is already attached")
        self._bus = bus
        self.tx_sink = bus.send
        self._bus_stop.clear()
        self._bus_thread = threading.Thread(
            target=self._bus_reader, name="mcp2515-bus", daemon=True
        )
        self._bus_thread.start()

    def _bus_reader(self) -> None:
        assert self._bus is not None
        while not self._bus_stop.is_set():
            msg = self._bus.recv(timeout=0.05)
            if msg is not None:
                self.receive(msg)

    def close(self) -> None:
        """Stop the bus reader (the bus itself belongs to the caller)."""
        self._bus_stop.set()
        if self._bus_thread is not None:
            self._bus_thread.join(timeout=2.0)
            self._bus_thread = None
        self._bus = None
        self.tx_sink = None
