"""virtio-can devices on several links sharing one CAN controller: the glue between the runner,
the pure model (:mod:`ivshmem_virtio.backend.devices.can`) and the bus bridge.

One :class:`~ivshmem_virtio.backend.devices.can_backend.CanBackend` owns the switch and the bus
(``can_backend.py``: routing between the links and the bus, bus-off, error states); each link
gets a :class:`CanLinkService` (here: the runner's ``Service``, the link's rings). Everything
runs on the one event loop of the daemon:

* TX: a request is validated by the model; a frame that passes goes to the bridge (FIFO on the
  wire), which usually sends it before returning and otherwise queues it for its writer thread.
  Without LATE_TX_ACK it completes OK at once; with it, only when the bus accepted the frame.
  The other links receive it when the bus accepted it, as on a real wire, and never its sender
  (spec §8.7). Completions and deliveries are published once per batch (one used-index update
  and at most one notification per queue), not once per frame.
* RX: buffers the driver posts are taken off the ring and kept per link, filled in FIFO order as
  frames arrive. A link with no buffer drops the frame (counted): it never holds up the bus or
  the other links.
* Control: START/STOP in order; entering STOPPED fails the link's pending TX.
* Bus-off (a bus error): every link gets the status bit and a config-change event, stops, and
  its pending TX fail; frames still queued for the bus are not sent.

Requests that cannot be answered at all (no result byte, shorter than the header) raise
:class:`DeviceError`, which the runner turns into NEEDS_RESET for that link only.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Final

import structlog

from ivshmem_virtio.errors import DeviceError, MemoryAccessError, RingError
from ivshmem_virtio.log import RateLimiter
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.spec.can import CanFrame
from ivshmem_virtio.virtqueue.device import Chain, DeviceQueue

from .can import CanLinkModel, TxReject

if TYPE_CHECKING:
    from ..resources.canbus import TxTicket
    from ..runner import QueueRunner
    from .can_backend import CanBackend

log = structlog.get_logger("ivshmem_virtio.backend.can")

#: Readable bytes a TX request can carry that matter: the header and the largest payload.
TX_READ_LIMIT: Final = wire.FRAME_HEADER_SIZE + wire.CAN_FD_MAX_LEN
#: Ring features the device side implements for every device (the runner's DeviceQueue).
RING_FEATURES: Final = V.bit(V.F_EVENT_IDX) | V.bit(V.F_INDIRECT_DESC)


@dataclass(slots=True)
class CanServiceMetrics:
    """What the model cannot see: buffers, the bus's answers. Fixed names, monotonic."""

    rx_dropped_no_buffer: int = 0  # frames for a link that had no RX buffer posted (or no ring)
    rx_bad_buffers: int = 0  # RX chains handed back unused (readable part, outside the section)
    tx_bad_buffers: int = 0  # TX chains answered NOT_OK because a buffer was unreachable
    tx_bus_fails: int = 0  # frames the bus refused or that bus-off/STOP cancelled

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class _PendingTx:
    """A LATE_TX_ACK request waiting for the bus: where to answer, and on which ring."""

    head: int
    result_addr: int
    vq: DeviceQueue
    generation: int


def _gather(mem: Region, segments: list[tuple[int, int]], limit: int) -> bytes:
    """At most ``limit`` bytes from the readable descriptors (already bounds-checked).

    A copy: the driver cannot change what is validated after the check.
    """
    if len(segments) == 1:  # header and payload in one buffer, as every driver sends them
        addr, length = segments[0]
        return mem.read(addr, length if length < limit else limit)
    out = bytearray()
    for addr, length in segments:
        take = min(length, limit - len(out))
        if take <= 0:
            break
        out += mem.read(addr, take)
    return bytes(out)


def _scatter(mem: Region, segments: list[tuple[int, int]], data: bytes) -> None:
    if len(segments) == 1 and segments[0][1] >= len(data):  # one buffer that holds it all
        mem.write(segments[0][0], data)
        return
    pos = 0
    for addr, length in segments:
        if pos >= len(data):
            break
        piece = data[pos:pos + length]
        mem.write(addr, piece)
        pos += len(piece)


