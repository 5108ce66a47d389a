"""virtio-console device model (VIRTIO 1.2 §5.3), port 0 only: pure, bytes in and effects out.

The model owns the two byte buffers between the cell and the host side and the flow-control
decisions on them; it never touches a ring, a file descriptor or a loop:

* output (transmitq -> host): :meth:`ConsoleModel.want_tx` says whether another transmitq
  buffer may be taken. Once a buffer is taken its bytes are kept until the host side wrote
  them (never dropped); when the host does not drain, the device stops taking buffers and the
  full ring holds the cell back. The buffer is therefore bounded by ``out_limit`` plus one
  chain (``TX_CHAIN_MAX``).
* input (host -> receiveq): at most ``in_limit`` bytes wait for receive buffers; beyond that
  the host side is not read (:meth:`input_room` is 0), which holds the typist back.
* emergency writes (``emerg_wr``) cannot be held back (a transaction must be answered at once,
  protocol §8.7): they join the output unless it is past its hard cap, then they are counted as
  dropped.

MULTIPORT is not offered: port 0 is what Linux's hvc0 needs (decisions.md, virtio-console).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Final

from ivshmem_virtio.spec import console as wire

#: Largest transmitq chain taken (readable bytes): one page even on a 64 KiB-page arm64 cell
#: (Linux's hvc sends at most its PAGE_SIZE outbuf per buffer), with room to spare.
TX_CHAIN_MAX: Final = 256 * 1024
OUT_LIMIT: Final = 64 * 1024
IN_LIMIT: Final = 4096
#: Emergency bytes may exceed ``out_limit + TX_CHAIN_MAX`` by this much before being dropped.
EMERG_SLACK: Final = 4096
DEFAULT_FEATURES: Final = wire.F_SIZE | wire.F_EMERG_WRITE


@dataclass(slots=True)
class ConsoleMetrics:
    """Fixed names, monotonic counters (``*_count``, ``*_bytes``, ``*_fails``)."""

    tx_count: int = 0  # transmitq buffers taken
    tx_bytes: int = 0  # bytes the cell sent (taken; all of them reach the host side)
    out_bytes: int = 0  # bytes the host side took
    rx_count: int = 0  # receiveq buffers filled
    rx_bytes: int = 0  # bytes delivered to the cell
    rx_bad_buffers: int = 0  # receive buffers handed back unused (readable part, unreachable)
    emerg_bytes: int = 0  # emergency writes taken
    emerg_dropped: int = 0  # emergency writes past the hard cap
    tx_throttled: int = 0  # times the device stopped taking transmitq buffers
    resizes: int = 0  # config changes sent for a new window size

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ConsoleModel:
    """One console port 0: config, output and input buffers, flow control."""

    def __init__(self, *, cols: int = 80, rows: int = 25, features: int = DEFAULT_FEATURES,
                 out_limit: int = OUT_LIMIT, in_limit: int = IN_LIMIT) -> None:
        if features & ~(wire.F_SIZE | wire.F_EMERG_WRITE):
            raise ValueError("only SIZE and EMERG_WRITE are implemented")
        self.device_features = features
        self.cols = cols & 0xFFFF
        self.rows = rows & 0xFFFF
        self.out_limit = out_limit
        self.in_limit = in_limit
        self.negotiated = 0
        self._out = bytearray()
        self._in = bytearray()
        self.metrics = ConsoleMetrics()

    # -- life cycle -----------------------------------------------------------------------------
    def set_features(self, features: int) -> None:
        self.negotiated = features & self.device_features

    def reset(self) -> None:
        """A driver reset forgets the negotiation, never the bytes the cell already sent."""
        self.negotiated = 0

    def config_bytes(self) -> bytes:
        if self.device_features & wire.F_SIZE:
            return wire.encode_config(self.cols, self.rows)
        return wire.encode_config(0, 0)

    def resize(self, cols: int, rows: int) -> bool:
        """A new window size; True when the config changed (send a config-change event)."""
        cols &= 0xFFFF
        rows &= 0xFFFF
        if not self.device_features & wire.F_SIZE or (cols, rows) == (self.cols, self.rows):
            return False
        self.cols, self.rows = cols, rows
        self.metrics.resizes += 1
        return True

    # -- output: the cell's bytes to the host side ---------------------------------------------
    def want_tx(self) -> bool:
        """May another transmitq buffer be taken? (False: the host side is behind.)"""
        return len(self._out) < self.out_limit

    @staticmethod
    def tx_chain_ok(readable_len: int) -> bool:
        """A transmitq chain the device can take whole (bigger ones are a broken driver)."""
        return readable_len <= TX_CHAIN_MAX

    def tx(self, data: bytes) -> None:
        """The bytes of one transmitq buffer, taken: kept until the host side wrote them."""
        self._out += data
        self.metrics.tx_count += 1
        self.metrics.tx_bytes += len(data)
        if not self.want_tx():
            self.metrics.tx_throttled += 1

    def emergency_write(self, value: int) -> bool:
        """The driver wrote ``emerg_wr``: its low byte is output. False: dropped (hard cap)."""
        if not self.device_features & wire.F_EMERG_WRITE:
            return False
        if len(self._out) >= self.out_limit + TX_CHAIN_MAX + EMERG_SLACK:
            self.metrics.emerg_dropped += 1
            return False
        self._out.append(value & 0xFF)
        self.metrics.emerg_bytes += 1
        return True

    def pending_output(self) -> memoryview:
        """What the host side should write next (valid until :meth:`output_done`)."""
        return memoryview(self._out)

    def output_done(self, n: int) -> None:
        """The host side took the first ``n`` bytes of :meth:`pending_output`."""
        del self._out[:n]
        self.metrics.out_bytes += n

    @property
    def output_len(self) -> int:
        return len(self._out)

    # -- input: the host side's bytes to the cell -----------------------------------------------
    def input_room(self) -> int:
        return max(0, self.in_limit - len(self._in))

    def feed_input(self, data: bytes) -> int:
        """Keep host input for the cell; returns how many bytes fitted (the rest stays unread)."""
        take = data[:self.input_room()]
        self._in += take
        return len(take)

    @property
    def input_len(self) -> int:
        return len(self._in)

    def rx(self, capacity: int) -> bytes:
        """Up to ``capacity`` bytes of input for one receive buffer (removed from the buffer)."""
        out = bytes(self._in[:capacity])
        del self._in[:len(out)]
        if out:
            self.metrics.rx_count += 1
            self.metrics.rx_bytes += len(out)
        return out
