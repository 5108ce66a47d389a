"""virtio-console driver in Python (port 0): the cell side of a console, for cells without a
kernel driver and for tests.

What Linux's ``virtio_console`` does for hvc0, on :class:`VirtioDriver`: keep the receiveq
full of buffers (input arrives in them), send output through the transmitq, read cols/rows
from the config (VIRTIO_CONSOLE_F_SIZE) and follow config changes, write ``emerg_wr``
(VIRTIO_CONSOLE_F_EMERG_WRITE). Unlike Linux's hvc path it never spins for the device to take
output: :meth:`ConsoleDriver.write` awaits its buffers, so a host side that does not read holds
the writer back (the device's flow control) without holding the event loop.

Output in flight when the backend goes away is sent again after it is back (console output is
not dropped); the device is untrusted: a used length larger than the buffer is counted, never
trusted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import termios
import threading
import tty
from collections.abc import Callable
from dataclasses import asdict, dataclass

import structlog

from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.spec import console as wire
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.spec import virtio as V

from .driver import Device, VirtioDriver, connect_driver

log = structlog.get_logger("ivshmem_virtio.frontend.console")

TX_CHUNK = 4096  # one transmitq buffer at most (Linux's hvc sends up to a page)
TX_DEPTH = 16  # transmitq buffers in flight
RX_SIZE = 1024
RX_BUFFERS = 32


@dataclass(eq=False)
class _RxBuf:
    addr: int
    size: int


class _Tx:
    __slots__ = ("data", "future", "addr")

    def __init__(self, data: bytes, future: asyncio.Future) -> None:
        self.data = data
        self.future = future
        self.addr = -1


@dataclass(slots=True)
class ConsoleDriverMetrics:
    tx_count: int = 0
    tx_bytes: int = 0
    rx_count: int = 0
    rx_bytes: int = 0
    rx_invalid: int = 0  # used lengths larger than the buffer
    config_events: int = 0
    resends: int = 0  # output buffers sent again after the backend came back

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ConsoleDriver(VirtioDriver):
    """Port 0 of a virtio-console: ``await write(data)``, input by callback or :attr:`input`."""

    device_id = wire.VIRTIO_ID_CONSOLE
    num_queues = wire.NUM_QUEUES_PORT0

    def __init__(self, dev: Device, *, on_input: Callable[[bytes], None] | None = None,
                 on_resize: Callable[[int, int], None] | None = None,
                 rx_buffers: int = RX_BUFFERS, rx_size: int = RX_SIZE, event_idx: bool = True,
                 **kw: object) -> None:
        wanted = wire.F_SIZE | wire.F_EMERG_WRITE | (V.bit(V.F_EVENT_IDX) if event_idx else 0)
        super().__init__(dev, features=wanted, **kw)  # type: ignore[arg-type]
        self.on_input = on_input
        self.on_resize = on_resize
        self.rx_buffers = rx_buffers
        self.rx_size = rx_size
        self.input: asyncio.Queue[bytes] = asyncio.Queue()
        self.size: tuple[int, int] = (0, 0)  # (cols, rows); (0, 0) without SIZE
        self.resized = asyncio.Event()
        self.metrics = ConsoleDriverMetrics()
        self._slots: asyncio.Semaphore | None = None
        self._waiting: list[_Tx] = []  # output to send again once the device is back

    # -- bring-up ---------------------------------------------------------------------------------
    def on_queues_ready(self) -> None:
        vq = self.vqs[wire.RECEIVEQ]
        alloc = self.transport.allocator
        assert alloc is not None
        count = min(self.rx_buffers, vq.size)
        slab = alloc.alloc(self.rx_size * count)
        for i in range(count):
            addr = slab + i * self.rx_size
            vq.add([], [(addr, self.rx_size)], _RxBuf(addr, self.rx_size))
        self._read_size(initial=True)

    async def _bring_up(self, timeout: float | None = None) -> None:
        await super()._bring_up(timeout)
        self.transport.kick(wire.RECEIVEQ)
        if self._slots is None:
            self._slots = asyncio.Semaphore(min(TX_DEPTH, self.vqs[wire.TRANSMITQ].size))
        waiting, self._waiting = self._waiting, []
        for req in waiting:
            self.metrics.resends += 1
            self._submit(req)

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    # -- output -----------------------------------------------------------------------------------
    async def write(self, data: bytes) -> None:
        """Send ``data`` to the device; returns once the device took all of it."""
        view = memoryview(bytes(data))
        loop = asyncio.get_running_loop()
        futures = []
        for pos in range(0, len(view), TX_CHUNK):
            await self.connected.wait()
            assert self._slots is not None
            await self._slots.acquire()
            req = _Tx(bytes(view[pos:pos + TX_CHUNK]), loop.create_future())
            req.future.add_done_callback(lambda _f: self._slots.release())  # type: ignore
            futures.append(req.future)
            self._submit(req)
        if futures:
            await asyncio.gather(*futures)

    def _submit(self, req: _Tx) -> None:
        if not self.connected.is_set() or not self.vqs:
            self._waiting.append(req)
            return
        alloc = self.transport.allocator
        assert alloc is not None
        req.addr = alloc.alloc(len(req.data))
        self.transport.hdr.write(req.addr, req.data)
        vq = self.vqs[wire.TRANSMITQ]
        vq.add([(req.addr, len(req.data))], [], req)
        if vq.kick_needed():
            self.transport.kick(wire.TRANSMITQ)

    async def emergency_write(self, byte: int) -> bool:
        """One character through ``emerg_wr`` (no ring involved); False without the feature."""
        if not self.has(wire.F_EMERG_WRITE):
            return False
        await self.transport.write(H.HDR_CONFIG + wire.OFF_EMERG_WR, 4, byte & 0xFF)
        return True

    # -- completions ------------------------------------------------------------------------------
    def on_used(self, index: int, token: object, length: int) -> None:
        if isinstance(token, _Tx):
            alloc = self.transport.allocator
            if alloc is not None and token.addr >= 0:
                alloc.free(token.addr)
            self.metrics.tx_count += 1
            self.metrics.tx_bytes += len(token.data)
            if not token.future.done():
                token.future.set_result(None)
            return
        assert isinstance(token, _RxBuf)
        if length > token.size:
            self.metrics.rx_invalid += 1
        elif length:
            data = self.transport.hdr.read(token.addr, length)
            self.metrics.rx_count += 1
            self.metrics.rx_bytes += length
            if self.on_input is not None:
                self.on_input(data)
            else:
                self.input.put_nowait(data)
        vq = self.vqs[wire.RECEIVEQ]
        vq.add([], [(token.addr, token.size)], token)
        if vq.kick_needed():
            self.transport.kick(wire.RECEIVEQ)

    async def read(self) -> bytes:
        """The next input bytes (when no ``on_input`` callback was given)."""
        return await self.input.get()

    # -- config -----------------------------------------------------------------------------------
    def _read_size(self, initial: bool = False) -> None:
        if not self.has(wire.F_SIZE):
            return
        size = wire.decode_size(self.transport.read_config(0, wire.CONFIG_SIZE))
        if size != self.size:
            self.size = size
            if not initial:
                self.resized.set()
            if self.on_resize is not None:
                self.on_resize(*size)

    def on_config_change(self) -> None:
        self.metrics.config_events += 1
        self._read_size()

    # -- backend loss -----------------------------------------------------------------------------
    def resubmit(self, tokens: list[object]) -> None:
        """Output in flight goes again on the new rings; receive buffers were posted anew."""
        for token in tokens:
            if isinstance(token, _Tx):
                self.metrics.resends += 1
                self._submit(token)

    def fail_all(self, exc: BaseException, tokens: list[object] | None = None) -> None:
        if tokens is None:
            tokens = [t for vq in self.vqs for t in vq.in_flight()] + self._waiting
            self._waiting = []
        for token in tokens:
            if isinstance(token, _Tx) and not token.future.done():
                token.future.set_exception(exc)
                token.future.exception()  # retrieved: a closed console is no error to log


# -- console-client ------------------------------------------------------------------------------

async def connect_console(link: str, timeout: float, **kw: object) -> ConsoleDriver:
    return await connect_driver(ConsoleDriver, link, timeout, **kw)


async def run_console_client(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Join the cell side of a console to stdin (its output) and stdout (its input).

    Ends on SIGTERM/SIGINT, or when stdin ends (after the device took everything; not with
    ``--echo``). On a
    terminal stdin is raw and Ctrl-] ends the session, as in telnet.
    """
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout}: must be > 0")
    loop = asyncio.get_running_loop()
    out_fd = sys.stdout.fileno()
    in_fd = sys.stdin.fileno()
    pending: list[bytes] = []
    wake = asyncio.Event()
    done = asyncio.Event()

    def show(cols: int, rows: int) -> None:
        if args.show_size:
            print(f"console size {cols}x{rows}", file=sys.stderr, flush=True)

    def got(data: bytes) -> None:
        os.write(out_fd, data)  # blocking stdout: a reader that stops holds the cell's input
        if args.echo:
            pending.append(data)
            wake.set()

    drv = await connect_console(args.link, args.timeout, on_input=got, on_resize=show)
    saved = None
    if os.isatty(in_fd):
        saved = termios.tcgetattr(in_fd)
        tty.setraw(in_fd)

    def readable() -> None:
        try:
            data = os.read(in_fd, TX_CHUNK)
        except OSError:
            data = b""
        handle(data)

    def handle(data: bytes) -> None:
        if saved is not None and b"\x1d" in data:  # Ctrl-]
            data = data[:data.index(b"\x1d")]
            done.set()
        if not data:
            with contextlib.suppress(Exception):
                loop.remove_reader(in_fd)
            if not args.echo:  # a loopback cell lives on without input of its own
                done.set()
        if data:
            pending.append(data)
            wake.set()

    async def sender() -> None:
        while True:
            await wake.wait()
            wake.clear()
            while pending:
                await drv.write(pending.pop(0))

    def read_thread() -> None:  # a file or /dev/null: epoll refuses them, read blocking
        while True:
            try:
                data = os.read(in_fd, TX_CHUNK)
            except OSError:
                data = b""
            loop.call_soon_threadsafe(handle, data)
            if not data:
                return

    try:
        loop.add_reader(in_fd, readable)
    except PermissionError:
        threading.Thread(target=read_thread, daemon=True, name="console-stdin").start()
    task = asyncio.create_task(sender())
    stopper = asyncio.create_task(stop.wait())
    ender = asyncio.create_task(done.wait())
    try:
        await asyncio.wait([stopper, ender, task], return_when=asyncio.FIRST_COMPLETED)
        if done.is_set() and not stop.is_set():  # end of input: let the output drain
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_drained(pending, drv), args.timeout)
        if task.done() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(in_fd)
        for t in (task, stopper, ender):
            t.cancel()
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        await drv.close()
        drv.dev.close()
    return 0


async def _drained(pending: list[bytes], drv: ConsoleDriver) -> None:
    while pending or any(isinstance(t, _Tx) for vq in drv.vqs for t in vq.in_flight()):
        await asyncio.sleep(0.01)
