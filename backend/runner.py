"""The asyncio side of the backend: wait for doorbells, drive the transport, drain queues.

:class:`QueueRunner` is what a device service sees of its runner (the batch size, deferred work,
passive queues, config changes) and how queues are served in turns; it takes its transport as a
parameter (:class:`QueueTransport`). One :class:`LinkRunner` serves one device on one ivshmem
link; ``backend/vhost_user.py`` serves one over a vhost-user socket with the same base. Device
services are synchronous (they pop chains, run fast I/O inline and push used entries); slow
operations (fsync, hole punching) go to a worker thread and complete through
:meth:`QueueRunner.defer`, so a FLUSH never delays the
clearing of a write transaction (virtio-ivshmem.md §8.7). A service or peer fault marks only
this device NEEDS_RESET; other runners in the daemon keep going.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from ivshmem_virtio.errors import DeviceError, MemoryAccessError, RingError
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.link import SPIN_CAP_US, IrqWaiter
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.transport.device import DeviceTransport
from ivshmem_virtio.virtqueue.device import DeviceQueue

log = structlog.get_logger("ivshmem_virtio.backend")

PEER_FAULTS = (DeviceError, RingError, MemoryAccessError)
WEIGHT = 64  # requests per queue per turn (NAPI's default budget)
SUB_BATCH = 32  # popped at a time inside a turn, so that its time bound is checked in between
TURN_S = 200e-6  # service time per device per turn
POLL_ALONE_NS = 20_000  # a compiled poll's burst when no other device shares the loop
SLICE_NS = 10_000  # service time between two looks at the other devices while one is active
ACTIVE_S = 0.1  # a device that served a request this recently counts as active
OFFLOAD_NS = 2_000_000  # a busy device's worker serves this long before its task looks again
WORKER_NICE = 10  # the workers' niceness: bulk work, which the loop's light devices preempt

#: the LinkRunners of each event loop (a serve daemon's devices): a turn ends early when another
#: of them has work waiting, so a device that used little lately is served next
_LOOP_RUNNERS: dict[int, list[LinkRunner]] = {}


def _bulk_thread() -> None:
    """A busy device's worker thread runs at ``WORKER_NICE``: the kernel then lets the loop
    thread (the light devices, woken by their doorbells) in at once instead of at the end of the
    worker's time slice (measured: without it, 2 of 12 fairness runs had the other disk's p99
    at 5.7-8.6x the control; at nice 10, 0 of 9). Raising one's own niceness needs no right."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, WORKER_NICE)  # (0: this thread, on Linux)
    except OSError:
        log.warning("cannot lower a worker thread's priority", exc_info=True)


class Service(Protocol):
    """A device model plus its host resource, as the runner drives it."""

    device_id: int
    num_queues: int

    @property
    def features(self) -> int: ...
    def config(self) -> bytes: ...
    def on_reset(self) -> None: ...
    def on_activate(self, features: int, runner: QueueRunner) -> None: ...
    def serve(self, index: int, vq: DeviceQueue, runner: QueueRunner) -> int: ...
    def close(self) -> None: ...
    # optional: ``passive_queues``, queues whose buffers the service takes when it needs one
    # (virtio-can RX): new buffers there are not work and ask for no kick
    # optional: ``poll(index, vq, runner, until_ns, watch_off) -> (served, notify, owner) |
    # None``, a compiled poll (virtio-blk: _fastpath.BlkQueue.poll) the runner spins in
    # between requests: ``notify`` the driver wants an interrupt, ``owner`` the task must run
    # optional: ``serve_worker(index, vq, until_ns, slice_ns, watch_off, yield_cpu, ring) ->
    # (served, left, owner) | None``, a compiled stretch that also rings the driver, run in the
    # device's worker thread while it is busy beside another device (LinkRunner._offload)


def passive_queues(service: Service) -> frozenset[int]:
    return frozenset(getattr(service, "passive_queues", ()))


