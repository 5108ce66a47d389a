"""Driver (frontend) role of virtio over ivshmem, as Linux's ``virtio_ivshmem`` does it (§3.3-3.7).

Used by the Python frontends (blk client, python-can interface), the tests and the benchmarks.
Every header write is a transaction: wait for ``write_transaction == 0``, store the field, store
its offset into ``write_transaction`` and ring the backend on vector 0. The backend is untrusted:
every wait has a deadline and gives up when the backend leaves READY.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from ..errors import PeerGone, TransportError
from ..ivshmem.base import IvshmemDevice
from ..shm import fence
from ..spec import ivshmem as H
from ..spec import ring as R
from ..spec import virtio as V
from ..virtqueue.driver import DriverQueue
from .allocator import ChunkAllocator

log = structlog.get_logger("ivshmem_virtio.frontend")

_SIZES = {1: "u8", 2: "u16", 4: "u32", 8: "u64"}


class DriverTransport:
    """The frontend's side of one link's header."""

    def __init__(self, dev: IvshmemDevice, *, timeout: float = 10.0) -> None:
        self.dev = dev
        self.hdr = dev.rw
        self.peer = dev.peer_id
        self.timeout = timeout
        self.allocator: ChunkAllocator | None = None
        self.header_size = 0
        self.device_features = 0
        self.features = 0
        self.queues: list[DriverQueue | None] = []
        self.wake: asyncio.Event | None = None  # set by the owner's interrupt handler

    # -- waiting --------------------------------------------------------------------------------
    def backend_ready(self) -> bool:
        return self.dev.peer_state(self.peer) == H.STATE_READY

    async def _pause(self, spins: int) -> None:
        if spins < 64:
            await asyncio.sleep(0)
        else:
            await asyncio.sleep(0.0002 if spins < 2000 else 0.002)

    async def wait_backend_ready(self, timeout: float | None = None) -> None:
        """Block until the backend's STATE is READY (Linux would fail the probe instead)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        spins = 0
        while not self.backend_ready():
            if time.monotonic() > deadline:
                raise TransportError(f"{self.dev.name}: no backend became READY")
            self.dev.ack_interrupts()
            await self._pause(spins)
            spins += 1

    async def _wait_backend_not_ready(self, timeout: float | None) -> None:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        spins = 0
        while self.backend_ready():
            if time.monotonic() > deadline:
                raise TransportError(f"{self.dev.name}: backend does not notice our reset")
            await self._pause(spins)
            spins += 1

    # -- probe / bring-up -------------------------------------------------------------------------
    async def probe(self, timeout: float | None = None) -> None:
        """Linux ``virtio_ivshmem_probe``: check the link, wait for READY, build the allocator."""
        dev = self.dev
        if dev.id > 1 or dev.max_peers != 2:
            raise TransportError(f"{dev.name}: virtio needs a 2-peer link with ID 0 or 1 "
                                 f"(got ID {dev.id} of {dev.max_peers})")
        if self.hdr.size < 2 * H.PAGE_SIZE:
            raise TransportError(f"{dev.name}: R/W section smaller than two pages")
        dev.set_int_control(False)
        if dev.own_state != H.STATE_RESET and not self.backend_ready():
            # we were attached and the backend left: it waits for our RESET before it
            # re-initializes the header and comes back READY
            dev.set_state(H.STATE_RESET)
        # (a backend still READY is in our session: it stays so only while we are READY, and the
        # status-0 reset of negotiate() restarts the device. Dropping to RESET here instead
        # would make it go RESET -> READY within one step, a blip we could miss and wait out)
        await self.wait_backend_ready(timeout)
        hdr = self.hdr
        if hdr.u32(H.HDR_REVISION) < 1:
            raise TransportError(f"{dev.name}: backend header revision 0")
        size = hdr.u32(H.HDR_SIZE)
        if not H.HDR_CONFIG <= size <= self.hdr.size // 2:
            raise TransportError(f"{dev.name}: backend header size {size} is impossible")
        self.header_size = size
        self.reset_allocator()
        dev.set_state(H.STATE_READY)

    def reset_allocator(self) -> None:
        """Forget every ring and buffer: after a device reset nothing of the old rings is live."""
        self.allocator = ChunkAllocator(self.hdr.size, self.header_size)
        self.queues = []

    async def write(self, off: int, size: int, value: int) -> None:
        """One register-write transaction (§3.3)."""
        await self._wait_idle()
        getattr(self.hdr, "set_" + _SIZES[size])(off, value)
        fence()
        self.hdr.set_u32(H.HDR_WRITE_TRANSACTION, off)
        fence()
        self.dev.doorbell(self.peer, 0)
        await self._wait_idle()

    async def _wait_idle(self) -> None:
        deadline = time.monotonic() + self.timeout
        spins = 0
        while self.hdr.u32(H.HDR_WRITE_TRANSACTION) != 0:
            if not self.backend_ready():
                raise PeerGone(f"{self.dev.name}: backend failed")
            if time.monotonic() > deadline:
                raise TransportError(f"{self.dev.name}: backend does not answer transactions")
            await self._pause(spins)
            spins += 1

    async def set_status(self, status: int) -> None:
        await self.write(H.HDR_DEVICE_STATUS, 4, status)

    def status(self) -> int:
        return self.hdr.u32(H.HDR_DEVICE_STATUS) & 0xFF

    async def read_device_features(self) -> int:
        await self.write(H.HDR_DEVICE_FEATURES_SEL, 4, 1)
        high = self.hdr.u32(H.HDR_DEVICE_FEATURES)
        await self.write(H.HDR_DEVICE_FEATURES_SEL, 4, 0)
        low = self.hdr.u32(H.HDR_DEVICE_FEATURES)
        return high << 32 | low

    async def negotiate(self, wanted: int) -> int:
        """Reset, ACK, DRIVER, features, FEATURES_OK (the virtio core's order, §3.5)."""
        await self.set_status(0)
        await self.set_status(V.STATUS_ACKNOWLEDGE)
        await self.set_status(V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER)
        self.device_features = await self.read_device_features()
        if not self.device_features & (1 << V.F_VERSION_1):
            raise TransportError(f"{self.dev.name}: device does not offer VERSION_1")
        features = (wanted | V.REQUIRED_FEATURES) & self.device_features
        if features & V.bit(V.F_ORDER_PLATFORM) == 0:
            features |= self.device_features & V.bit(V.F_ORDER_PLATFORM)
        await self.write(H.HDR_DRIVER_FEATURES_SEL, 4, 1)
        await self.write(H.HDR_DRIVER_FEATURES, 4, features >> 32)
        await self.write(H.HDR_DRIVER_FEATURES_SEL, 4, 0)
        await self.write(H.HDR_DRIVER_FEATURES, 4, features & 0xFFFFFFFF)
        ok = V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK
        await self.set_status(ok)
        if not self.status() & V.STATUS_FEATURES_OK:
            raise TransportError(f"{self.dev.name}: device refused features {features:#x}")
        self.features = features
        return features

    def driver_vector(self, index: int, nqueues: int) -> int:
        """Linux's choice: one vector per queue if there are enough, else shared vector 1 or 0."""
        vectors = self.dev.vectors
        if vectors >= 1 + nqueues:
            return index + 1
        return 1 if vectors >= 2 else 0

    async def setup_queue(self, index: int, nqueues: int, size: int = 256) -> DriverQueue:
        """Allocate one contiguous vring (shrinking if memory is short) and enable it."""
        assert self.allocator is not None
        hdr = self.hdr
        await self.write(H.HDR_QUEUE_SEL, 4, index)
        max_size = hdr.u16(H.HDR_QUEUE_SIZE)
        if max_size == 0:
            raise TransportError(f"{self.dev.name}: queue {index} does not exist")
        if hdr.u16(H.HDR_QUEUE_ENABLE):
            raise TransportError(f"{self.dev.name}: queue {index} is already enabled")
        size = min(size, max_size)
        size = 1 << (size.bit_length() - 1)
        while True:
            try:
                base = self.allocator.alloc(R.vring_size(size, H.VRING_ALIGN))
                break
            except TransportError:
                if size <= 1:
                    raise
                size //= 2
        d, a, u = R.vring_layout(size, H.VRING_ALIGN)
        alloc = self.allocator
        vq = DriverQueue(self.hdr, size, base + d, base + a, base + u,
                         event_idx=bool(self.features & V.bit(V.F_EVENT_IDX)),
                         indirect=bool(self.features & V.bit(V.F_INDIRECT_DESC)),
                         alloc=alloc.alloc, free=alloc.free)
        await self.write(H.HDR_QUEUE_SIZE, 2, size)
        await self.write(H.HDR_QUEUE_DRIVER_VECTOR, 2, self.driver_vector(index, nqueues))
        await self.write(H.HDR_QUEUE_DESC, 8, base + d)
        await self.write(H.HDR_QUEUE_DRIVER, 8, base + a)
        await self.write(H.HDR_QUEUE_DEVICE, 8, base + u)
        await self.write(H.HDR_QUEUE_ENABLE, 2, 1)
        if not hdr.u16(H.HDR_QUEUE_ENABLE) or self.status() & V.STATUS_NEEDS_RESET:
            raise TransportError(f"{self.dev.name}: device refused queue {index}")
        vq.device_vector = hdr.u16(H.HDR_QUEUE_DEVICE_VECTOR)  # type: ignore[attr-defined]
        while len(self.queues) <= index:
            self.queues.append(None)
        self.queues[index] = vq
        return vq

    async def driver_ok(self) -> None:
        self.dev.set_int_control(True)
        await self.set_status(V.STATUS_LIVE)

    async def disable_queue(self, index: int) -> None:
        """Tear one queue down with Linux's 32-bit store at queue_enable (§3.3 quirk)."""
        await self.write(H.HDR_QUEUE_SEL, 4, index)
        await self.write(H.HDR_QUEUE_ENABLE, 4, 0)

    def kick(self, index: int) -> None:
        vq = self.queues[index]
        self.dev.doorbell(self.peer, vq.device_vector)  # type: ignore[union-attr]

    def take_events(self) -> tuple[bool, bool]:
        """Read and clear (config_event, queue_event), as the interrupt handlers do."""
        hdr = self.hdr
        cfg = hdr.u8(H.HDR_CONFIG_EVENT)
        qev = hdr.u8(H.HDR_QUEUE_EVENT)
        if cfg:
            hdr.set_u8(H.HDR_CONFIG_EVENT, 0)
        if qev:
            hdr.set_u8(H.HDR_QUEUE_EVENT, 0)
        return bool(cfg), bool(qev)

    def needs_reset(self) -> bool:
        return bool(self.status() & V.STATUS_NEEDS_RESET)

    def read_config(self, off: int, length: int) -> bytes:
        """Device config with the generation protocol (odd = being updated)."""
        hdr = self.hdr
        for _ in range(10000):
            gen = hdr.u32(H.HDR_CONFIG_GENERATION)
            if gen & 1:
                continue
            data = hdr.read(H.HDR_CONFIG + off, length)
            fence()
            if hdr.u32(H.HDR_CONFIG_GENERATION) == gen:
                return data
        raise TransportError(f"{self.dev.name}: device config never settles")

    def leave(self) -> None:
        """Linux's remove: STATE = 0, INT_CONTROL = 0."""
        self.dev.set_state(H.STATE_RESET)
        self.dev.set_int_control(False)
