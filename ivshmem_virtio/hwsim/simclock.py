"""Simulated time for the MCP2515 model: bus time that does not depend on the host's speed.

The hosted inmate is a Linux process that reaches the chip over a UNIX socket: one SPI
transaction costs tens of microseconds of host time, where the Raspberry Pi's SPI0 needs
about 1.26 us per byte at 7.14 MHz (9 SCLK per byte). Measured against the host's clock, the
driver would look ten times slower than it is and every fast bus would overflow its receive
buffers. Against a :class:`SimClock`, time advances only by what the hardware would spend:

- every SPI window by its bytes at ``spi_hz`` (9 clocks per byte) plus the CS gap;
- every other request of the driver (INT pin read, time read, a UART write) by a small fixed
  cost for the core's work around it;
- ``hal_delay_us`` by the delay;
- a wait for INT: to the next event the bus model has scheduled (a frame ending, a queued
  frame from another node, a mode change, bus-off recovery) if one comes before the timeout,
  otherwise by the host time that passed while it blocked (so frames a test sends on a
  python-can bus in real time still arrive, and an idle inmate sleeps instead of spinning).

The hosted HAL reads this clock for ``hal_now_ns`` (socket op TIME), so the driver's timers
(TX timeout, status polls, the stats interval) and the chip's bus agree on what time it is.
"""

from __future__ import annotations

import threading

#: SCLK of the deployed configuration: 500 MHz core / CDIV 70 (docs/deploy.md).
DEFAULT_SPI_HZ = 7_142_857
#: BCM2711 SPI0 (DMA-less, FIFO polled): CS set-up/hold and the FIFO turn-around per window.
DEFAULT_CS_GAP_NS = 500
#: the core's work around one request that is not SPI (a GPIO read, CNTPCT, an MMIO write).
DEFAULT_CPU_NS = 200
#: the BCM2711 SPI controller inserts one idle SCLK after every 8 data clocks.
CLOCKS_PER_BYTE = 9


class SimClock:
    """A monotonic nanosecond counter that only the simulation moves forward."""

    def __init__(self, *, start_ns: int = 1_000_000_000, spi_hz: int = DEFAULT_SPI_HZ,
                 cs_gap_ns: int = DEFAULT_CS_GAP_NS, cpu_ns: int = DEFAULT_CPU_NS) -> None:
        if spi_hz <= 0 or cs_gap_ns < 0 or cpu_ns < 0:
            raise ValueError("spi_hz must be > 0, cs_gap_ns and cpu_ns >= 0")
        self.spi_hz = spi_hz
        self.cs_gap_ns = cs_gap_ns
        self.cpu_ns = cpu_ns
        self._t = start_ns
        self._lock = threading.Lock()

    def now_ns(self) -> int:
        return self._t

    def advance(self, ns: int) -> int:
        """Move forward by ``ns`` (never back); returns the new time."""
        with self._lock:
            if ns > 0:
                self._t += ns
            return self._t

    def advance_to(self, t_ns: int) -> int:
        """Move forward to ``t_ns`` if that is later; returns the new time."""
        with self._lock:
            if t_ns > self._t:
                self._t = t_ns
            return self._t

    def spi_ns(self, nbytes: int) -> int:
        """Wire time of one CS-low window of ``nbytes`` bytes, CS gap included."""
        return self.cs_gap_ns + nbytes * CLOCKS_PER_BYTE * 1_000_000_000 // self.spi_hz