class QueueTransport(Protocol):
    """What the queue-serving half of a runner (and a service) needs of its transport."""

    vqs: list[DeviceQueue | None]

    @property
    def serving(self) -> bool: ...
    @property
    def negotiated(self) -> int: ...
    def transaction_pending(self) -> bool: ...
    def mark_needs_reset(self, reason: str) -> None: ...
    def notify_queue(self, index: int) -> None: ...
    def update_config(self, config: bytes) -> None: ...


class QueueRunner:
    """The queue-serving half of a runner, whatever the transport: turns over the queues,
    deferred work, passive queues. Subclasses set ``transport`` and wait for notifications."""

    transport: QueueTransport

    def __init__(self, service: Service, *, name: str, batch: int | None = None,
                 workers: int = 2) -> None:
        self.name = name  # the link or socket, for logs
        self.service = service
        self.batch = min(batch or SUB_BATCH, WEIGHT)  # chains a service pops at a time
        self.served = 0  # requests the last turn served
        self.active_at = -1.0  # perf_counter() at the start of the last turn that served one
        self.until_ns = 0  # set before each serve(): monotonic_ns() past which a service starts
        # no new request (0: no time bound; the device is alone or the others are idle)
        self._rr = 0  # the queue the next turn starts with
        self.generation = 0  # bumped on every reset: completions of an older ring are dropped
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix="blk-io")
        self._pending: set[asyncio.Future] = set()
        self._passive = passive_queues(service)

    def _control(self) -> bool:
        """Serve the transport's control path (between batches when it has a transaction);
        True when it had something to do."""
        return False

    def _others_waiting(self) -> bool:
        """Does another device of this loop have work? (Checked between sub-batches.)"""
        return False

    def _others_active(self, now: float) -> bool:
        """Has another device of this loop served a request lately? Then this one's turn is
        cut in time slices (``until_ns``) so that it looks at them every ``SLICE_NS``."""
        return False

    async def _drain_pending(self) -> None:
        """Shutdown completes in-flight slow requests and publishes them before we leave."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # -- queues ---------------------------------------------------------------------------------
    def _serve_queues(self) -> bool:
        """One turn of this device: its queues in round robin, each at most ``WEIGHT`` requests,
        all of them at most ``TURN_S`` of service time. True when work was left for the next
        turn: the caller yields to the event loop first, so that the other devices of the
        daemon (and their doorbells) are served in between (Linux's NAPI budget, vhost's
        weight; a turn bounded by time gives every device the same share of the CPU whatever
        its requests cost, and one that used little lately is served at its next doorbell)."""
        t = self.transport
        vqs = t.vqs
        nq = len(vqs)
        clock = time.perf_counter
        start = clock()
        end = start + TURN_S
        sliced = self._others_active(start)
        ns = time.monotonic_ns
        more = False
        self.served = 0
        first = self._rr = (self._rr + 1) % nq if nq else 0
        for k in range(nq):
            index = (first + k) % nq
            vq = vqs[index]
            if vq is None:
                continue
            try:
                vq.disable_notifications()
                done = 0
                while True:
                    self.until_ns = ns() + SLICE_NS if sliced else 0
                    n = self.service.serve(index, vq, self)
                    done += n
                    if vq.publish():
                        t.notify_queue(index)
                    if t.transaction_pending():
                        self._control()  # keep the control path prompt between batches
                        if t.vqs[index] is not vq:
                            break
                    if n == 0 or not vq.has_new():
                        break  # kicks stay off while we spin; prepare_block turns them on
                    if done >= WEIGHT or clock() >= end or self._others_waiting():
                        more = True  # the rest waits for this device's next turn
                        break
                self.served += done
            except Exception as e:  # noqa: BLE001 - a bug of ours must not take the daemon down
                self._queue_fault(index, e)
                return False
        if self.served:
            self.active_at = start
        return more

    def _queue_fault(self, index: int, e: Exception) -> None:
        """Serving queue ``index`` raised ``e`` (inside an ``except``): this device only is
        marked NEEDS_RESET, and completions of its old ring are dropped. A peer's fault is the
        peer's; anything else is a bug of ours, logged with its traceback."""
        if isinstance(e, PEER_FAULTS):
            reason = f"queue {index}: {e}"
        else:
            log.exception("device fault", link=self.name, queue=index)
            reason = f"queue {index}: internal error {e!r}"
        self.transport.mark_needs_reset(reason)
        self.generation += 1

    def _enable_notifications(self) -> bool:
        """Before sleeping: ask for kicks again, and report work that slipped in meanwhile."""
        t = self.transport
        if not t.serving:
            return False
        passive = self._passive
        try:
            return any([vq.enable_notifications() for i, vq in enumerate(t.vqs)
                        if vq is not None and i not in passive])
        except RingError:
            return True

    def defer(self, index: int, head: int, work: Callable[[], int]) -> None:
        """Run slow ``work`` (returning the used length) off the loop; complete it later."""
        gen = self.generation
        fut = asyncio.get_running_loop().run_in_executor(self._pool, work)
        self._pending.add(fut)

        def done(f: asyncio.Future) -> None:
            self._pending.discard(f)
            if f.cancelled():
                return
            exc = f.exception()
            t = self.transport
            vq = t.vqs[index] if index < len(t.vqs) else None
            if gen != self.generation or vq is None:
                return  # the ring this request came from is gone
            if exc is not None:
                t.mark_needs_reset(f"queue {index}: {exc}")
                self.generation += 1
                return
            vq.push(head, f.result())
            if vq.publish():
                t.notify_queue(index)

        fut.add_done_callback(done)

    def notify_config(self) -> None:
        self.transport.update_config(self.service.config())

    def set_passive(self, index: int, passive: bool) -> None:
        """Make queue ``index`` passive (its new buffers are not work, ask for no kick) or active.

        A service whose need for a queue changes at run time calls this: virtio-console's
        transmitq while the host side is behind, its receiveq while no input waits. The set is
        replaced, never mutated, so a loop over it (``_has_work``) never sees it change under it.
        A queue made active is not served here: the caller pumps it if buffers wait.
        """
        current = self._passive
        if (index in current) != passive:
            self._passive = current | {index} if passive else current - {index}

    def is_passive(self, index: int) -> bool:
        return index in self._passive


