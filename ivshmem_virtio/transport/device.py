"""Device (backend) role of virtio over ivshmem: the header, transactions and the READY protocol.

Synchronous and loop-free: the runner calls :meth:`DeviceTransport.step` on every wake-up (or
poll) and gets back what changed. Everything the frontend wrote into the header is untrusted; a
request the device cannot honour marks the device NEEDS_RESET (virtio-ivshmem.md §8.2) and never
raises out of :meth:`step`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from ..errors import RingError
from ..ivshmem.base import IvshmemDevice
from ..log import RateLimiter
from ..shm import fence
from ..spec import ivshmem as H
from ..spec import virtio as V
from ..virtqueue.device import DeviceQueue

log = structlog.get_logger("ivshmem_virtio.transport")


class Phase(enum.Enum):
    WAIT_PEER_RESET = "wait-peer-reset"  # our STATE is 0, waiting for the peer to be 0 too
    WAIT_PEER_READY = "wait-peer-ready"  # our STATE is 1, the header is fresh
    ACTIVE = "active"  # both READY: transactions and queues are served


@dataclass
class QueueState:
    """The per-queue fields behind queue_sel (the header shows only the selected one)."""

    max_size: int
    device_vector: int
    size: int = 0
    driver_vector: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0
    enabled: bool = False

    def reset(self) -> None:
        self.size = self.max_size
        self.driver_vector = 0
        self.desc = self.driver = self.device = 0
        self.enabled = False


@dataclass
class StepResult:
    """What one :meth:`DeviceTransport.step` saw."""

    transactions: int = 0
    reset: bool = False  # the driver wrote status 0 (or the peer left)
    peer_lost: bool = False
    activated: bool = False  # DRIVER_OK just got set
    queues_changed: bool = False


class DeviceTransport:
    """The header of one link, seen from the device side."""

    def __init__(self, dev: IvshmemDevice, *, device_features: int, config: bytes,
                 num_queues: int, queue_max_size: int = 256) -> None:
        if queue_max_size & (queue_max_size - 1) or not 1 <= queue_max_size <= 32768:
            raise ValueError(f"queue size {queue_max_size} is not a power of two")
        self.dev = dev
        self.hdr = dev.rw
        self._write_tx = dev.rw.u32_array(H.HDR_WRITE_TRANSACTION, 1)  # polled on every spin
        self.config = bytes(config)
        self.header_size = H.header_size(len(self.config))
        if self.hdr.size < 2 * H.PAGE_SIZE:
            raise ValueError(f"R/W section of {self.hdr.size:#x} bytes: need at least two pages")
        self.features = device_features | V.TRANSPORT_FEATURES
        vectors = dev.vectors
        # INTx links (one vector) must use vector 0 for kicks: Jailhouse drops higher ones (§3.4)
        self.queues = [QueueState(queue_max_size, min(i + 1, vectors - 1))
                       for i in range(num_queues)]
        for q in self.queues:
            q.reset()
        self.vqs: list[DeviceQueue | None] = [None] * num_queues
        self.driver_features = 0
        self.needs_reset = False
        self.live = False  # DRIVER_OK seen and not reset since
        self.phase = Phase.WAIT_PEER_RESET
        self.peer = dev.peer_id
        self._limiter = RateLimiter()
        self.metrics = {"transactions": 0, "resets": 0, "needs_reset_count": 0,
                        "bring_ups": 0, "peer_losses": 0}
        #: Called for a write transaction into the device config with the offset inside the
        #: config and the config as the driver left it in the header; True means the device
        #: took the write (virtio-console's ``emerg_wr``). The config is read-only otherwise:
        #: a write nobody takes is logged (rate-limited) and, taken or not, the header shows
        #: the device's config again before the transaction is cleared.
        self.config_write: Callable[[int, bytes], bool] | None = None

    # -- bring-up -----------------------------------------------------------------------------
    def start(self) -> None:
        """Reference backend step 1-2: interrupts on, STATE = RESET, wait for the peer's reset."""
        self.dev.set_int_control(True)
        self.dev.set_state(H.STATE_RESET)
        self.phase = Phase.WAIT_PEER_RESET

    def stop(self) -> None:
        """Leave the link: STATE = 0 tells the frontend we are gone."""
        self._reset_device()
        self.dev.set_state(H.STATE_RESET)
        self.phase = Phase.WAIT_PEER_RESET

    def _init_header(self) -> None:
        hdr = self.hdr
        hdr.fill(0, self.header_size)
        hdr.set_u32(H.HDR_SIZE, self.header_size)
        hdr.write(H.HDR_CONFIG, self.config)
        hdr.set_u32(H.HDR_DEVICE_FEATURES, self.features & 0xFFFFFFFF)
        self._present_queue(0)
        fence()
        hdr.set_u32(H.HDR_REVISION, H.REVISION)

    def idle(self) -> bool:
        """True when :meth:`step` would find nothing to do: both READY, no transaction pending.

        A cheap check for every wake-up of the data path (step() builds a result each time).
        """
        return (self.phase is Phase.ACTIVE and not self.transaction_pending()
                and self.dev.peer_state(self.peer) == H.STATE_READY)

    def transaction_pending(self) -> bool:
        """The driver wrote a register and waits for us to take it (§8.7)."""
        return self._write_tx[0] != 0

    def step(self) -> StepResult:
        """Advance the READY protocol and apply a pending transaction. Never raises on peer data."""
        res = StepResult()
        peer_state = self.dev.peer_state(self.peer)
        if self.phase is Phase.ACTIVE and peer_state != H.STATE_READY:
            log.info("frontend left", link=self.dev.name, peer_state=peer_state)
            self.metrics["peer_losses"] += 1
            self._reset_device()
            res.peer_lost = res.reset = True
            self.dev.set_state(H.STATE_RESET)
            self.phase = Phase.WAIT_PEER_RESET
        if self.phase is Phase.WAIT_PEER_RESET and peer_state == H.STATE_RESET:
            self._reset_device()
            self._init_header()
            self.dev.set_state(H.STATE_READY)
            self.phase = Phase.WAIT_PEER_READY
            log.info("backend ready", link=self.dev.name)
        if self.phase is Phase.WAIT_PEER_READY and peer_state == H.STATE_READY:
            self.phase = Phase.ACTIVE
            self.metrics["bring_ups"] += 1
            log.info("frontend connected", link=self.dev.name)
        if self.phase is Phase.ACTIVE:
            self._transaction(res)
        return res

    # -- transactions -------------------------------------------------------------------------
    def _transaction(self, res: StepResult) -> None:
        hdr = self.hdr
        off = hdr.u32(H.HDR_WRITE_TRANSACTION)
        if off == 0:
            return
        try:
            self._apply(off, res)
        except RingError as e:
            self.mark_needs_reset(str(e))
        fence()  # responses before the clear
        hdr.set_u32(H.HDR_WRITE_TRANSACTION, 0)
        res.transactions += 1
        self.metrics["transactions"] += 1

    def _apply(self, off: int, res: StepResult) -> None:
        hdr = self.hdr
        sel = hdr.u32(H.HDR_QUEUE_SEL)
        q = self.queues[sel] if sel < len(self.queues) else None
        if off == H.HDR_DEVICE_FEATURES_SEL:
            fsel = hdr.u32(H.HDR_DEVICE_FEATURES_SEL)
            word = (self.features >> (32 * fsel)) & 0xFFFFFFFF if fsel < 2 else 0
            hdr.set_u32(H.HDR_DEVICE_FEATURES, word)
        elif off == H.HDR_DRIVER_FEATURES:
            fsel = hdr.u32(H.HDR_DRIVER_FEATURES_SEL)
            if fsel < 2:
                mask = 0xFFFFFFFF << (32 * fsel)
                value = hdr.u32(H.HDR_DRIVER_FEATURES) << (32 * fsel)
                self.driver_features = (self.driver_features & ~mask) | value
        elif off in (H.HDR_DRIVER_FEATURES_SEL,):
            pass
        elif off == H.HDR_QUEUE_SEL:
            self._present_queue(sel)
        elif off in (H.HDR_QUEUE_SIZE, H.HDR_QUEUE_DRIVER_VECTOR, H.HDR_QUEUE_DESC,
                     H.HDR_QUEUE_DRIVER, H.HDR_QUEUE_DEVICE):
            if q is None or q.enabled:
                self._note("queue field write ignored", off, sel)
                if q is not None:
                    self._present_queue(sel)
                return
            self._load_queue(q)
        elif off == H.HDR_QUEUE_ENABLE:
            self._queue_enable(sel, q, res)
        elif off == H.HDR_DEVICE_STATUS:
            self._status_write(res)
        elif H.HDR_CONFIG <= off < H.HDR_CONFIG + len(self.config):
            hook = self.config_write
            written = hdr.read(H.HDR_CONFIG, len(self.config))
            if hook is None or not hook(off - H.HDR_CONFIG, written):
                self._note("config write ignored (read-only config)", off, sel)
            hdr.write(H.HDR_CONFIG, self.config)
        else:
            self._note("unknown write_transaction offset", off, sel)

    def _present_queue(self, sel: int) -> None:
        hdr = self.hdr
        if sel >= len(self.queues):
            for field in (H.HDR_QUEUE_SIZE, H.HDR_QUEUE_DEVICE_VECTOR,
                          H.HDR_QUEUE_DRIVER_VECTOR, H.HDR_QUEUE_ENABLE):
                hdr.set_u16(field, 0)
            for field in (H.HDR_QUEUE_DESC, H.HDR_QUEUE_DRIVER, H.HDR_QUEUE_DEVICE):
                hdr.set_u64(field, 0)
            return
        q = self.queues[sel]
        hdr.set_u16(H.HDR_QUEUE_SIZE, q.size)
        hdr.set_u16(H.HDR_QUEUE_DEVICE_VECTOR, q.device_vector)
        hdr.set_u16(H.HDR_QUEUE_DRIVER_VECTOR, q.driver_vector)
        hdr.set_u16(H.HDR_QUEUE_ENABLE, int(q.enabled))
        hdr.set_u64(H.HDR_QUEUE_DESC, q.desc)
        hdr.set_u64(H.HDR_QUEUE_DRIVER, q.driver)
        hdr.set_u64(H.HDR_QUEUE_DEVICE, q.device)

    def _load_queue(self, q: QueueState) -> None:
        """Take the selected queue's fields the driver wrote into the header."""
        hdr = self.hdr
        q.size = hdr.u16(H.HDR_QUEUE_SIZE)
        q.driver_vector = hdr.u16(H.HDR_QUEUE_DRIVER_VECTOR)
        q.desc = hdr.u64(H.HDR_QUEUE_DESC)
        q.driver = hdr.u64(H.HDR_QUEUE_DRIVER)
        q.device = hdr.u64(H.HDR_QUEUE_DEVICE)

    def _queue_enable(self, sel: int, q: QueueState | None, res: StepResult) -> None:
        hdr = self.hdr
        value = hdr.u16(H.HDR_QUEUE_ENABLE)
        if q is None:
            self._note("queue_enable on a queue that does not exist", H.HDR_QUEUE_ENABLE, sel)
            hdr.set_u16(H.HDR_QUEUE_ENABLE, 0)
            return
        if value == 0:
            # Linux tears queues down with a 32-bit store at 0x26 that also zeroes the low half
            # of queue_desc (§3.3): the addresses are not needed any more, so that is harmless.
            q.enabled = False
            self.vqs[sel] = None
            res.queues_changed = True
            return
        if q.enabled:
            return
        self._load_queue(q)
        if q.size > q.max_size:
            hdr.set_u16(H.HDR_QUEUE_ENABLE, 0)
            raise RingError(f"queue {sel}: size {q.size} larger than offered {q.max_size}")
        try:
            vq = DeviceQueue(self.hdr, q.size, q.desc, q.driver, q.device,
                             event_idx=bool(self.driver_features & (1 << V.F_EVENT_IDX)),
                             indirect=bool(self.driver_features & (1 << V.F_INDIRECT_DESC)),
                             max_size=q.max_size)
        except RingError as e:
            hdr.set_u16(H.HDR_QUEUE_ENABLE, 0)
            raise RingError(f"queue {sel}: {e}") from None
        if min(q.desc, q.driver, q.device) < self.header_size:
            hdr.set_u16(H.HDR_QUEUE_ENABLE, 0)
            raise RingError(f"queue {sel}: rings overlap the transport header")
        q.enabled = True
        self.vqs[sel] = vq
        res.queues_changed = True
        log.debug("queue enabled", link=self.dev.name, queue=sel, size=q.size,
                  desc=hex(q.desc), avail=hex(q.driver), used=hex(q.device))

    def _status_write(self, res: StepResult) -> None:
        hdr = self.hdr
        status = hdr.u32(H.HDR_DEVICE_STATUS) & 0xFF
        if status == 0:
            self._reset_device()
            res.reset = True
            self.metrics["resets"] += 1
            log.info("device reset by driver", link=self.dev.name)
            return
        if status & V.STATUS_FEATURES_OK and not self._features_ok():
            status &= ~V.STATUS_FEATURES_OK
            log.warning("driver features refused", link=self.dev.name,
                        driver_features=hex(self.driver_features), offered=hex(self.features))
        if self.needs_reset:
            status |= V.STATUS_NEEDS_RESET
        hdr.set_u32(H.HDR_DEVICE_STATUS, status)
        live = bool(status & V.STATUS_DRIVER_OK) and bool(status & V.STATUS_FEATURES_OK)
        if live and not self.live and not self.needs_reset:
            res.activated = True
            log.info("driver ok", link=self.dev.name, features=hex(self.driver_features))
        self.live = live

    def _features_ok(self) -> bool:
        f = self.driver_features
        return not f & ~self.features and (f & V.REQUIRED_FEATURES) == V.REQUIRED_FEATURES

    def _reset_device(self) -> None:
        """virtio-ivshmem.md §8.1: everything but the device config is forgotten."""
        for q in self.queues:
            q.reset()
        self.vqs = [None] * len(self.queues)
        self.driver_features = 0
        self.needs_reset = False
        self.live = False
        if self.phase is Phase.ACTIVE:
            self._present_queue(self.hdr.u32(H.HDR_QUEUE_SEL))

    def _note(self, what: str, off: int, sel: int) -> None:
        if self._limiter.allow(time.monotonic()):
            log.warning(what, link=self.dev.name, offset=hex(off), queue_sel=sel)

    # -- services for the runner --------------------------------------------------------------
    @property
    def serving(self) -> bool:
        """Queues may be processed: driver live, device healthy."""
        return self.phase is Phase.ACTIVE and self.live and not self.needs_reset

    def mark_needs_reset(self, reason: str) -> None:
        """§8.2: stop the queues, set DEVICE_NEEDS_RESET and tell the driver."""
        if self._limiter.allow(time.monotonic()):
            log.warning("device needs reset", link=self.dev.name, reason=reason)
        self.metrics["needs_reset_count"] += 1
        self.needs_reset = True
        self.vqs = [None] * len(self.queues)
        for q in self.queues:
            q.enabled = False
        hdr = self.hdr
        hdr.set_u32(H.HDR_DEVICE_STATUS, hdr.u32(H.HDR_DEVICE_STATUS) | V.STATUS_NEEDS_RESET)
        self.notify_config()

    def notify_config(self) -> None:
        hdr = self.hdr
        hdr.set_u8(H.HDR_CONFIG_EVENT, 1)
        fence()
        self.dev.doorbell(self.peer, 0)

    def update_config(self, config: bytes) -> None:
        """Change the device config (odd generation while writing) and notify the driver."""
        hdr = self.hdr
        gen = hdr.u32(H.HDR_CONFIG_GENERATION)
        hdr.set_u32(H.HDR_CONFIG_GENERATION, (gen + 1) | 1)
        fence()
        self.config = bytes(config)
        hdr.write(H.HDR_CONFIG, self.config)
        fence()
        hdr.set_u32(H.HDR_CONFIG_GENERATION, ((gen + 1) | 1) + 1)
        if self.serving:
            self.notify_config()

    def notify_queue(self, index: int) -> None:
        """Used buffers are published: queue_event = 1, then the driver's vector (§3.4, §8.3)."""
        self.hdr.set_u8(H.HDR_QUEUE_EVENT, 1)
        fence()
        self.dev.doorbell(self.peer, self.queues[index].driver_vector)

    def native_notify(self, index: int) -> tuple[int, int, object | None, int, int] | None:
        """What :meth:`notify_queue` does, for compiled code to do itself: (queue_event's
        offset in the section, then the device's ``native_doorbell``), or None."""
        bell = self.dev.native_doorbell(self.peer, self.queues[index].driver_vector)
        return None if bell is None else (H.HDR_QUEUE_EVENT, *bell)

    @property
    def negotiated(self) -> int:
        return self.driver_features
