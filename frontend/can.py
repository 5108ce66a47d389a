"""virtio-can driver in Python: an async CAN controller on a virtio-can link.

What Linux's ``virtio_can`` does, on :class:`VirtioDriver`: START the controller on attach, keep
the RX queue full of buffers (24 bytes on a classic-only link, 80 with CAN FD, as Linux posts
them), send frames with their result, surface bus-off from the config space. The device is
untrusted: an RX buffer with an impossible length or a frame of a type this link did not
negotiate is dropped and counted, as Linux does, never raised.

TX buffers are bounced through the R/W section (header + payload, then the result byte), like
every buffer of the ivshmem transport: from a slab of fixed slots carved once per bring-up (a
list pop instead of an allocator call per frame), or from the allocator for what does not fit.
Requests in flight when the backend goes away fail with :class:`ConnectionError`; a CAN frame is
not worth resending late.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ivshmem_virtio.errors import TransportError
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.spec.can import CanFrame, CanFrameError, decode_frame, encode_frame
from ivshmem_virtio.virtqueue.driver import Buffers

from .driver import VirtioDriver

log = structlog.get_logger("ivshmem_virtio.frontend.can")


@dataclass(frozen=True, slots=True)
class Received:
    """A frame the device delivered, with the used length it reported (16 + length)."""

    frame: CanFrame
    length: int
    timestamp: float


class _Req:
    """A TX or control request: readable bytes, then one result byte (a bounce buffer of
    ``len(payload) + 1`` bytes at ``addr`` while it is on the ring; ``slot``: it is a TX slab
    slot rather than an allocation)."""

    __slots__ = ("queue", "payload", "future", "addr", "slot")

    def __init__(self, queue: int, payload: bytes, future: asyncio.Future) -> None:
        self.queue = queue
        self.payload = payload
        self.future = future
        self.addr = -1
        self.slot = False

    @property
    def result_addr(self) -> int:
        return self.addr + len(self.payload)


@dataclass(eq=False)
class _RxBuf:
    addr: int
    size: int


@dataclass(eq=False)
class _Raw:
    """A chain written by the caller (tests, tools); completes with the used length."""

    future: asyncio.Future


@dataclass(slots=True)
class CanDriverMetrics:
    tx_count: int = 0  # TX requests answered OK
    tx_fails: int = 0  # TX requests answered NOT_OK
    rx_count: int = 0  # frames delivered
    rx_empty: int = 0  # RX buffers returned with used length 0 (frame too big for them)
    rx_invalid: int = 0  # RX buffers with an impossible length, bad frame or unnegotiated type
    config_events: int = 0
    bus_off_events: int = 0


class CanDriver(VirtioDriver):
    """One virtio-can controller: ``await send(frame)``, ``await recv()``, START/STOP, bus-off."""

    device_id = wire.VIRTIO_ID_CAN
    num_queues = wire.NUM_QUEUES

    def __init__(self, dev: IvshmemDevice, *, classic: bool = True, fd: bool = True,
                 rtr: bool = True, late_tx_ack: bool = True, event_idx: bool = True,
                 rx_buffer_size: int | None = None, rx_buffers: int | None = None,
                 auto_start: bool = True, on_frame: Callable[[Received], None] | None = None,
                 **kw: object) -> None:
        wanted = ((wire.F_CAN_CLASSIC if classic else 0) | (wire.F_CAN_FD if fd else 0)
                  | (wire.F_RTR_FRAMES if rtr else 0)
                  | (wire.F_LATE_TX_ACK if late_tx_ack else 0)
                  | (V.bit(V.F_EVENT_IDX) if event_idx else 0))
        super().__init__(dev, features=wanted, **kw)  # type: ignore[arg-type]
        self.rx_buffer_size = rx_buffer_size
        self.rx_size = 0  # the size of the buffers posted by the last bring-up
        self.rx_buffers = rx_buffers
        self.auto_start = auto_start
        self.on_frame = on_frame
        self.rx: asyncio.Queue[Received] = asyncio.Queue()
        self.metrics = CanDriverMetrics()
        self.status = 0
        self.bus_off = False
        self.controller_started = False
        self.attached = asyncio.Event()
        self.config_changed = asyncio.Event()
        self._backlog: dict[int, deque[_Req]] = {wire.TXQ: deque(), wire.CONTROLQ: deque()}
        self._ctrl_lock = asyncio.Lock()
        self._tx_slots: list[int] = []  # free TX slab slots (addresses) of this bring-up
        self._tx_slot_size = 0
        self._kicks: set[int] = set()
        self._kick_scheduled = False
        self._attach_task: asyncio.Task | None = None

    # -- negotiated properties -----------------------------------------------------------------
    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    @property
    def fd(self) -> bool:
        return self.has(wire.F_CAN_FD)

    def supports(self, frame: CanFrame) -> bool:
        """Whether this link negotiated the frame's type (what the device accepts and sends)."""
        if frame.rtr:
            return self.has(wire.F_RTR_FRAMES) and self.has(wire.F_CAN_CLASSIC)
        return self.has(wire.F_CAN_FD if frame.fd else wire.F_CAN_CLASSIC)

    # -- bring-up ----------------------------------------------------------------------------------
    async def start(self, timeout: float | None = None) -> None:
        """Bring the device up and (with ``auto_start``) START the controller."""
        await super().start(timeout)
        if self.auto_start:
            await asyncio.wait_for(self.attached.wait(), self.timeout if timeout is None
                                   else timeout)
            if not self.controller_started:
                raise TransportError(f"{self.dev.name}: the device refused START")

    def on_queues_ready(self) -> None:
        self.status = self._read_status()
        self.bus_off = bool(self.status & wire.VIRTIO_CAN_S_CTRL_BUSOFF)
        self.controller_started = False
        self.attached.clear()
        vq = self.vqs[wire.RXQ]
        self.rx_size = size = self.rx_buffer_size or (wire.RX_BUFFER_SIZE_FD if self.fd
                                                      else wire.RX_BUFFER_SIZE_CLASSIC)
        count = vq.size if self.rx_buffers is None else min(self.rx_buffers, vq.size)
        if count:
            alloc = self.transport.allocator
            assert alloc is not None
            slab = alloc.alloc(size * count)  # one allocation: the buffers live for the link
            for i in range(count):
                vq.add([], [(slab + i * size, size)], _RxBuf(slab + i * size, size))
        self._make_tx_slab()

    def _make_tx_slab(self) -> None:
        """TX bounce buffers for a frame of the largest negotiated size plus its result byte, as
        many as requests fit the TX ring (two descriptors each); none if memory is short."""
        self._tx_slots = []
        alloc = self.transport.allocator
        assert alloc is not None
        largest = wire.CAN_FD_MAX_LEN if self.fd else wire.CAN_CLASSIC_MAX_LEN
        size = 1 << (wire.FRAME_HEADER_SIZE + largest + wire.RESULT_SIZE - 1).bit_length()
        count = max(1, self.vqs[wire.TXQ].size // 2)
        try:
            slab = alloc.alloc(size * count)
        except TransportError:
            self._tx_slot_size = 0  # every request takes an allocation, as before
            return
        self._tx_slot_size = size
        self._tx_slots = [slab + i * size for i in reversed(range(count))]

    async def _bring_up(self, timeout: float | None = None) -> None:
        await super()._bring_up(timeout)
        self.transport.kick(wire.RXQ)
        for q in self._backlog:
            self._pump(q)
        if self.auto_start:
            self._attach_task = asyncio.create_task(self._attach())

    async def _attach(self) -> None:
        """START once the device is up (after every reconnect too), as ``ip link set up``."""
        try:
            await self.start_controller()
        except (ConnectionError, TransportError) as e:
            log.info("START not answered", link=self.dev.name, error=str(e))
        finally:
            self.attached.set()

    # -- public API ------------------------------------------------------------------------------
    async def send(self, frame: CanFrame) -> int:
        """Transmit ``frame``; returns the device's result (0 = OK, anything else NOT_OK)."""
        result = await self._submit(wire.TXQ, encode_frame(frame, wire.VIRTIO_CAN_TX))
        if result == wire.VIRTIO_CAN_RESULT_OK:
            self.metrics.tx_count += 1
        else:
            self.metrics.tx_fails += 1
        return result

    async def send_raw(self, request: bytes) -> int:
        """Transmit arbitrary TX request bytes (header + payload, unchecked); returns the result."""
        return await self._submit(wire.TXQ, bytes(request))

    async def recv(self) -> Received:
        """The next frame from the device (when no ``on_frame`` callback takes them)."""
        return await self.rx.get()

    async def start_controller(self) -> int:
        return await self.control(wire.VIRTIO_CAN_SET_CTRL_MODE_START)

    async def stop_controller(self) -> int:
        return await self.control(wire.VIRTIO_CAN_SET_CTRL_MODE_STOP)

    async def control(self, msg_type: int) -> int:
        """One control request (in order; the device answers once the transition is done)."""
        async with self._ctrl_lock:
            result = await self._submit(wire.CONTROLQ, wire.CONTROL_REQUEST.pack(msg_type))
        if result == wire.VIRTIO_CAN_RESULT_OK:
            if msg_type == wire.VIRTIO_CAN_SET_CTRL_MODE_START:
                self.controller_started = True
            elif msg_type == wire.VIRTIO_CAN_SET_CTRL_MODE_STOP:
                self.controller_started = False
        self._refresh_status()
        return result

    async def raw_request(self, queue: int, out: Buffers, inn: Buffers) -> int:
        """Post a hand-made chain (tests, fuzzing); returns the used length the device reports.

        The caller owns the memory named by ``out``/``inn`` (``transport.allocator``).
        """
        if not self.connected.is_set():
            raise ConnectionError("device not connected")
        tok = _Raw(asyncio.get_running_loop().create_future())
        vq = self.vqs[queue]
        vq.add(out, inn, tok)
        if vq.kick_needed():
            self.transport.kick(queue)
        return await tok.future

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds, re-checking on every config change."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("condition not reached")
            self.config_changed.clear()
            try:
                await asyncio.wait_for(self.config_changed.wait(), min(left, 0.05))
            except TimeoutError:
                pass

    # -- the queues -----------------------------------------------------------------------------
    def _submit(self, queue: int, payload: bytes) -> asyncio.Future:
        """Queue a request; the future gets its result byte (awaited by the caller)."""
        if self.closed:
            raise ConnectionError("device closed")
        req = _Req(queue, payload, asyncio.get_running_loop().create_future())
        backlog = self._backlog[queue]
        backlog.append(req)
        self._pump(queue, backlog)
        return req.future

    def _pump(self, q: int, backlog: deque[_Req] | None = None) -> None:
        """Move backlog requests into the ring while descriptors and shared memory last."""
        if backlog is None:
            backlog = self._backlog[q]
        if not backlog or not self.connected.is_set() or not self.vqs:
            return
        vq = self.vqs[q]
        alloc = self.transport.allocator
        assert alloc is not None
        mem = self.transport.hdr
        slots = self._tx_slots if q == wire.TXQ else None
        slot_size = self._tx_slot_size
        added = False
        while backlog and vq.can_add(2):
            req = backlog[0]
            if req.future.done():  # cancelled by the caller
                backlog.popleft()
                continue
            n = len(req.payload)
            if slots and n < slot_size:
                req.addr = addr = slots.pop()
                req.slot = True
            else:
                try:
                    req.addr = addr = alloc.alloc(n + wire.RESULT_SIZE)
                except TransportError:
                    break  # shared memory full: completions will free some
            backlog.popleft()
            mem.write(addr, req.payload)
            mem.set_u8(addr + n, 0xFF)
            vq.add(((addr, n),), ((addr + n, wire.RESULT_SIZE),), req)
            added = True
        if added and vq.kick_needed():
            self.transport.kick(q)

    def on_used(self, index: int, token: object, length: int) -> None:
        if isinstance(token, _RxBuf):
            self._on_rx(token, length)
        elif isinstance(token, _Req):
            mem = self.transport.hdr
            result = mem.u8(token.result_addr) if length >= wire.RESULT_SIZE else \
                wire.VIRTIO_CAN_RESULT_NOT_OK
            self._free(token)
            if not token.future.done():
                token.future.set_result(result)
            if self._backlog[index]:
                self._pump(index)
        elif isinstance(token, _Raw):
            if not token.future.done():
                token.future.set_result(length)

    def _on_rx(self, buf: _RxBuf, length: int) -> None:
        if length == 0:
            self.metrics.rx_empty += 1
        elif not wire.FRAME_HEADER_SIZE <= length <= buf.size:
            self.metrics.rx_invalid += 1
        else:
            try:
                frame = decode_frame(self.transport.hdr.read(buf.addr, length), wire.VIRTIO_CAN_RX)
            except CanFrameError:
                self.metrics.rx_invalid += 1
            else:
                if self.supports(frame):
                    self.metrics.rx_count += 1
                    r = Received(frame, length, time.time())
                    if self.on_frame is not None:
                        self.on_frame(r)
                    else:
                        self.rx.put_nowait(r)
                else:
                    self.metrics.rx_invalid += 1
        vq = self.vqs[wire.RXQ]
        vq.add([], [(buf.addr, buf.size)], buf)
        self._kick_later(wire.RXQ)

    def _kick_later(self, q: int) -> None:
        """One doorbell for all the buffers re-posted while handling one interrupt."""
        self._kicks.add(q)
        if not self._kick_scheduled:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_kicks)

    def _flush_kicks(self) -> None:
        self._kick_scheduled = False
        kicks, self._kicks = self._kicks, set()
        if not self.connected.is_set() or not self.vqs:
            return
        for q in kicks:
            if self.vqs[q].kick_needed():
                self.transport.kick(q)

    def _free(self, req: _Req) -> None:
        if req.addr >= 0:
            if req.slot:
                self._tx_slots.append(req.addr)
            else:
                alloc = self.transport.allocator
                if alloc is not None:
                    alloc.free(req.addr)
        req.addr = -1

    # -- config space -----------------------------------------------------------------------------
    def _read_status(self) -> int:
        return wire.CONFIG.unpack(self.transport.read_config(0, wire.CONFIG_SIZE))[0]

    def _refresh_status(self) -> None:
        if not self.connected.is_set():
            return
        self.status = self._read_status()
        busoff = bool(self.status & wire.VIRTIO_CAN_S_CTRL_BUSOFF)
        if busoff and not self.bus_off:
            self.metrics.bus_off_events += 1
            self.controller_started = False  # the device stopped the controller
            log.warning("bus-off", link=self.dev.name)
        self.bus_off = busoff

    def on_config_change(self) -> None:
        self.metrics.config_events += 1
        self._refresh_status()
        self.config_changed.set()

    # -- reconnect and teardown ------------------------------------------------------------------
    def resubmit(self, tokens: list[object]) -> None:
        """The ring is gone: fail what was in flight (RX buffers were re-posted by the bring-up)."""
        self.fail_all(ConnectionError("backend restarted"), tokens)

    def fail_all(self, exc: BaseException, tokens: list[object] | None = None) -> None:
        reqs: list[_Req | _Raw] = []
        if tokens is None:
            for backlog in self._backlog.values():
                reqs += backlog
                backlog.clear()
            tokens = [t for vq in self.vqs for t in vq.in_flight()]
        reqs += [t for t in tokens if isinstance(t, _Req | _Raw)]
        for r in reqs:
            if isinstance(r, _Req):
                r.addr = -1  # the allocator is rebuilt by every bring-up
            if not r.future.done():
                r.future.set_exception(exc)
                r.future.exception()  # retrieved: nobody may be waiting any more

    async def close(self) -> None:
        if self._attach_task is not None and not self._attach_task.done():
            self._attach_task.cancel()
        await super().close()