class LinkRunner(QueueRunner):
    """Serve one device over one ivshmem link until :meth:`stop`."""

    transport: DeviceTransport

    def __init__(self, dev: IvshmemDevice, service: Service, *, mode: str = "adaptive",
                 spin_us: float = SPIN_CAP_US, burst_us: float = 5.0, queue_size: int = 256,
                 batch: int | None = None, workers: int = 2) -> None:
        super().__init__(service, name=dev.name, batch=batch, workers=workers)
        self.dev = dev
        self.transport = DeviceTransport(dev, device_features=service.features,
                                         config=service.config(),
                                         num_queues=service.num_queues,
                                         queue_max_size=queue_size)
        self.mode = mode
        self.spin_us = spin_us
        self.burst_us = burst_us  # checks between loop passes while spinning (IrqWaiter)
        self._stopping = False
        self._waiter: IrqWaiter | None = None
        self._peers: list[LinkRunner] = []  # every LinkRunner of this loop, self included
        self._service_poll: Callable[..., tuple[int, bool, bool] | None] | None = getattr(
            service, "poll", None)
        self._service_worker: Callable[..., tuple[int, bool, bool] | None] | None = getattr(
            service, "serve_worker", None)
        self.metrics = self.transport.metrics
        self._worker: concurrent.futures.ThreadPoolExecutor | None = None  # see _offload
        self._offloaded = False  # the worker serves the device now
        self.offloads = 0  # turns handed to the worker

    # -- life cycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        t = self.transport
        t.start()
        self._waiter = waiter = IrqWaiter(self.dev, mode=self.mode, spin_us=self.spin_us,
                                             burst_us=self.burst_us)
        waiter.handler = self._on_interrupt
        log.info("serving", link=self.dev.name, device_id=self.service.device_id,
                 mode=self.mode)
        key = id(asyncio.get_running_loop())
        self._peers = peers = _LOOP_RUNNERS.setdefault(key, [])
        peers.append(self)
        heavy = False  # the last turn left work and may go on in the worker thread
        try:
            while not self._stopping:
                busy = self._control()
                if t.serving:
                    # (asked again, not kept from the last turn: a reset may have come)
                    ring = self._offload_ring() if heavy else None
                    more = await self._offload(ring) if ring is not None else self._serve_queues()
                    if more:
                        heavy = self._offload_ring() is not None
                        if not heavy:
                            await asyncio.sleep(0)  # turn used up: the loop's others go first
                        continue
                    heavy = False
                    busy = busy or self.served > 0
                if not busy:
                    # woken for nothing (a peer flipping its avail index makes the polls see
                    # work that the turn then does not find): a loop pass before the next
                    # wait, which may return at once again, so the loop's others still run;
                    # a doorbell behind it counts toward muting a storm
                    waiter.woke_for_nothing()
                    await asyncio.sleep(0)
                await waiter.wait(self._has_work, prepare_block=self._enable_notifications,
                                  serve=self._native_poll())
        finally:
            peers.remove(self)
            if not peers and _LOOP_RUNNERS.get(key) is peers:
                del _LOOP_RUNNERS[key]
            await self._drain_pending()
            waiter.close()
            t.stop()
            self._pool.shutdown(wait=True)
            if self._worker is not None:
                self._worker.shutdown(wait=True)  # (idle: _offload waited for its last call)

    # -- a busy device in its own thread ---------------------------------------------------------
    def _offload_ring(self) -> tuple[int, int, object | None, int, int] | None:
        """How the worker would ring the driver, if this device's next turn goes to it; else
        None. It goes while the device keeps work left beside another active device of the
        loop, where the compiled path serves it whole (its one queue, a compiled worker,
        compiled ringing on this link) and nothing of the device is pending on the loop."""
        if (self._others_active(time.perf_counter()) and self._service_worker is not None
                and self._native_poll() is not None and not self._pending
                and self.transport.idle()):
            return self.transport.native_notify(0)  # (on this thread: it may apply hub messages)
        return None

    async def _offload(self, ring: tuple[int, int, object | None, int, int]) -> bool:
        """Serve this device from its worker thread for up to ``OFFLOAD_NS``; True when work was
        left. Linux moves softirq work that keeps coming to ksoftirqd, a thread the scheduler
        weighs like any other, for the same reason: a busy device served on the loop makes the
        daemon one CPU-bound thread, which the kernel then schedules as one (a neighbour's lone
        request waits while the daemon is off its CPU), whereas the loop, left with the light
        devices, mostly sleeps and is woken first. The worker runs compiled code with the GIL
        released (``serve_worker``: poll, serve, publish and ring, no Python per request).
        Meanwhile the device's fds are not watched (its handler must not serve beside the
        worker), and the task waits for the worker to end even when it is cancelled, so that
        nothing touches the queue after this returns."""
        waiter = self._waiter
        assert waiter is not None
        if self._worker is None:
            self._worker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"serve-{self.name}", initializer=_bulk_thread)
        waiter.pause()
        self._offloaded = True
        self.offloads += 1
        done = self._worker.submit(self._serve_in_worker, ring,
                                   self._others_active(time.perf_counter()))
        try:
            return await asyncio.wrap_future(done)
        except Exception as e:  # noqa: BLE001 - as in _serve_queues: the daemon goes on
            self._queue_fault(0, e)
            return False
        finally:
            if not done.done():  # cancelled: wait for the stretch (OFFLOAD_NS at most)
                concurrent.futures.wait([done])
            self._offloaded = False
            waiter.resume()

    def _serve_in_worker(self, ring: tuple[int, int, object | None, int, int],
                         yield_cpu: bool) -> bool:
        """(The worker thread.) One compiled stretch: True when it ended with work left.
        ``yield_cpu``: between slices it gives its CPU to whoever waits for it, so that a
        daemon held to one CPU still serves the other device's request within a slice, not
        at the scheduler's next tick."""
        vq = self.transport.vqs[0]
        work = self._service_worker
        assert vq is not None and work is not None
        got = work(0, vq, time.monotonic_ns() + OFFLOAD_NS, SLICE_NS, H.HDR_WRITE_TRANSACTION,
                   yield_cpu, ring)
        if got is None:
            return False
        self.served, left, _owner = got
        if self.served:
            self.active_at = time.perf_counter()
        return left

    def stop(self) -> None:
        self._stopping = True
        if self._waiter is not None:
            self._waiter.kick()

    # -- control path ---------------------------------------------------------------------------
    def _control(self) -> bool:
        t = self.transport
        if t.idle():
            return False  # the common case on a wake-up: nothing for the control path
        for _ in range(64):  # a transaction per step; the driver waits for each
            res = t.step()
            if res.reset:
                self.generation += 1
                self.service.on_reset()
            if res.activated:
                self.service.on_activate(t.negotiated, self)
            if not res.transactions:
                break
        return True

    def _others_waiting(self) -> bool:
        """Another device of this daemon has work waiting: end this turn at the next sub-batch
        (deficit round robin by time, in effect: the device that used little lately, a lone
        request beside a flood, is served next instead of after a whole turn of the flood)."""
        peers = self._peers
        if len(peers) < 2:
            return False
        return any(p is not self and p._has_work() for p in peers)

    def _native_poll(self) -> Callable[[float], int] | None:
        """The compiled poll for this wait, where the service has one and it applies (one
        active queue, serving, its compiled queue made by a first turn): the waiter then spins
        and serves in C between event-loop passes instead of checking ``_has_work`` in Python,
        and a steady driver is served without a return to this task. None: the Python poll."""
        t = self.transport
        if self._service_poll is None or self._passive or not t.serving or len(t.vqs) != 1:
            return None
        vq = t.vqs[0]
        return None if vq is None or vq.accel is None else self._poll

    def _poll(self, burst_s: float) -> int:
        """One burst of the compiled poll: requests served, or -1 when this task must run (a
        transaction for the control path, a chain for the Python path, a broken ring)."""
        t = self.transport
        vq = t.vqs[0]
        if vq is None or not t.serving or self._service_poll is None:
            return -1
        burst = POLL_ALONE_NS if len(self._peers) < 2 else int(burst_s * 1e9)
        got = self._service_poll(0, vq, self, time.monotonic_ns() + burst,
                                 H.HDR_WRITE_TRANSACTION)
        if got is None:  # not for now (no compiled queue): one check, as the Python poll's
            return -1 if self._has_work() else 0
        served, notify, owner = got
        if served:
            self.active_at = time.perf_counter()
        if notify:
            t.notify_queue(0)
        return -1 if owner else served

    def _others_active(self, now: float) -> bool:
        peers = self._peers
        if len(peers) < 2:
            return False
        since = now - ACTIVE_S
        return any(p is not self and p.active_at > since for p in peers)

    def _has_work(self) -> bool:
        """Checked over and over while spinning: kept to a few loads."""
        t = self.transport
        if t.transaction_pending():
            return True
        if not t.serving:
            return False
        passive = self._passive
        for i, vq in enumerate(t.vqs):  # (a bad avail index counts as work: serve reports it)
            if vq is not None and vq.has_new() and i not in passive:
                return True
        return False

    def _on_interrupt(self) -> bool:
        """Serve the queues from the doorbell's fd callback while the task sleeps (block mode,
        or adaptive between poll windows): the completion leaves one task switch sooner.

        Returns True to wake the task: for the control path, a stop, a fault that stopped
        the queues, or work left after a turn (the task serves it in turns, yielding between
        them; the waiter itself wakes the task to poll when its window says so). A doorbell
        that brought nothing is reported to the waiter, which mutes a storm of them.
        """
        t = self.transport
        if self._stopping or self._offloaded or not t.idle() or not t.serving:
            return True
        for i in range(8):
            if self._serve_queues():
                return True
            if not t.serving or t.transaction_pending():
                return True
            if i == 0 and not self.served and self._waiter is not None:
                self._waiter.empty_interrupt()
            if not self._enable_notifications():  # kicks on again; False: nothing slipped in
                return False
        return True
