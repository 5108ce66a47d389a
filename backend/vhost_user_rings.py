"""The rings of one vhost-user session: their state, their eventfds, and the runner serving them.

A vhost-user front-end sets a ring up piece by piece (SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR); the
ring starts when its kick eventfd arrives and stops at GET_VRING_BASE. A started (and, with
protocol features, enabled) ring is a :class:`DeviceQueue` over the session's
:class:`GuestMemory`, and :class:`VhostTransport` lists it in ``vqs``, which is all the shared
:class:`QueueRunner` and the device services look at: they serve vhost-user exactly as they
serve ivshmem. Kicks are eventfd reads on the loop (a storm of them coalesces in the eventfd
counter: one read and at most one turn per loop pass), calls are eventfd writes decided by
``DeviceQueue.publish`` (event-idx, NO_INTERRUPT).
"""

from __future__ import annotations

import asyncio
import os
import struct
import time

import structlog

from ivshmem_virtio.errors import VhostUserError
from ivshmem_virtio.guestmem import GuestMemory
from ivshmem_virtio.log import RateLimiter
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.virtqueue.device import DeviceQueue

from .runner import QueueRunner, Service

log = structlog.get_logger("ivshmem_virtio.backend")

_EVENT = struct.Struct("=Q")
_ONE = _EVENT.pack(1)
DRAIN_ROUNDS = 64  # quiescing gives up after this many rounds of deferred work


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _signal(fd: int | None) -> None:
    """One eventfd write; never blocks the loop (the fd is non-blocking; a full one is fine)."""
    if fd is not None:
        try:
            os.write(fd, _ONE)
        except OSError:
            pass


class Vring:
    """What the front-end told us of one ring; ``vq`` while it is started."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: tuple[int, int, int] | None = None  # desc, avail, used (user addresses)
        self.base = 0  # the avail index to start from (SET_VRING_BASE / GET_VRING_BASE)
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        self.vq: DeviceQueue | None = None

    def close_fds(self) -> None:
        for fd in (self.kick, self.call, self.err):
            _close(fd)
        self.kick = self.call = self.err = None


class VhostTransport:
    """The runner's :class:`~ivshmem_virtio.backend.runner.QueueTransport` for vhost-user."""

    def __init__(self, name: str, num_queues: int) -> None:
        self.name = name
        self.rings = [Vring(i) for i in range(num_queues)]
        self.vqs: list[DeviceQueue | None] = [None] * num_queues
        self.features = 0  # acked (SET_FEATURES), without VHOST_USER_F_PROTOCOL_FEATURES
        self.gate_on_enable = False  # protocol features acked: rings start disabled
        self.config = b""
        self.faulted = False
        self._limiter = RateLimiter()
        self.metrics = {"ring_faults": 0, "calls": 0, "kicks": 0}

    @property
    def serving(self) -> bool:
        return any(vq is not None for vq in self.vqs)

    @property
    def negotiated(self) -> int:
        return self.features

    def transaction_pending(self) -> bool:
        return False  # the control path is the socket, served between turns by the loop

    def mark_needs_reset(self, reason: str) -> None:
        """A ring broke (bad ring state, memory outside every region): stop every ring (they
        stay stopped until the front-end sets them up again) and signal the error eventfds."""
        if self._limiter.allow(time.monotonic()):
            log.warning("vhost-user rings stopped", socket=self.name, reason=reason)
        self.metrics["ring_faults"] += 1
        self.faulted = True
        self.vqs = [None] * len(self.rings)
        for ring in self.rings:
            if ring.vq is not None:
                ring.base = ring.vq.last_avail
                ring.vq = None
                _signal(ring.err)

    def notify_queue(self, index: int) -> None:
        self.metrics["calls"] += 1
        _signal(self.rings[index].call)

    def update_config(self, config: bytes) -> None:
        """Kept for GET_CONFIG: there is no back-end channel (BACKEND_REQ) to announce it."""
        self.config = bytes(config)

    # -- ring life ------------------------------------------------------------------------------
    def start(self, ring: Vring, mem: GuestMemory | None) -> DeviceQueue:
        """A queue over ``mem`` from what the front-end set; the ring areas must each lie in one
        region (translated from user to guest-physical addresses), the geometry is checked by
        :class:`DeviceQueue`. The used index in memory is where we go on from."""
        if mem is None:
            raise VhostUserError(f"ring {ring.index} started before any memory table")
        if ring.addr is None or not ring.num:
            raise VhostUserError(f"ring {ring.index} started without its size and addresses")
        size = ring.num
        udesc, uavail, uused = ring.addr
        desc = mem.user_to_guest(udesc, R.desc_table_size(size))
        avail = mem.user_to_guest(uavail, R.avail_size(size))
        used = mem.user_to_guest(uused, R.used_size(size))
        vq = DeviceQueue(mem, size, desc, avail, used,
                         event_idx=bool(self.features & V.bit(V.F_EVENT_IDX)),
                         indirect=bool(self.features & V.bit(V.F_INDIRECT_DESC)))
        vq.last_avail = ring.base
        vq.next_used = vq.signalled_used = mem.u16(used + R.USED_IDX)
        return vq

    def restart(self, ring: Vring, mem: GuestMemory | None) -> None:
        """(Re)build ``ring``'s queue, keeping its indices; list it when it may be served."""
        old = ring.vq
        vq = self.start(ring, mem)
        if old is not None:
            vq.last_avail, vq.next_used, vq.signalled_used = (old.last_avail, old.next_used,
                                                              old.signalled_used)
        ring.vq = vq
        self.faulted = False
        self.relist(ring)

    def relist(self, ring: Vring) -> None:
        serve = ring.vq is not None and (ring.enabled or not self.gate_on_enable)
        # a ring that is not served is taken off the list: a stopped ring's queue (over a
        # memory table that may be gone by now) must never be served again
        self.vqs = [(ring.vq if serve else None) if i == ring.index else v
                    for i, v in enumerate(self.vqs)]

    def stop(self, ring: Vring) -> int:
        """GET_VRING_BASE: the ring stops; the avail index to resume from."""
        if ring.vq is not None:
            ring.base = ring.vq.last_avail
            ring.vq = None
        self.relist(ring)
        _close(ring.kick)
        ring.kick = None
        return ring.base


