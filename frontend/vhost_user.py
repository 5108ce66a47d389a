"""virtio over vhost-user, driver side: :class:`DriverTransport`'s API for :class:`VirtioDriver`.

The Python frontends (blk client, python-can interface, console) run unchanged on a vhost-user
back-end (QEMU's ``docs/interop/vhost-user.rst``), this process playing QEMU's part: it owns the
memory (:mod:`.vhost_user_conn`), negotiates locally against GET_FEATURES the way a guest
negotiates with QEMU, and hands the back-end everything at DRIVER_OK, in the order QEMU's
``vhost_dev_start`` does: SET_FEATURES, SET_MEM_TABLE, then per ring NUM, BASE, ADDR, CALL, KICK,
and SET_VRING_ENABLE. Status 0 stops the rings (SET_VRING_ENABLE 0 and GET_VRING_BASE, which
the spec makes the stop) and, where offered, RESET_DEVICE. vhost-user has no NEEDS_RESET; a
back-end that hangs up is a lost peer, and the driver reconnects and resubmits.

Links are named ``vhost-user:PATH`` wherever an ivshmem link name (``sim:``, ``uio:``) goes.
"""

from __future__ import annotations

import asyncio
import time

from ivshmem_virtio.errors import ConfigError, TransportError
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.spec import vhost_user as U
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.transport.allocator import ChunkAllocator
from ivshmem_virtio.virtqueue.driver import DriverQueue

from .vhost_user_conn import P, VhostUserLink

PREFIX = "vhost-user:"
MAX_QUEUE_SIZE = 1024  # QEMU's VIRTQUEUE_MAX_SIZE: what vhost-user back-ends are built for
RING_ALIGN = H.PAGE_SIZE  # the legacy used-ring alignment: any back-end takes it
_NOT_VIRTIO = V.bit(U.F_PROTOCOL_FEATURES) | V.bit(U.F_LOG_ALL)  # vhost-user bits, not device


def vhost_user_path(link: str) -> str | None:
    """The socket path of a ``vhost-user:PATH`` link name; None for any other link."""
    if not link.startswith(PREFIX):
        return None
    path = link[len(PREFIX):]
    if not path:
        raise ConfigError(f"{link!r}: expected vhost-user:SOCKET")
    return path


