"""A virtio driver over ivshmem in Python: bring-up, interrupts, and surviving the backend.

Where Linux would break the device when the backend leaves, this driver waits for the backend to
come back READY, brings the device up again and lets the device class resubmit what was in
flight: a user of a remote disk expects a backend restart to look like a slow request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import sys
import time
from typing import Any, TypeVar

import structlog

from ivshmem_virtio.errors import (
    ConfigError,
    IvshmemVirtioError,
    LinkError,
    PeerGone,
    RingError,
    TransportError,
)
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.link import SPIN_CAP_US, IrqWaiter, PollWindow, open_link, parse_link
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.transport.driver import DriverTransport
from ivshmem_virtio.virtqueue.driver import DriverQueue

from .vhost_user import VhostUserTransport, vhost_user_path
from .vhost_user_conn import VhostUserLink

log = structlog.get_logger("ivshmem_virtio.frontend")
FIRST_SPIN_S = 20e-6  # an inline spin's first part, not judged by CPU time (see reap_inline)

#: a driver's device: an ivshmem link, or a vhost-user back-end's socket (frontend/vhost_user.py)
Device = IvshmemDevice | VhostUserLink


class VirtioDriver:
    """Base class of the Python frontends: subclasses fill in the device specifics."""

    device_id = 0
    num_queues = 1

    def __init__(self, dev: Device, *, features: int = 0, queue_size: int = 256,
                 mode: str = "block", spin_us: float = SPIN_CAP_US, timeout: float = 10.0,
                 reconnect: bool = True) -> None:
        self.dev = dev
        self.transport: DriverTransport | VhostUserTransport = (
            VhostUserTransport(dev, timeout=timeout) if isinstance(dev, VhostUserLink)
            else DriverTransport(dev, timeout=timeout))
        self.wanted_features = features
        self.queue_size = queue_size
        self.mode = mode
        self.spin_us = spin_us
        self.timeout = timeout
        self.reconnect = reconnect
        #: the queues; a device class may put a compiled twin in a queue's place
        #: (``DriverQueue.compiled``), which has the same interface
        self.vqs: list[DriverQueue] = []
        self.connected = asyncio.Event()
        self.closed = False
        self.bring_ups = 0
        self._irq_task: asyncio.Task | None = None
        self._waiter: IrqWaiter | None = None
        self._ring_fault: str | None = None  # found by an inline reap, recovered by _irq_loop
        self.inline_reaps = 0  # completions taken by reap_inline (the rest: interrupt task)
        # how long a lone caller polls for its completion (adaptive: learnt, as IrqWaiter's)
        self.inline_window = PollWindow(spin_us)
        if mode == "poll":
            self.inline_window.window = spin_us / 1e6
        self._lone_t0 = 0.0  # a lone request left to interrupts: when it was submitted
        self.error: BaseException | None = None

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self, timeout: float | None = None) -> None:
        """Bring the device up (waiting up to ``timeout`` for a READY backend).

        A backend that leaves READY during the bring-up is waited for again, within the same
        ``timeout``: a backend still READY from the previous frontend's session (it has not yet
        seen that one leave) looks ready, then resets when it does."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            try:
                await self._bring_up(max(0.0, deadline - time.monotonic()))
                break
            except PeerGone as e:
                if self.closed or time.monotonic() >= deadline:
                    raise
                log.info("backend reset during bring-up, again", link=self.dev.name,
                         error=str(e))
                await asyncio.sleep(0.01)
        self._waiter = IrqWaiter(self.dev, mode=self.mode, spin_us=self.spin_us,
                                 expecting=self._expecting)
        self._waiter.handler = self._on_interrupt
        self._irq_task = asyncio.create_task(self._irq_loop())

    async def _bring_up(self, timeout: float | None = None) -> None:
        await self.transport.probe(timeout)
        await self._configure()

    async def _configure(self) -> None:
        t = self.transport
        self.features = await t.negotiate(self.wanted_features)
        self.vqs = [await t.setup_queue(i, self.num_queues, self.queue_size)
                    for i in range(self.num_queues)]
        self.on_queues_ready()
        await t.driver_ok()
        self.bring_ups += 1
        self.connected.set()
        log.info("device up", link=self.dev.name, device_id=self.device_id,
                 features=hex(self.features), queue_sizes=[vq.size for vq in self.vqs])

    async def reset_device(self, queue_size: int | None = None) -> None:
        """A virtio reset (status 0) and a fresh bring-up on the same link, new ring offsets.

        Requests in flight survive: they are resubmitted on the new rings.
        """
        self.connected.clear()
        inflight = [tok for vq in self.vqs for tok in vq.in_flight()]
        self.vqs = []
        await self.transport.set_status(0)
        self.transport.reset_allocator()
        if queue_size is not None:
            self.queue_size = queue_size
        await self._configure()
        self.resubmit(inflight)

    async def close(self) -> None:
        """Reset the device and leave the link (Linux's remove)."""
        self.closed = True
        if self._irq_task is not None:
            self._irq_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._irq_task
        if self._waiter is not None:
            self._waiter.close()
        if self.connected.is_set() and self.transport.backend_ready():
            with contextlib.suppress(IvshmemVirtioError):
                await asyncio.wait_for(self.transport.set_status(0), 1.0)
        self.transport.leave()
        self.fail_all(ConnectionError("device closed"))

    # -- interrupts -----------------------------------------------------------------------------
    def _expecting(self) -> bool:
        """Can a completion arrive at all? (Nothing in flight: nothing to poll for.)"""
        return any(vq.num_free < vq.size for vq in self.vqs)

    def _has_used(self) -> bool:
        return self._ring_fault is not None or any(vq.has_used() for vq in self.vqs)

    def _backend_trouble(self) -> str | None:
        """Why the completions cannot be trusted to the data path now (the interrupt task
        recovers the device), or None."""
        t = self.transport
        if not t.backend_ready():
            return "backend left"
        return "needs reset" if t.needs_reset() else None

    def _complete(self, index: int, vq: DriverQueue) -> int:
        """Hand queue ``index``'s completed chains on (:meth:`take_used`); how many there were.
        A device that lies about them raises RingError (nothing is handed on then)."""
        if self._lone_t0:  # a lone request that waited for its interrupt: teach the window
            now = time.perf_counter()
            self.inline_window.record(now - self._lone_t0, False, now)
            self._lone_t0 = 0.0
        return self.take_used(index, vq)

    def take_used(self, index: int, vq: DriverQueue) -> int:
        """Collect the completed chains and hand each to :meth:`on_used` (a device class with a
        compiled completion path of its own overrides this)."""
        n = 0
        for token, length in vq.get_used():
            self.on_used(index, token, length)
            n += 1
        return n

    def inline_ok(self) -> bool:
        """May a lone request be waited for in place (see :meth:`reap_inline`) right now?"""
        return self.inline_window.window > 0 and bool(self.vqs) and self._ring_fault is None

    def lone_waiting(self) -> None:
        """A lone request goes to the interrupt path (no inline window yet): its completion
        time teaches the inline window, as a wake-up teaches a waiter's (adaptive mode)."""
        if self.mode == "adaptive":
            self._lone_t0 = time.perf_counter()

    def quiet(self, index: int) -> None:
        """Before adding a request that :meth:`reap_inline` will wait for: no interrupt for it
        (the backend skips the doorbell, we skip a wake-up). It stays off over consecutive
        inline requests, costing nothing per request, until :meth:`loud` turns it back on."""
        vq = self.vqs[index]
        if vq.interrupts_on:
            vq.suppress_interrupts(True)

    def loud(self, index: int) -> None:
        """Before adding a request the interrupt task will reap: interrupts on."""
        vq = self.vqs[index] if index < len(self.vqs) else None
        if vq is not None and not vq.interrupts_on:
            vq.suppress_interrupts(False)

    def reap_inline(self, index: int) -> None:
        """Spin for queue ``index``'s completions right here, in the submitting task.

        The latency path of a lone request (QD1): waiting in the caller, not in the interrupt
        task, saves two task switches and an event-loop pass per request. The caller checked
        :meth:`inline_ok` and called :meth:`quiet` before adding its request, and must be the
        only request in flight (we block the loop, which has nothing else of ours to do).
        Bounded by the inline :class:`PollWindow` (poll mode: ``spin_us``); past it interrupts
        go back on and the interrupt task takes over, without polling again. A ring fault found
        here is left to the interrupt task, which recovers the device.
        """
        vq = self.vqs[index]
        policy = self.inline_window
        if self.mode != "adaptive":  # poll mode's window is fixed: nothing to judge
            got = vq.wait_used(policy.window)
        else:
            clock = time.perf_counter
            t0 = clock()
            # the first FIRST_SPIN_S without this thread's CPU time (a system call, ~0.5 us):
            # most completions come in it; a longer spin is judged from its CPU time after that
            window = policy.window
            got = vq.wait_used(min(window, FIRST_SPIN_S))
            now = clock()
            if not got and window > FIRST_SPIN_S:
                cpu0, t1 = time.thread_time(), now
                got = vq.wait_used(window - (now - t0))
                now = clock()
            if got:
                policy.record(now - t0, True, now)
            else:
                if window > FIRST_SPIN_S:
                    policy.judge(now - t1, time.thread_time() - cpu0, now)
                self._lone_t0 = t0  # its completion time teaches the window
        # (completions found are taken even if the backend has just left or wants a reset:
        # they are real, and checked like any others; the interrupt task, woken by the
        # backend's state change, recovers the device for what is still in flight)
        if not got:
            self.loud(index)  # the interrupt task relies on it from here on
            if self._waiter is not None:
                # it re-checks everything (used entries, backend state), without polling: we
                # spent the window already
                self._waiter.kick(poll=False)
            return
        try:
            self.inline_reaps += self._complete(index, vq)
        except RingError as e:
            self._ring_fault = str(e)
            self.loud(index)
            if self._waiter is not None:
                self._waiter.kick()

    def _on_interrupt(self) -> bool:
        """Take completions straight in the interrupt fd's callback while the interrupt task
        sleeps: the waiting caller resumes one task switch sooner.

        Returns True to wake the task instead: the backend left or wants a reset, a ring
        fault, or completions that keep coming (the waiter itself wakes the task to poll for
        the next ones when its window says so).
        """
        if self.closed or not self.vqs or self._ring_fault is not None \
                or self._backend_trouble() is not None:
            return True
        cfg, _qev = self.transport.take_events()
        if cfg:
            self.on_config_change()
        try:
            for index, vq in enumerate(self.vqs):
                for _ in range(8):  # get_used re-arms the interrupt; then re-check
                    if not vq.has_used():
                        break
                    self._complete(index, vq)
                else:
                    return True
        except RingError as e:
            self._ring_fault = str(e)
            return True
        return False

    async def _irq_loop(self) -> None:
        assert self._waiter is not None
        t = self.transport
        while not self.closed:
            await self._waiter.wait(self._has_used)
            trouble = self._backend_trouble()
            if trouble is not None:
                await self._recover(trouble)
                continue
            cfg, _qev = t.take_events()
            if cfg:
                self.on_config_change()
            if self._ring_fault is not None:
                fault, self._ring_fault = self._ring_fault, None
                log.warning("backend broke a ring", link=self.dev.name, error=fault)
                await self._recover(fault)
                continue
            try:
                for index, vq in enumerate(self.vqs):
                    if vq.has_used():
                        self._complete(index, vq)
            except RingError as e:
                log.warning("backend broke a ring", link=self.dev.name, error=str(e))
                await self._recover(str(e))

    async def _recover(self, reason: str) -> None:
        self.connected.clear()
        inflight = [tok for vq in self.vqs for tok in vq.in_flight()]
        self.vqs = []
        log.warning("device lost", link=self.dev.name, reason=reason, in_flight=len(inflight))
        if not self.reconnect:
            self.fail_all(ConnectionError(f"backend lost: {reason}"), inflight)
            self.closed = True
            return
        while not self.closed:
            try:
                await self._bring_up(timeout=self.timeout)
                break
            except TransportError as e:
                log.info("waiting for the backend", link=self.dev.name, error=str(e))
                await asyncio.sleep(0.05)
        assert self._waiter is not None
        self._waiter.refresh()
        self.resubmit(inflight)

    # -- hooks ------------------------------------------------------------------------------------
    def on_queues_ready(self) -> None:
        """Queues exist, DRIVER_OK not yet set (post receive buffers here)."""

    def on_used(self, index: int, token: object, length: int) -> None:
        raise NotImplementedError

    def on_config_change(self) -> None:
        """The device config changed (or NEEDS_RESET, handled before this)."""

    def resubmit(self, tokens: list[object]) -> None:
        """Requests that were in flight when the backend went away."""
        self.fail_all(ConnectionError("backend restarted"), tokens)

    def fail_all(self, exc: BaseException, tokens: list[object] | None = None) -> None:
        """Fail outstanding requests (all of them when ``tokens`` is None)."""


