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

Threads: :meth:`CanDriver.send_from_thread` submits a frame straight from the caller's thread
(python-can's blocking ``send``), without a hand-off to the driver's event loop. Everything the
TX path shares (the TX and control rings, their free lists, the TX slab, the allocator, the
backlog) is therefore touched only under ``tx_lock``, by the loop thread and the callers alike.
While only such callers use the TX ring, its completions raise no interrupt (used_event parked):
a caller reaps them itself, in place, and re-arms the interrupt only before it blocks. A caller
that does not wait reaps once ``REAP_BATCH`` slots are in use, not on every send (or the loop
does, on any interrupt).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ivshmem_virtio.errors import RingError, TransportError
from ivshmem_virtio.log import RateLimiter
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.spec.can import (
    CanErrorFrame,
    CanFrame,
    CanFrameError,
    decode_error_frame,
    decode_frame,
    encode_frame,
)
from ivshmem_virtio.virtqueue.driver import Buffers, DriverQueue

from .driver import Device, VirtioDriver

log = structlog.get_logger("ivshmem_virtio.frontend.can")

#: A thread's send reaps the TX answers once this many slab slots are in use, not on every send
#: (one reap for many answers: a reap per send was a third of a paced send's time).
REAP_BATCH = 16


@dataclass(frozen=True, slots=True)
class Received:
    """A frame the device delivered, with the used length it reported (16 + length)."""

    frame: CanFrame
    length: int
    timestamp: float


@dataclass(frozen=True, slots=True)
class ReceivedError:
    """An error frame the device delivered (project extension, F_IVV_ERROR_STATE)."""

    frame: CanErrorFrame
    timestamp: float


class _Req:
    """A TX or control request: readable bytes, then one result byte (a bounce buffer of
    ``len(payload) + 1`` bytes at ``addr`` while it is on the ring; ``slot``: it is a TX slab
    slot rather than an allocation).

    ``future`` is None for a request submitted from a thread (:meth:`CanDriver.send_from_thread`):
    its answer lands in ``result`` (or ``error``) under ``tx_lock``; ``waited``: its caller
    waits for the answer (else a NOT_OK is reported later, see ``CanDriver.refused``).
    """

    __slots__ = ("queue", "payload", "future", "addr", "slot", "result", "error", "waited")

    def __init__(self, queue: int, payload: bytes, future: asyncio.Future | None,
                 waited: bool = True) -> None:
        self.queue = queue
        self.payload = payload
        self.future = future
        self.addr = -1
        self.slot = False
        self.result: int | None = None
        self.error: BaseException | None = None
        self.waited = waited

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
    tx_fails_unwaited: int = 0  # ... of which sent from a thread that did not wait for the answer
    rx_count: int = 0  # frames delivered
    rx_empty: int = 0  # RX buffers returned with used length 0 (frame too big for them)
    rx_invalid: int = 0  # RX buffers with an impossible length, bad frame or unnegotiated type
    config_events: int = 0
    bus_off_events: int = 0
    error_frames: int = 0  # error frames delivered (extension, F_IVV_ERROR_STATE)


class CanDriver(VirtioDriver):
    """One virtio-can controller: ``await send(frame)``, ``await recv()``, START/STOP, bus-off."""

    device_id = wire.VIRTIO_ID_CAN
    num_queues = wire.NUM_QUEUES

    def __init__(self, dev: Device, *, classic: bool = True, fd: bool = True,
                 rtr: bool = True, late_tx_ack: bool = True, event_idx: bool = True,
                 rx_buffer_size: int | None = None, rx_buffers: int | None = None,
                 auto_start: bool = True, on_frame: Callable[[Received], None] | None = None,
                 errors: bool = False,
                 on_error: Callable[[ReceivedError], None] | None = None,
                 **kw: object) -> None:
        # ``errors``: negotiate the project's error-state extension (bit 22): the controller's
        # error-warning/passive in ``status`` and error frames, which plain virtio-can lacks.
        wanted = ((wire.F_CAN_CLASSIC if classic else 0) | (wire.F_CAN_FD if fd else 0)
                  | (wire.F_RTR_FRAMES if rtr else 0)
                  | (wire.F_IVV_ERROR_STATE if errors else 0)
                  | (wire.F_LATE_TX_ACK if late_tx_ack else 0)
                  | (V.bit(V.F_EVENT_IDX) if event_idx else 0))
        # before the base class assigns ``vqs`` (a property taking it, see there)
        self.tx_lock = threading.RLock()
        self._tx_cond = threading.Condition(self.tx_lock)
        self._vqs: list[DriverQueue] = []
        self._tx_waiters = 0  # threads blocked for a TX answer (they need the interrupt)
        self._tx_async = 0  # TX requests with an asyncio future on the ring (need it too)
        #: NOT_OK answers to thread sends nobody waited for, not yet reported (see ``refused``)
        self.refused = 0
        self._refused_log = RateLimiter()
        self._loop: asyncio.AbstractEventLoop | None = None
        super().__init__(dev, features=wanted, **kw)  # type: ignore[arg-type]
        self.rx_buffer_size = rx_buffer_size
        self.rx_size = 0  # the size of the buffers posted by the last bring-up
        self.rx_buffers = rx_buffers
        self.auto_start = auto_start
        self.on_frame = on_frame
        self.on_error = on_error
        self.rx: asyncio.Queue[Received] = asyncio.Queue()
        #: error frames, when ``on_error`` is None (extension, F_IVV_ERROR_STATE)
        self.errors: asyncio.Queue[ReceivedError] = asyncio.Queue()
        self.metrics = CanDriverMetrics()
        self.status = 0
        self.bus_off = False
        #: the controller's error state from ``status`` (extension; False without it)
        self.error_warning = False
        self.error_passive = False
        self.controller_started = False
        self.attached = asyncio.Event()
        self.config_changed = asyncio.Event()
        self._backlog: dict[int, deque[_Req]] = {wire.TXQ: deque(), wire.CONTROLQ: deque()}
        self._ctrl_lock = asyncio.Lock()
        self._tx_slots: list[int] = []  # free TX slab slots (addresses) of this bring-up
        self._tx_slot_size = 0
        self._tx_reap_at = 0  # a thread's send reaps answers once this few slots are free
        self._kicks: set[int] = set()
        self._kick_scheduled = False
        self._attach_task: asyncio.Task | None = None

    # -- the rings, shared with sending threads -------------------------------------------------
    @property
    def vqs(self) -> list[DriverQueue]:
        return self._vqs

    @vqs.setter
    def vqs(self, vqs: list[DriverQueue]) -> None:
        """Rings are replaced (reset, reconnect) only under ``tx_lock``: a thread in the middle of
        :meth:`send_from_thread` finishes on the old ring first. What it left there is failed
        here: the base class collected the in-flight tokens before taking the lock."""
        with self.tx_lock:
            old, self._vqs = self._vqs, vqs
            self._tx_async = 0  # what was on the old rings is failed by the caller
            if old and old is not vqs and len(old) > wire.TXQ:
                self._fail_thread_calls(old[wire.TXQ].in_flight(),
                                        ConnectionError("the rings were reset"))

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
        self._loop = asyncio.get_running_loop()
        await super().start(timeout)
        if self.auto_start:
            await asyncio.wait_for(self.attached.wait(), self.timeout if timeout is None
                                   else timeout)
            if not self.controller_started:
                raise TransportError(f"{self.dev.name}: the device refused START")

    def on_queues_ready(self) -> None:
        with self.tx_lock:  # the allocator is shared with sending threads
            self._fill_rings()

    def _fill_rings(self) -> None:
        self.status = self._read_status()
        self.bus_off = bool(self.status & wire.VIRTIO_CAN_S_CTRL_BUSOFF)
        self._error_bits()
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
            self._tx_reap_at = 0
            return
        self._tx_slot_size = size
        self._tx_slots = [slab + i * size for i in reversed(range(count))]
        self._tx_reap_at = count - REAP_BATCH if count > 2 * REAP_BATCH else count // 2

    async def _bring_up(self, timeout: float | None = None) -> None:
        await super()._bring_up(timeout)
        self.transport.kick(wire.RXQ)
        with self.tx_lock:
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
        with self.tx_lock:  # the metrics are shared with sending threads
            if result == wire.VIRTIO_CAN_RESULT_OK:
                self.metrics.tx_count += 1
            else:
                self.metrics.tx_fails += 1
        return result

    def send_nowait(self, frame: CanFrame) -> bool:
        """Put ``frame`` on the TX ring and return at once (any thread, the loop's included):
        no future, no completion interrupt (answers are reaped by a send once ``REAP_BATCH``
        slots are in use, or on any interrupt; a NOT_OK one counts in ``refused``). False when
        it cannot go this way now (not connected, ring full, loop requests queued first): use
        :meth:`send` then."""
        return self.submit_from_thread(encode_frame(frame, wire.VIRTIO_CAN_TX),
                                       waited=False) is not None

    # -- sending from another thread --------------------------------------------------------------
    def submit_from_thread(self, payload: bytes, *, waited: bool) -> _Req | None:
        """Put one TX request on the ring from the calling thread and kick; never blocks.

        Returns None when it cannot go this way now (not connected, ring or slab full, requests
        of the event loop in the way): the caller then uses :meth:`send` on the loop, whose
        backlog keeps the order. ``waited``: the caller will :meth:`wait_from_thread` for the
        answer; otherwise a NOT_OK answer is counted in ``refused`` when it arrives.
        """
        req = _Req(wire.TXQ, payload, None, waited)
        n = len(payload)
        with self.tx_lock:
            vqs = self._vqs
            if (self.closed or not vqs or not self.connected.is_set() or self._tx_async
                    or self._backlog[wire.TXQ] or self._ring_fault is not None):
                return None
            vq = vqs[wire.TXQ]
            slots = self._tx_slots
            if (len(slots) <= self._tx_reap_at or not vq.can_add(2)) and vq.has_used():
                self._reap(vq)  # free the slots the device answered meanwhile, in one go
            if not slots or n >= self._tx_slot_size or not vq.can_add(2):
                return None
            req.addr = addr = slots.pop()
            req.slot = True
            mem = self.transport.hdr
            mem.write(addr, payload)
            mem.set_u8(addr + n, 0xFF)
            if vq.interrupts_on and not self._tx_waiters:
                vq.suppress_interrupts(True)  # reaped by the next caller, or on any interrupt
            vq.add(((addr, n),), ((addr + n, wire.RESULT_SIZE),), req)
            kick = vq.kick_needed()
        if kick:
            self.transport.kick(wire.TXQ)
        return req

    def wait_from_thread(self, req: _Req, timeout: float | None, spin_us: float = 0.0) -> int:
        """The device's answer to a request of :meth:`submit_from_thread` (calling thread).

        Spins up to ``spin_us`` on the used ring and reaps in place (no interrupt, no thread
        switch); then turns the TX interrupt on and sleeps until the loop thread's interrupt
        handler (or another caller) hands the answer over. Raises TimeoutError (the answer then
        counts in ``refused`` if it is NOT_OK) or ConnectionError (the rings went away).
        """
        vqs = self._vqs
        vq = vqs[wire.TXQ] if vqs else None
        if spin_us > 0 and vq is not None:
            clock = time.perf_counter
            end = clock() + spin_us / 1e6
            while req.result is None and req.error is None:
                if vq.has_used():
                    with self.tx_lock:
                        if self._may_reap(vq):
                            self._reap(vq)
                            continue
                    break  # the loop thread reaps: sleep below
                if clock() > end:
                    break
        with self.tx_lock:
            if req.result is None and req.error is None:
                self._tx_waiters += 1
                try:
                    if vq is not None and self._vqs and self._vqs[wire.TXQ] is vq:
                        self._interrupts_for(vq)  # the next answer interrupts ...
                        if vq.has_used() and self._may_reap(vq):
                            self._reap(vq)  # ... and one that came before it is taken here
                    deadline = None if timeout is None else time.monotonic() + timeout
                    while req.result is None and req.error is None:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            req.waited = False  # a late NOT_OK is reported through `refused`
                            raise TimeoutError(f"send not answered within {timeout} s")
                        self._tx_cond.wait(left)
                finally:
                    self._tx_waiters -= 1
            if req.error is not None:
                raise req.error
            assert req.result is not None
            return req.result

    def take_refused(self) -> int:
        """How many thread sends were refused since the last call (and forget them)."""
        with self.tx_lock:
            n, self.refused = self.refused, 0
        return n

    def _may_reap(self, vq: DriverQueue) -> bool:
        """May a sending thread take TX completions itself now (under ``tx_lock``)? Not while
        the loop has requests with asyncio futures there (those must complete on the loop)."""
        vqs = self._vqs
        return (bool(vqs) and vqs[wire.TXQ] is vq and not self._tx_async
                and not self._backlog[wire.TXQ] and self._ring_fault is None)

    def _reap(self, vq: DriverQueue) -> None:
        """A sending thread takes the TX completions (under ``tx_lock``); a ring fault is left
        to the loop's interrupt task, which recovers the device."""
        try:
            self._complete_locked(wire.TXQ, vq)
        except RingError as e:
            self._ring_fault = str(e)
            self._interrupts_for(vq)
            loop, waiter = self._loop, self._waiter
            if loop is not None and waiter is not None:
                loop.call_soon_threadsafe(waiter.kick)

    def _thread_answer(self, req: _Req, result: int) -> None:
        """The answer to a thread's request (under ``tx_lock``, on whichever thread reaped it)."""
        req.result = result
        m = self.metrics
        if result == wire.VIRTIO_CAN_RESULT_OK:
            m.tx_count += 1
        else:
            m.tx_fails += 1
            if not req.waited:
                m.tx_fails_unwaited += 1
                self.refused += 1
                if self._refused_log.allow(time.monotonic()):
                    log.warning("the device refused a frame after send() returned (NOT_OK)",
                                link=self.dev.name, bus_off=self.bus_off,
                                started=self.controller_started)
        if self._tx_waiters:
            self._tx_cond.notify_all()

    def _fail_thread_calls(self, tokens: list[object], exc: BaseException) -> None:
        """Thread requests among ``tokens`` that will never be answered (under ``tx_lock``)."""
        for t in tokens:
            if isinstance(t, _Req) and t.future is None and t.result is None \
                    and t.error is None:
                t.addr = -1
                t.error = exc
        self._tx_cond.notify_all()

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
        with self.tx_lock:
            vq = self.vqs[queue]
            if queue == wire.TXQ:
                self._tx_async += 1
                self._interrupts_for(vq)
            vq.add(out, inn, tok)
            kick = vq.kick_needed()
        if kick:
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
        future = asyncio.get_running_loop().create_future()
        req = _Req(queue, payload, future)
        backlog = self._backlog[queue]
        with self.tx_lock:
            backlog.append(req)
            self._pump(queue, backlog)
        return future

    def _interrupts_for(self, vq: DriverQueue) -> None:
        """Someone will wait for an interrupt from this TX ring: un-park used_event. (Answers
        that came while it was parked raised none: the caller re-checks the ring.)"""
        if not vq.interrupts_on:
            vq.suppress_interrupts(False)

    def _complete(self, index: int, vq: DriverQueue) -> int:
        """TX and control completions are taken under ``tx_lock`` (shared with senders)."""
        if index == wire.RXQ:
            return super()._complete(index, vq)
        with self.tx_lock:
            return self._complete_locked(index, vq)

    def _complete_locked(self, index: int, vq: DriverQueue) -> int:
        return super()._complete(index, vq)

    def _pump(self, q: int, backlog: deque[_Req] | None = None) -> None:
        """Move backlog requests into the ring while descriptors and shared memory last
        (under ``tx_lock``)."""
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
            assert req.future is not None  # a backlog holds the loop's requests only (_submit)
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
            if q == wire.TXQ:
                self._tx_async += 1
                self._interrupts_for(vq)
            vq.add(((addr, n),), ((addr + n, wire.RESULT_SIZE),), req)
            added = True
        if q == wire.TXQ and backlog and not vq.interrupts_on:
            # what waits in the backlog moves on at the next completion: it must interrupt
            vq.suppress_interrupts(False)
            if vq.has_used() and self._waiter is not None:
                self._waiter.kick()  # answered while parked: no interrupt will come for those
        if added and vq.kick_needed():
            self.transport.kick(q)

    def on_used(self, index: int, token: object, length: int) -> None:
        if isinstance(token, _RxBuf):
            self._on_rx(token, length)
        elif isinstance(token, _Req):  # (TX and control: called under tx_lock, see _complete)
            mem = self.transport.hdr
            result = mem.u8(token.result_addr) if length >= wire.RESULT_SIZE else \
                wire.VIRTIO_CAN_RESULT_NOT_OK
            self._free(token)
            future = token.future
            if future is None:
                self._thread_answer(token, result)
            else:
                if index == wire.TXQ:
                    self._tx_async -= 1
                if not future.done():
                    future.set_result(result)
            if self._backlog[index]:
                self._pump(index)
        elif isinstance(token, _Raw):
            if index == wire.TXQ:
                self._tx_async -= 1
            if not token.future.done():
                token.future.set_result(length)

    def _on_rx(self, buf: _RxBuf, length: int) -> None:
        if length == 0:
            self.metrics.rx_empty += 1
        elif not wire.FRAME_HEADER_SIZE <= length <= buf.size:
            self.metrics.rx_invalid += 1
        elif self.has(wire.F_IVV_ERROR_STATE) and (err := decode_error_frame(
                self.transport.hdr.read(buf.addr, length))) is not None:
            self.metrics.error_frames += 1
            e = ReceivedError(err, time.time())
            if self.on_error is not None:
                self.on_error(e)
            else:
                self.errors.put_nowait(e)
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
        self._error_bits()

    def _error_bits(self) -> None:
        """Error-warning/passive from ``status``: only meaningful with the extension."""
        ext = self.has(wire.F_IVV_ERROR_STATE)
        self.error_passive = ext and bool(self.status & wire.VIRTIO_CAN_S_IVV_ERROR_PASSIVE)
        self.error_warning = ext and bool(self.status & wire.VIRTIO_CAN_S_IVV_ERROR_WARNING)

    def on_config_change(self) -> None:
        self.metrics.config_events += 1
        self._refresh_status()
        self.config_changed.set()

    # -- reconnect and teardown ------------------------------------------------------------------
    def resubmit(self, tokens: list[object]) -> None:
        """The ring is gone: fail what was in flight (RX buffers were re-posted by the bring-up)."""
        self.fail_all(ConnectionError("backend restarted"), tokens)

    def fail_all(self, exc: BaseException, tokens: list[object] | None = None) -> None:
        with self.tx_lock:
            self._fail_all(exc, tokens)

    def _fail_all(self, exc: BaseException, tokens: list[object] | None) -> None:
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
            future = r.future
            if future is None:  # a thread's request
                assert isinstance(r, _Req)
                if r.result is None and r.error is None:
                    r.error = exc
            elif not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: nobody may be waiting any more
        if tokens is None:
            self._tx_async = 0
        self._tx_cond.notify_all()

    async def close(self) -> None:
        if self._attach_task is not None and not self._attach_task.done():
            self._attach_task.cancel()
        await super().close()
