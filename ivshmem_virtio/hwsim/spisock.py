"""UNIX-socket server that lends a simulated MCP2515's SPI bus and INT pin to
the hosted C inmate (``rtos_inmate/hal/hosted``).

Wire format (the C side is ``rtos_inmate/hal/hosted/spi_proto.h``; a test
keeps both in step): every message is ``u8 op, u8 0, u16 len (LE)`` then
``len`` payload bytes; a reply carries ``op | 0x80``.

====== ==================================== ===================================
op     request payload                      reply payload
====== ==================================== ===================================
HELLO  u32 magic "MCPS", u16 version 1      u16 version
XFER   1..64 MOSI bytes (one CS window)     as many MISO bytes
INT    (none)                               u8 INT level (0 = low = asserted)
WAIT   u32 timeout_us (<= 1 s)              u8 INT level, as soon as INT is low
                                            or the timeout has passed
UART   1..64 bytes of console output        none
TIME   (none)                               u64 the chip's time in ns (LE)
DELAY  u32 us (<= 1 s)                      none, once that time has passed
====== ==================================== ===================================

Version 2 added TIME and DELAY: the hosted HAL's ``hal_now_ns``/``hal_delay_us`` use the
chip's clock, so with a :class:`~ivshmem_virtio.hwsim.simclock.SimClock` the driver's timers
run on the same simulated time as the bus (host time otherwise).

HELLO comes first, then one request at a time.  Anything unexpected closes the
connection (the server then waits for the next client).  One client at a time.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import structlog

from ivshmem_virtio.hwsim.mcp2515 import Mcp2515

SPIP_MAGIC = 0x5350434D
SPIP_VERSION = 2
SPIP_HDR_LEN = 4
SPIP_MAX_XFER = 64
SPIP_MAX_WAIT_US = 1_000_000
SPIP_OP_HELLO = 0x01
SPIP_OP_XFER = 0x02
SPIP_OP_INT = 0x03
SPIP_OP_WAIT = 0x04
SPIP_OP_UART = 0x05
SPIP_OP_TIME = 0x06
SPIP_OP_DELAY = 0x07
SPIP_REPLY = 0x80

_HDR = struct.Struct("<BBH")
_POLL_S = 0.1

log = structlog.get_logger(__name__)


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed."""


class _Closed(Exception):
    """Peer went away or the server is stopping."""


class SpiSocketServer:
    """Serve ``chip`` on a UNIX stream socket at ``path`` from a thread."""

    def __init__(self, chip: Mcp2515, path: str | os.PathLike[str]) -> None:
        self.chip = chip
        self.path = Path(path)
        self.clients_served = 0
        self.protocol_errors = 0
        self.requests = 0
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conn: socket.socket | None = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        if self.path.exists():
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(1)
        listener.settimeout(_POLL_S)
        self._listener = listener
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="mcp2515-spisock", daemon=True)
        self._thread.start()
        log.info("spisock.listening", path=str(self.path))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> SpiSocketServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ serving
    def _serve(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            self.clients_served += 1
            with conn:
                conn.settimeout(_POLL_S)
                self._conn = conn
                try:
                    self._serve_client(conn)
                except ProtocolError as exc:
                    self.protocol_errors += 1
                    log.warning("spisock.protocol_error", error=str(exc))
                except _Closed:
                    pass
                except OSError as exc:
                    log.info("spisock.client_gone", error=str(exc))
                finally:
                    self._conn = None

    def _recv_exact(self, conn: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self._stop.is_set():
                raise _Closed()
            try:
                chunk = conn.recv(n - len(buf))
            except TimeoutError:
                continue
            if not chunk:
                raise _Closed()
            buf += chunk
        return bytes(buf)

    def _reply(self, conn: socket.socket, op: int, payload: bytes) -> None:
        conn.sendall(_HDR.pack(op | SPIP_REPLY, 0, len(payload)) + payload)

    def _read_request(self, conn: socket.socket) -> tuple[int, bytes]:
        op, zero, length = _HDR.unpack(self._recv_exact(conn, SPIP_HDR_LEN))
        if zero != 0:
            raise ProtocolError(f"header byte 1 is 0x{zero:02x}, not 0")
        if length > SPIP_MAX_XFER:
            raise ProtocolError(f"payload of {length} bytes")
        return op, self._recv_exact(conn, length) if length else b""

    def _serve_client(self, conn: socket.socket) -> None:
        op, payload = self._read_request(conn)
        if op != SPIP_OP_HELLO or len(payload) != 6:
            raise ProtocolError(f"expected HELLO, got op 0x{op:02x} len {len(payload)}")
        magic, version = struct.unpack("<IH", payload)
        if magic != SPIP_MAGIC or version != SPIP_VERSION:
            raise ProtocolError(f"bad HELLO magic 0x{magic:08x} version {version}")
        self._reply(conn, SPIP_OP_HELLO, struct.pack("<H", SPIP_VERSION))
        log.info("spisock.client", version=version)
        while True:
            op, payload = self._read_request(conn)
            self.requests += 1
            if op == SPIP_OP_XFER:
                if not 1 <= len(payload) <= SPIP_MAX_XFER:
                    raise ProtocolError(f"XFER of {len(payload)} bytes")
                self._reply(conn, op, self.chip.transfer(payload))
            elif op == SPIP_OP_INT:
                if payload:
                    raise ProtocolError("INT with payload")
                self._spend(1)
                self._reply(conn, op, bytes([self._level()]))
            elif op == SPIP_OP_WAIT:
                if len(payload) != 4:
                    raise ProtocolError("WAIT needs a u32 timeout")
                (timeout_us,) = struct.unpack("<I", payload)
                if timeout_us > SPIP_MAX_WAIT_US:
                    raise ProtocolError(f"WAIT timeout {timeout_us} us > 1 s")
                self._wait(timeout_us)
                self._reply(conn, op, bytes([self._level()]))
            elif op == SPIP_OP_UART:
                if not 1 <= len(payload) <= SPIP_MAX_XFER:
                    raise ProtocolError(f"UART of {len(payload)} bytes")
                self.chip.uart_write(payload)
                self._spend(len(payload))
                self._reply(conn, op, b"")
            elif op == SPIP_OP_TIME:
                if payload:
                    raise ProtocolError("TIME with payload")
                self._spend(1)
                self._reply(conn, op, struct.pack("<Q", self.chip.now_ns()))
            elif op == SPIP_OP_DELAY:
                if len(payload) != 4:
                    raise ProtocolError("DELAY needs a u32 time in us")
                (us,) = struct.unpack("<I", payload)
                if us > SPIP_MAX_WAIT_US:
                    raise ProtocolError(f"DELAY of {us} us > 1 s")
                if self.chip.sim_clock is not None:
                    self.chip.spend(us * 1000)
                else:
                    time.sleep(us / 1e6)
                self._reply(conn, op, b"")
            else:
                raise ProtocolError(f"unknown op 0x{op:02x}")

    def _wait(self, timeout_us: int) -> None:
        # wait in slices so stop() is honoured promptly
        left = timeout_us / 1e6
        while left > 0 and not self._stop.is_set():
            step = min(left, _POLL_S)
            if self.chip.wait_int(step):
                return
            left -= step

    def _spend(self, units: int) -> None:
        """The core's simulated time for a request that is not SPI (one unit per MMIO access)."""
        if self.chip.sim_clock is not None:
            self.chip.spend(units * self.chip.sim_clock.cpu_ns)

    def _level(self) -> int:
        if self.chip.int_asserted:
            self.chip.note_int_observed()
            return 0
        return 1