D = TypeVar("D", bound=VirtioDriver)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


async def connect_driver(cls: type[D], link: str, timeout: float, **kw: Any) -> D:  # noqa: ANN401
    """Open ``link`` as the frontend of ``cls``'s device and bring it up, for a command line:
    says once on stderr that it waits for the backend, and turns a bad link or no READY
    backend within ``timeout`` into one-line :class:`ConfigError`s. ``vhost-user:SOCKET``
    connects to a vhost-user back-end instead."""
    dev: Device
    option = f"--link {link}"
    if (path := vhost_user_path(link)) is not None:
        option = f"--vhost-user {path}"
        dev = VhostUserLink(path, timeout=timeout)
    else:
        parse_link(link)
        try:
            dev = open_link(link, backend=False, protocol=H.frontend_protocol(cls.device_id))
        except LinkError as e:
            raise ConfigError(f"--link {link}: {e}") from e
    drv = cls(dev, timeout=timeout, **kw)
    # a vhost-user back-end is there when its socket is (we connect only in start())
    ready = drv.transport.backend_ready() if path is None else _is_socket(path)
    if not ready:  # say once why we sit there
        print(f"ivshmem-virtio: waiting for the backend on {link} (up to {timeout:g} s)",
              file=sys.stderr, flush=True)
    try:
        await drv.start(timeout=timeout)
    except BaseException as e:
        drv.transport.leave()
        dev.close()
        if isinstance(e, TransportError) and not drv.transport.backend_ready():
            raise ConfigError(f"{option}: no backend became READY within "
                              f"{timeout:g} s") from None
        raise
    return drv