POLL_S = 50e-6
"""After a turn that served requests, the rings are watched this long with notifications still
off before they are asked for again: a front-end that answers within it (a QD1 caller) sends
its next request without a kick and it is taken without a wake-up. No traffic, no polling."""
POLL_MAX_SERVED = 2  # only after turns this small (a QD1 front-end's)


class VhostUserRunner(QueueRunner):
    """Serve the started rings of one session: a turn per kick, yielding between turns, and a
    short poll after a turn that had work (:data:`POLL_S`)."""

    transport: VhostTransport

    def __init__(self, service: Service, transport: VhostTransport, *, name: str,
                 batch: int | None = None, workers: int = 2) -> None:
        super().__init__(service, name=name, batch=batch, workers=workers)
        self.transport = transport
        self.transport.update_config(service.config())
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self._readers: dict[int, int] = {}  # ring index -> kick fd watched
        self._poll_until = 0.0  # perf_counter() until which an idle pass polls again

    def watch(self, index: int, fd: int) -> None:
        """Read ``fd`` (ring ``index``'s kick eventfd) on the loop; raises on an fd that cannot
        be polled (a regular file, a directory)."""
        self.unwatch(index)
        os.set_blocking(fd, False)
        try:
            self._loop.add_reader(fd, self._on_kick, fd)
        except (OSError, ValueError) as e:
            raise VhostUserError(f"ring {index}: kick fd cannot be polled: {e}") from e
        self._readers[index] = fd

    def unwatch(self, index: int) -> None:
        fd = self._readers.pop(index, None)
        if fd is not None:
            self._loop.remove_reader(fd)

    def _on_kick(self, fd: int) -> None:
        try:
            os.read(fd, 8)  # the counter, reset: kicks since the last read coalesce
        except OSError:
            pass
        self.transport.metrics["kicks"] += 1
        self.schedule()

    def schedule(self) -> None:
        """A turn over the queues at the loop's next pass (one, however many kicks came)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = False
        if not self.transport.serving:
            return
        if self._serve_queues():
            self.schedule()  # work left: the loop's other work goes first
            return
        now = time.perf_counter()
        if 0 < self.served <= POLL_MAX_SERVED:
            # a lone request (or two) came just now: its sender is likely to send the next
            # one as soon as it has the answer. A deep queue needs no polling (it kicks
            # rarely and its turns are full), and polling would take a CPU it uses
            self._poll_until = now + POLL_S
        if now < self._poll_until:
            # notifications stay off (the turn turned them off): look again at the loop's
            # next pass; the kick fds are still watched, so nothing is lost either way
            self.schedule()
            return
        if self._enable_notifications():  # asked for again; work that slipped in meanwhile
            self.schedule()

    async def quiesce(self) -> None:
        """Complete the slow requests in flight (and publish them) before the rings change."""
        for _ in range(DRAIN_ROUNDS):
            if not self._pending:
                return
            await self._drain_pending()

    async def close(self) -> None:
        for index in list(self._readers):
            self.unwatch(index)
        await self.quiesce()
        self._pool.shutdown(wait=True)
