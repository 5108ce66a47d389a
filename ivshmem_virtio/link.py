"""Opening a link from its command-line name, and waiting for its interrupts under asyncio.

``sim:SOCKET`` joins a sim hub; ``uio:/dev/uioN`` opens a uio_ivshmem device; ``uio:auto`` picks
the one uio_ivshmem device whose protocol matches the role and device (pyudev discovery).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import structlog

from . import shm
from .errors import ConfigError
from .ivshmem.base import IvshmemDevice

log = structlog.get_logger("ivshmem_virtio.link")


def parse_link(spec: str) -> tuple[str, str]:
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("sim", "uio") or not arg:
        raise ConfigError(f"--link {spec!r}: expected sim:SOCKET, uio:/dev/uioN or uio:auto")
    return kind, arg


def open_link(spec: str, *, backend: bool, protocol: int | None = None,
              timeout: float = 5.0) -> IvshmemDevice:
    """Open the link named ``spec`` in the backend (ID 0) or frontend (ID 1) role."""
    kind, arg = parse_link(spec)
    if not shm.BARRIERS_EXACT:  # no way to order the ring accesses: refuse rather than race
        raise ConfigError(f"--link {spec}: {shm.BARRIER_HELP}")
    if kind == "sim":
        from .ivshmem.sim import SimIvshmem

        return SimIvshmem(arg, requested_id=0 if backend else 1, timeout=timeout)
    from .ivshmem.uio import UioIvshmem, find_uio

    path = find_uio(protocol) if arg == "auto" else arg
    return UioIvshmem(path)


_NCPU = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_PSI = "/proc/pressure/cpu"
STALL_LIMIT = 0.05  # spin while tasks waited for a CPU less than 5 % of the last window


class SpinGate:
    """Decides whether spinning pays: only while no task on the machine waits for a CPU.

    A spinning waiter on an oversubscribed machine takes the CPU the peer needs to answer it:
    three spinning processes on two cores measured slower than all of them blocking. The
    kernel's CPU pressure (PSI, ``/proc/pressure/cpu``: microseconds some task was runnable but
    not running) over the last window measures exactly that. An instantaneous run-queue sample
    (``/proc/loadavg``) is the fallback for kernels without PSI; it is noisy (any kworker waking
    counts), so it turned spinning off most of the time on a 2-core VM with two spinners.
    """

    def __init__(self, period: float = 0.02, psi_path: str = _PSI) -> None:
        self.period = period
        self.psi_path = psi_path
        self.at = -1.0
        self.stall_us: int | None = None
        self.spin_ok = True

    def _stall_total(self) -> int | None:
        try:
            with open(self.psi_path, "rb") as f:
                some = f.readline().split()
            return int(some[4].split(b"=")[1])
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self, now: float) -> bool:
        if now - self.at < self.period:
            return self.spin_ok
        elapsed, self.at = now - self.at, now
        total = self._stall_total() if self.psi_path else None
        if total is None:
            self.psi_path = ""
            self.spin_ok = _runnable() <= _NCPU
        elif self.stall_us is not None and elapsed > 0:
            self.spin_ok = (total - self.stall_us) / 1e6 / elapsed < STALL_LIMIT
        self.stall_us = total
        return self.spin_ok


def _runnable() -> int:
    try:
        with open("/proc/loadavg", "rb") as f:
            return int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return 0


spinning_pays = SpinGate()


class IrqWaiter:
    """Turns a device's interrupt fds into an awaitable, with optional bounded spinning.

    ``mode`` is ``block`` (sleep in the event loop until an fd is readable), ``poll`` (never
    sleep: re-check ``has_work`` continuously, yielding to the loop) or ``adaptive`` (spin for
    ``spin_us`` after activity, then block; no spinning while tasks wait for a CPU, see
    :class:`SpinGate`). While spinning, ``has_work`` is checked in bursts of ``burst_us``
    between event-loop passes (a pass costs more than a check: with no burst, work that arrives
    waits for the rest of one; a burst delays the loop's other tasks by at most that long).
    Interrupts are level-like here: an eventfd keeps its
    count until read, so nothing that arrives between a check and the wait is lost.
    """

    def __init__(self, dev: IvshmemDevice, *, mode: str = "adaptive",
                 spin_us: float = 50.0, burst_us: float = 0.0) -> None:
        if mode not in ("block", "poll", "adaptive"):
            raise ConfigError(f"notification mode {mode!r}: expected block, poll or adaptive")
        self.dev = dev
        self.mode = mode
        self.spin = spin_us / 1e6
        self.burst = burst_us / 1e6
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._fds: list[int] = []
        self.wakeups = 0
        # the owner's data path, run from the fd callback while the waiter sleeps (see _fire)
        self.handler: Callable[[], bool] | None = None
        self.handled = 0  # interrupts the handler took without waking the waiter
        self._sleeping = False
        self.refresh()

    def refresh(self) -> None:
        """(Re-)register the device's fds: they change when the hub connection ends."""
        self.close()
        self._fds = list(self.dev.interrupt_fds())
        for fd in self._fds:
            self._loop.add_reader(fd, self._fire, fd)

    def _fire(self, fd: int) -> None:
        """An fd became readable: consume just that interrupt and remember the wake-up.

        Consuming it here, not later, matters: a readable fd that nobody reads (a hub socket at
        EOF, an eventfd while the owner is busy reconnecting) would spin the event loop.
        """
        self.dev.ack_fd(fd)
        if self.dev.interrupt_fds() != self._fds:
            self.refresh()
        if self._sleeping and self.handler is not None:
            # interrupt context, as in a kernel driver: the work the interrupt announces is
            # done right here, one task switch sooner than by waking the waiting task (which
            # is parked at its await, so no state is half-updated). The handler returns True
            # for what it leaves to the task (control path, faults, spinning for more).
            try:
                if not self.handler():
                    self.handled += 1
                    return
            except Exception:  # noqa: BLE001 - a bug there must not cost the interrupt
                log.warning("interrupt handler failed: the task takes every interrupt from "
                            "now on", link=self.dev.name, exc_info=True)
                self.handler = None
        self._event.set()

    def kick(self) -> None:
        """Wake the waiter from inside the process (new work submitted, shutdown)."""
        self._event.set()

    async def wait(self, has_work: Callable[[], bool], timeout: float | None = None,
                   prepare_block: Callable[[], bool] | None = None) -> None:
        """Return when an interrupt arrived or ``has_work()`` became true.

        ``prepare_block`` runs once before sleeping (re-enable the peer's notifications, which
        are left off while we spin) and returns True if work showed up meanwhile.
        """
        if self.mode == "poll" or (self.mode == "adaptive"
                                   and spinning_pays(time.monotonic())):
            deadline = None if self.mode == "poll" else time.perf_counter() + self.spin
            clock, burst_s = time.perf_counter, self.burst
            while not self._event.is_set():
                burst_end = clock() + burst_s
                while True:  # a burst of checks between event-loop passes
                    if has_work():
                        return
                    now = clock()
                    if now >= burst_end:
                        break
                if deadline is not None and now > deadline:
                    break
                await asyncio.sleep(0)
        if prepare_block is not None and not self._event.is_set() and prepare_block():
            return
        # re-check before sleeping: with EVENT_IDX a peer may have published work before it saw
        # our new used_event/avail_event and decided no interrupt was needed
        if not self._event.is_set() and not has_work():
            self._sleeping = True
            try:
                if timeout is None:
                    await self._event.wait()
                else:
                    await asyncio.wait_for(self._event.wait(), timeout)
            except TimeoutError:
                pass
            finally:
                self._sleeping = False
        self._event.clear()
        self.wakeups += 1

    def close(self) -> None:
        for fd in self._fds:
            try:
                self._loop.remove_reader(fd)
            except (ValueError, OSError):
                pass
        self._fds = []