def _result_addr(chain: Chain, mem: Region) -> int:
    """Where the ``u8 result`` goes: the first writable descriptor, which must be reachable.

    Without it the request cannot be answered (spec §8.6): needs-reset.
    """
    if not chain.writable:
        raise DeviceError(f"request at descriptor {chain.head} has no writable result byte")
    addr, length = chain.writable[0]
    if length < wire.RESULT_SIZE or not mem.contains(addr, wire.RESULT_SIZE):
        raise DeviceError(f"request at descriptor {chain.head}: result byte {addr:#x}+{length} "
                          "is unusable")
    return addr


class CanLinkService:
    """The runner's Service for one virtio-can link of a :class:`CanBackend`."""

    device_id = wire.VIRTIO_ID_CAN
    num_queues = wire.NUM_QUEUES
    # RX buffers are taken from the ring when a frame needs one (a frame finding none is dropped,
    # as a full controller FIFO drops it): a driver posting buffers is no reason to wake us, so
    # the RX queue asks for no kicks. Saves a doorbell and a backend wake-up per received frame.
    passive_queues = frozenset({wire.RXQ})

    def __init__(self, backend: CanBackend, link_id: str, model: CanLinkModel) -> None:
        self.backend = backend
        self.link_id = link_id
        self.model = model
        self.metrics = CanServiceMetrics()
        self.runner: QueueRunner | None = None
        self._rx_vq: DeviceQueue | None = None
        self._rx_bufs: deque[Chain] = deque()
        self._rx_dirty = False
        self.pending: dict[TxTicket, _PendingTx] = {}
        self._limiter = RateLimiter()

    def bind(self, runner: QueueRunner) -> None:
        """The runner serving this link (bus deliveries and bus-off reach the link through it)."""
        self.runner = runner

    # -- Service protocol ---------------------------------------------------------------------
    @property
    def features(self) -> int:
        return self.model.device_features | RING_FEATURES

    def config(self) -> bytes:
        return self.model.config_bytes()

    def on_reset(self) -> None:
        self.model.reset()
        self._forget_rings()

    def on_activate(self, features: int, runner: QueueRunner) -> None:
        self.runner = runner
        if not self.model.set_features(features):
            # FEATURES_OK is the transport's; the rules of virtio-can (CLASSIC or FD, RTR needs
            # CLASSIC) can only be enforced here, so an impossible set marks the device broken.
            runner.transport.mark_needs_reset(
                f"virtio-can features {features & wire.DEVICE_FEATURE_MASK:#x} are not usable")
            runner.generation += 1

    def serve(self, index: int, vq: DeviceQueue, runner: QueueRunner) -> int:
        self.runner = runner
        if index == wire.TXQ:
            return self._serve_tx(vq, runner)
        if index == wire.RXQ:
            return self._take_rx_buffers(vq)
        if index == wire.CONTROLQ:
            return self._serve_control(vq, runner)
        return 0

    def close(self) -> None:
        self._forget_rings()
        self.backend.detach(self)

    # -- TX ---------------------------------------------------------------------------------------
    def _serve_tx(self, vq: DeviceQueue, runner: QueueRunner) -> int:
        """One batch of TX requests; the runner publishes the answers given here afterwards."""
        mem = vq.mem
        model = self.model
        backend = self.backend
        chains = vq.pop_all(runner.batch)
        try:
            for chain in chains:
                result_addr = _result_addr(chain, mem)
                if chain.error is not None:
                    self.metrics.tx_bad_buffers += 1
                    model.metrics.tx_fails += 1
                    self._note("TX request refused", chain.error)
                    self._answer(vq, chain.head, result_addr, wire.VIRTIO_CAN_RESULT_NOT_OK)
                    continue
                decision = model.handle_tx(_gather(mem, chain.readable, TX_READ_LIMIT))
                if isinstance(decision, TxReject):
                    self._answer(vq, chain.head, result_addr, decision.result)
                    continue
                outcome = backend.transmit(self, decision.frame)
                if outcome is True or not decision.late_ack:
                    if outcome is False:
                        self.metrics.tx_bus_fails += 1
                    result = wire.VIRTIO_CAN_RESULT_OK
                elif outcome is False:  # a bus error (already reported: this link is stopped)
                    self.metrics.tx_bus_fails += 1
                    model.metrics.tx_fails += 1
                    result = wire.VIRTIO_CAN_RESULT_NOT_OK
                else:  # the writer thread has it: answered when the bus took it
                    self.pending[outcome] = _PendingTx(chain.head, result_addr, vq,
                                                       runner.generation)
                    continue
                self._answer(vq, chain.head, result_addr, result)
        finally:
            backend.flush_rx()  # what the other links received from this batch, at once
        return len(chains)

    @staticmethod
    def _answer(vq: DeviceQueue, head: int, result_addr: int, result: int) -> None:
        vq.mem.set_u8(result_addr, result)
        vq.push(head, wire.RESULT_SIZE)

    def tx_finished(self, ticket: TxTicket, ok: bool) -> bool:
        """The bus took (or refused) a queued frame of this link: answer a LATE_TX_ACK request.

        True when an answer was pushed: call :meth:`publish_tx` once the batch is done.
        """
        if not ok and not ticket.cancelled:  # a cancelled one was counted when cancelled
            self.metrics.tx_bus_fails += 1
        entry = self.pending.pop(ticket, None)
        return entry is not None and self._complete(entry, ok)

    def fail_pending(self) -> None:
        """Entering STOPPED (STOP, bus-off) cancels the pending TX with NOT_OK.

        A frame the bus is already transmitting cannot be recalled; its request stays pending
        and completes with the bus's answer (NOT_OK only ever means "not sent").
        """
        answered = False
        for ticket in list(self.pending):
            if ticket.cancel():
                self.metrics.tx_bus_fails += 1
                answered |= self._complete(self.pending.pop(ticket), False)
        if answered:
            self.publish_tx()

    def _complete(self, entry: _PendingTx, ok: bool) -> bool:
        """Push the answer of a pending request (not yet published); False if its ring is gone."""
        runner = self.runner
        if runner is None or runner.generation != entry.generation:
            return False  # the ring this request came from was reset
        if runner.transport.vqs[wire.TXQ] is not entry.vq:
            return False
        if not ok:
            self.model.metrics.tx_fails += 1
        result = wire.VIRTIO_CAN_RESULT_OK if ok else wire.VIRTIO_CAN_RESULT_NOT_OK
        try:
            self._answer(entry.vq, entry.head, entry.result_addr, result)
        except (RingError, MemoryAccessError) as e:
            self._broken(f"queue {wire.TXQ}: {e}")
            return False
        return True

    def publish_tx(self) -> None:
        """Publish the TX answers pushed outside the runner's serve path; notify once."""
        runner = self.runner
        if runner is None:
            return
        t = runner.transport
        vq = t.vqs[wire.TXQ] if t.vqs else None
        if vq is None:
            return
        try:
            if vq.publish():
                t.notify_queue(wire.TXQ)
        except (RingError, MemoryAccessError) as e:
            self._broken(f"queue {wire.TXQ}: {e}")

    # -- RX ---------------------------------------------------------------------------------------
    def _take_rx_buffers(self, vq: DeviceQueue) -> int:
        """Move posted RX buffers off the ring into this link's FIFO (unusable ones go back)."""
        if vq is not self._rx_vq:
            self._rx_vq = vq
            self._rx_bufs.clear()
        chains = vq.pop_all(vq.size)
        for chain in chains:
            if chain.error is not None or chain.readable or not chain.writable:
                self.metrics.rx_bad_buffers += 1
                self._note("RX buffer handed back unused", chain.error or "not device-writable")
                vq.push(chain.head, 0)
                self._rx_dirty = True
            else:
                self._rx_bufs.append(chain)
        return len(chains)

    def _next_rx_buffer(self) -> Chain | None:
        runner = self.runner
        if runner is None or not runner.transport.serving:
            return None
        vq = runner.transport.vqs[wire.RXQ]
        if vq is None:
            return None
        if vq is not self._rx_vq or not self._rx_bufs:
            # buffers posted since the runner last looked (its kick may still be pending)
            try:
                self._take_rx_buffers(vq)
            except (RingError, MemoryAccessError) as e:
                self._broken(f"queue {wire.RXQ}: {e}")
                return None
        return self._rx_bufs.popleft() if self._rx_bufs else None

    def deliver(self, frame: CanFrame) -> None:
        """Write one admitted frame into the next RX buffer (call :meth:`flush_rx` after)."""
        self._fill_rx(lambda room: self.model.rx_encode(frame, room))

    def deliver_error(self, frame: wire.CanErrorFrame) -> None:
        """Write an error frame into the next RX buffer (extension; call :meth:`flush_rx`)."""
        if not self.model.error_state_ext or not self.model.started:
            return
        self._fill_rx(lambda room: self.model.rx_encode_error(frame, room))

    def _fill_rx(self, encode: Callable[[int], bytes | None]) -> None:
        """The next RX buffer gets ``encode(its room)``: None when it is too small for the frame
        (§8.2: handed back empty, the frame dropped); no buffer at all drops the frame too."""
        chain = self._next_rx_buffer()
        if chain is None:
            self.metrics.rx_dropped_no_buffer += 1
            self.model.metrics.rx_dropped += 1
            return
        vq = self._rx_vq
        assert vq is not None
        data = encode(chain.writable_len)
        if data is None:
            vq.push(chain.head, 0)
        else:
            _scatter(vq.mem, chain.writable, data)
            vq.push(chain.head, len(data))  # exactly 16 + length bytes (§8.1)
        self._rx_dirty = True

    def flush_rx(self) -> None:
        """Publish the RX buffers filled since the last flush and notify the driver once."""
        if not self._rx_dirty:
            return
        self._rx_dirty = False
        vq, runner = self._rx_vq, self.runner
        if vq is None or runner is None or runner.transport.vqs[wire.RXQ] is not vq:
            return
        try:
            if vq.publish():
                runner.transport.notify_queue(wire.RXQ)
        except (RingError, MemoryAccessError) as e:
            self._broken(f"queue {wire.RXQ}: {e}")

    # -- control -----------------------------------------------------------------------------------
    def _serve_control(self, vq: DeviceQueue, runner: QueueRunner) -> int:
        mem = vq.mem
        chains = vq.pop_all(runner.batch)
        for chain in chains:
            result_addr = _result_addr(chain, mem)
            if chain.error is not None:
                self._note("control request refused", chain.error)
                self._answer(vq, chain.head, result_addr, wire.VIRTIO_CAN_RESULT_NOT_OK)
                continue
            status = self.model.status
            reports = self.model.bus_off_reports
            result = self.model.handle_control(
                _gather(mem, chain.readable, wire.ERROR_REPORT_SIZE))
            if self.model.error_reports:
                errs, self.model.error_reports = self.model.error_reports, []
                self._answer(vq, chain.head, result_addr, result)
                for report in errs:
                    self.backend.controller_error(self, report)
                continue
            if self.model.bus_off_reports != reports:
                # answer first, so the reporting driver is not left waiting behind the flow
                self._answer(vq, chain.head, result_addr, result)
                self.backend.bus_error(f"link {self.link_id} reports its controller bus-off")
                continue
            if not self.model.started:
                self.fail_pending()
            if self.model.status != status:
                self.push_config()  # START cleared bus-off: status first, then the answer
            self._answer(vq, chain.head, result_addr, result)
        return len(chains)

    # -- config and faults -------------------------------------------------------------------------
    def push_config(self) -> None:
        """Show the model's status word in the config space (with a config-change event)."""
        if self.runner is not None:
            self.runner.transport.update_config(self.model.config_bytes())

    def show_error_state(self, state: int) -> None:
        """The switch's error state changed: status bits, config-change notification."""
        if self.model.set_error_state(state):
            self.push_config()

    def bus_off(self) -> None:
        effects = self.model.bus_off()
        if effects.notify_config:
            self.push_config()
        self.fail_pending()

    def _forget_rings(self) -> None:
        self._rx_vq = None
        self._rx_bufs.clear()
        self._rx_dirty = False
        for ticket in self.pending:
            ticket.cancel()
        self.pending.clear()

    def _broken(self, reason: str) -> None:
        """A ring fault found outside the runner's serve path: same rule (NEEDS_RESET)."""
        self._forget_rings()
        runner = self.runner
        if runner is not None:
            runner.transport.mark_needs_reset(reason)
            runner.generation += 1

    def _note(self, what: str, reason: str) -> None:
        if self._limiter.allow(time.monotonic()):
            log.warning(what, link=self.link_id, reason=reason)

    def stats(self) -> dict[str, int]:
        return {**self.model.metrics.as_dict(), **self.metrics.as_dict()}