class VhostUserTransport:
    """The front-end's side of one vhost-user device, with :class:`DriverTransport`'s API."""

    def __init__(self, dev: VhostUserLink, *, timeout: float = 10.0) -> None:
        self.dev = dev
        self.hdr = dev.memory.region  # (the name the drivers know the shared memory by)
        self.timeout = timeout
        self.allocator: ChunkAllocator | None = None
        self.device_features = 0
        self.features = 0
        self.queues: list[DriverQueue | None] = []
        self.running = False  # the back-end has the rings (DRIVER_OK sent, no reset since)

    def backend_ready(self) -> bool:
        return self.dev.connected

    def needs_reset(self) -> bool:
        return False  # no such signal in vhost-user: a broken back-end hangs up

    async def probe(self, timeout: float | None = None) -> None:
        """(Re)connect, retrying until ``timeout`` (the back-end may be starting or restarting)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                self.dev.connect_once()
                break
            except TransportError as e:
                if time.monotonic() > deadline:
                    raise TransportError(f"{self.dev.name}: no back-end came up ({e})") from None
                await asyncio.sleep(0.05)
        self.running = False
        self.reset_allocator()

    def reset_allocator(self) -> None:
        """Forget every ring and buffer (page 0 stays unused: no descriptor at address 0)."""
        self.allocator = ChunkAllocator(self.hdr.size, H.PAGE_SIZE)
        self.queues = []

    async def negotiate(self, wanted: int) -> int:
        """Stop what runs, then choose the features against GET_FEATURES, as a guest does
        against QEMU; the back-end learns them at DRIVER_OK. Never ACCESS_PLATFORM: its ring
        addresses would be IOVAs behind an IOTLB this front-end does not keep."""
        if self.running:
            await self.set_status(0)
        offered = self.dev.features & ~_NOT_VIRTIO
        self.device_features = offered
        if not offered & V.bit(V.F_VERSION_1):
            raise TransportError(f"{self.dev.name}: device does not offer VERSION_1")
        features = (wanted | V.bit(V.F_VERSION_1) | V.bit(V.F_ORDER_PLATFORM)) & offered
        self.features = features & ~V.bit(V.F_ACCESS_PLATFORM)
        return self.features

    async def setup_queue(self, index: int, nqueues: int, size: int = 256) -> DriverQueue:
        """Allocate one contiguous vring (shrinking if memory is short); the back-end gets it
        at :meth:`driver_ok`."""
        assert self.allocator is not None
        if self.dev.queue_num is not None and nqueues > self.dev.queue_num:
            raise TransportError(f"{self.dev.name}: {nqueues} queues wanted, the back-end "
                                 f"has {self.dev.queue_num}")
        size = max(1, min(size, MAX_QUEUE_SIZE))
        size = 1 << (size.bit_length() - 1)
        while True:
            try:
                base = self.allocator.alloc(R.vring_size(size, RING_ALIGN))
                break
            except TransportError:
                if size <= 1:
                    raise
                size //= 2
        d, a, u = R.vring_layout(size, RING_ALIGN)
        alloc = self.allocator
        vq = DriverQueue(self.hdr, size, base + d, base + a, base + u,
                         event_idx=bool(self.features & V.bit(V.F_EVENT_IDX)),
                         indirect=bool(self.features & V.bit(V.F_INDIRECT_DESC)),
                         alloc=alloc.alloc, free=alloc.free)
        self.dev.ensure_queue_fds(index)
        while len(self.queues) <= index:
            self.queues.append(None)
        self.queues[index] = vq
        return vq

    async def driver_ok(self) -> None:
        """Hand the back-end the features, the memory and the rings, and start them."""
        dev, mem = self.dev, self.dev.memory
        protocol_bit = dev.features & V.bit(U.F_PROTOCOL_FEATURES)
        dev.request(U.Request.SET_FEATURES, U.encode_u64(self.features | protocol_bit))
        dev.request(U.Request.SET_MEM_TABLE, U.encode_mem_table(mem.table),
                    fds=[mem.fd] * len(mem.table))
        live = [(i, vq) for i, vq in enumerate(self.queues) if vq is not None]
        for i, vq in live:
            dev.vring(U.Request.SET_VRING_NUM, i, vq.size)
            dev.vring(U.Request.SET_VRING_BASE, i, 0)
            addr = U.VringAddr(i, 0, mem.user_addr(vq.desc, R.desc_table_size(vq.size)),
                               mem.user_addr(vq.used, R.used_size(vq.size)),
                               mem.user_addr(vq.avail, R.avail_size(vq.size)), 0)
            dev.request(U.Request.SET_VRING_ADDR, addr.pack())
            # the call fd before the kick fd, which starts the ring: no early completion can
            # find the back-end without a way to tell us
            dev.request(U.Request.SET_VRING_CALL, U.VringFd(i, False).pack(),
                        fds=[dev.call_fds[i]])
            dev.request(U.Request.SET_VRING_KICK, U.VringFd(i, False).pack(),
                        fds=[dev.kick_fds[i]])
        if protocol_bit:  # rings start disabled then
            for i, _vq in live:
                dev.vring(U.Request.SET_VRING_ENABLE, i, 1)
        self.running = True
        for i, _vq in live:  # buffers posted before DRIVER_OK (RX) are work now
            dev.kick(i)

    async def set_status(self, status: int) -> None:
        """Status 0 stops the rings and resets the device; other values are local (no STATUS
        protocol feature: vhost-user learns of DRIVER_OK by the ring set-up itself)."""
        if status != 0 or not self.dev.connected:
            return
        dev = self.dev
        if self.running:
            self.running = False
            live = [i for i, vq in enumerate(self.queues) if vq is not None]
            if dev.features & V.bit(U.F_PROTOCOL_FEATURES):
                for i in live:
                    dev.vring(U.Request.SET_VRING_ENABLE, i, 0)
            for i in live:
                dev.vring(U.Request.GET_VRING_BASE, i, 0)  # the stop: the back-end lets go
        if dev.has(P.RESET_DEVICE):
            dev.request(U.Request.RESET_DEVICE)

    def status(self) -> int:
        return V.STATUS_LIVE if self.running else 0

    def kick(self, index: int) -> None:
        self.dev.kick(index)

    def take_events(self) -> tuple[bool, bool]:
        """(config_event, queue_event): config changes come as CONFIG_CHANGE_MSG on the
        back-end channel; queue events are the call eventfds themselves."""
        cfg = self.dev.config_events > 0
        self.dev.config_events = 0
        return cfg, False

    def read_config(self, off: int, length: int) -> bytes:
        return self.dev.get_config(off, length)

    async def write(self, off: int, size: int, value: int) -> None:
        """A register write: only config-space fields exist here (SET_CONFIG)."""
        if off < H.HDR_CONFIG:
            raise TransportError(f"{self.dev.name}: no transport register {off:#x} in "
                                 "vhost-user")
        data = value.to_bytes(size, "little")
        self.dev.request(U.Request.SET_CONFIG,
                         U.ConfigMsg(off - H.HDR_CONFIG, size, U.CONFIG_FLAG_WRITABLE,
                                     data).pack())

    def leave(self) -> None:
        """Hang up: the back-end stops the device and waits for a front-end again."""
        self.running = False
        self.dev.disconnect()
