"""virtio-console served to a host side (pty, socket, log, stdio): glue between the runner, the
pure model (:mod:`ivshmem_virtio.backend.devices.console`) and a
:class:`~ivshmem_virtio.backend.resources.console_host.HostPort`.

Flow control, both ways, without ever blocking the daemon:

* transmitq: buffers are taken while the model has room; their bytes go to the host side with
  non-blocking writes. When the host side does not drain, the transmitq turns *passive* (no
  kicks asked, not counted as work, like virtio-can's RX) and the full ring holds the cell
  back; when the host side drains, it turns active again and the ring is served at once.
* receiveq: buffers are taken only while there is input (passive otherwise: posting buffers is
  no reason to wake us); input that finds no buffer waits in the model (bounded), and past that
  bound the host side is not read until the cell posts buffers.

A transmitq chain that cannot be taken (a descriptor outside the section, a writable buffer
before readable data, longer than ``TX_CHAIN_MAX``) has no status to answer with: needs-reset
(protocol §8.2). A bad receive buffer is handed back unused and counted, as virtio-can does.

The service outlives a link: ``serve`` opens the host side once and binds a new runner to the
service for each life of the link; output the cell sent before a link was lost still reaches
the host side.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TYPE_CHECKING

import structlog

from ivshmem_virtio.errors import DeviceError, MemoryAccessError, RingError
from ivshmem_virtio.log import RateLimiter
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import console as wire
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.virtqueue.device import Chain, DeviceQueue

from ..runner import LinkRunner, QueueRunner
from .console import ConsoleModel

if TYPE_CHECKING:
    from ivshmem_virtio.ivshmem.base import IvshmemDevice

    from ..resources.console_host import HostPort

log = structlog.get_logger("ivshmem_virtio.backend.console")

RING_FEATURES = V.bit(V.F_EVENT_IDX) | V.bit(V.F_INDIRECT_DESC)
PUMP_BATCH = 64  # transmitq buffers served per host-side callback before yielding


def _gather(mem: Region, segments: list[tuple[int, int]]) -> bytes:
    """The readable bytes of a chain (bounds already checked by the walk; a copy)."""
    if len(segments) == 1:
        addr, length = segments[0]
        return mem.read(addr, length)
    return b"".join(mem.read(addr, length) for addr, length in segments)


def _scatter(mem: Region, segments: list[tuple[int, int]], data: bytes) -> None:
    pos = 0
    for addr, length in segments:
        if pos >= len(data):
            break
        piece = data[pos:pos + length]
        mem.write(addr, piece)
        pos += len(piece)


class ConsoleRunner(LinkRunner):
    """A :class:`LinkRunner` bound to a :class:`ConsoleService` for one life of the link.

    Beyond blk and can, a console changes which queues are passive at run time (through
    :meth:`LinkRunner.set_passive`) and has one writable config field, ``emerg_wr``, taken
    through the transport's config-write hook: the transaction is answered (and cleared) at
    once, and the field reads back as the device shows it.
    """

    def __init__(self, dev: IvshmemDevice, service: ConsoleService, **kw: object) -> None:
        super().__init__(dev, service, **kw)  # type: ignore[arg-type]
        self.console = service
        self.transport.config_write = self._config_write
        service.bind(self)

    def _config_write(self, offset: int, written: bytes) -> bool:
        if offset != wire.OFF_EMERG_WR:
            return False  # cols, rows, max_nr_ports: read-only, the transport logs it
        (value,) = struct.unpack_from("<I", written, wire.OFF_EMERG_WR)
        self.console.emergency_write(value)
        return True


class ConsoleService:
    """The runner's Service for virtio-console port 0, attached to one host side."""

    device_id = wire.VIRTIO_ID_CONSOLE
    num_queues = wire.NUM_QUEUES_PORT0
    # both start passive: receive buffers are taken when there is input, and the transmitq is
    # made active by on_activate (a kick then means output)
    passive_queues = frozenset({wire.RECEIVEQ})

    def __init__(self, port: HostPort, model: ConsoleModel | None = None) -> None:
        self.port = port
        self.model = model or ConsoleModel()
        self.runner: ConsoleRunner | None = None
        self._limiter = RateLimiter()
        self._input_paused = False
        self._started = False

    def bind(self, runner: ConsoleRunner) -> None:
        """The runner of this life of the link (a new one after the link came back)."""
        self.runner = runner

    def unbind(self, runner: LinkRunner) -> None:
        if self.runner is runner:
            self.runner = None

    def start(self) -> None:
        """Attach to the host side; call from the daemon's event loop."""
        if not self._started:
            self._started = True
            self.port.start(self)

    # -- Service protocol ---------------------------------------------------------------------
    @property
    def features(self) -> int:
        return self.model.device_features | RING_FEATURES

    def config(self) -> bytes:
        return self.model.config_bytes()

    def on_reset(self) -> None:
        self.model.reset()
        runner = self.runner
        if runner is not None:
            runner.set_passive(wire.RECEIVEQ, True)
            runner.set_passive(wire.TRANSMITQ, False)

    def on_activate(self, features: int, runner: QueueRunner) -> None:
        self.model.set_features(features)
        if self.model.input_len:
            self.pump_input()  # typed before the cell's driver was up

    def serve(self, index: int, vq: DeviceQueue, runner: QueueRunner) -> int:
        if index == wire.TRANSMITQ:
            return self._take_tx(vq, runner.batch)
        if index == wire.RECEIVEQ:
            return self._fill_rx(vq)
        return 0

    def close(self) -> None:
        """Leave the host side (the daemon's end; a lost link only unbinds)."""
        self.runner = None
        self.port.close()

    # -- transmitq: the cell's output ------------------------------------------------------------
    def _take_tx(self, vq: DeviceQueue, limit: int) -> int:
        """Take transmitq buffers while there is room; the caller publishes."""
        model = self.model
        mem = vq.mem
        n = 0
        while n < limit:
            if not model.want_tx():
                self.flush_output()
                if not model.want_tx():
                    break  # the host side is behind: the ring holds the cell back
            chains = vq.pop_all(1)
            if not chains:
                break
            chain = chains[0]
            if chain.error is not None:
                raise DeviceError(f"transmitq buffer at descriptor {chain.head}: {chain.error}")
            size = chain.readable_len
            if not model.tx_chain_ok(size):
                raise DeviceError(f"transmitq buffer at descriptor {chain.head}: {size} bytes "
                                  "is more than the device takes in one buffer")
            model.tx(_gather(mem, chain.readable))
            vq.push(chain.head, 0)  # the device writes nothing into an output buffer
            n += 1
        self.flush_output()
        self._throttle_tx(vq, not model.want_tx())
        return n

    def _throttle_tx(self, vq: DeviceQueue | None, throttled: bool) -> None:
        runner = self.runner
        if runner is None or runner.is_passive(wire.TRANSMITQ) == throttled:
            return
        runner.set_passive(wire.TRANSMITQ, throttled)
        if not throttled and vq is not None and vq.enable_notifications():
            # buffers the cell queued while we were not asking for kicks: serve them now
            self._pump(wire.TRANSMITQ)

    def flush_output(self) -> None:
        """Write what the host side takes now; the rest waits for :meth:`host_writable`."""
        model = self.model
        while model.output_len:
            done = self.port.write(model.pending_output())
            if done <= 0:
                break
            model.output_done(done)

    def host_writable(self) -> None:
        """The host side drained (its port calls this): write more, take buffers again."""
        self.flush_output()
        if self.model.want_tx():
            vq = self._vq(wire.TRANSMITQ)
            if vq is not None:
                self._throttle_tx(vq, False)
                self._pump(wire.TRANSMITQ)

    def emergency_write(self, value: int) -> None:
        if not self.model.emergency_write(value):
            self._note("emergency write dropped", "the host side is not reading")
        self.flush_output()

    # -- receiveq: input for the cell ------------------------------------------------------------
    def host_input(self, data: bytes) -> int:
        """Bytes from the host side; returns how many were kept (the port keeps the rest)."""
        kept = self.model.feed_input(data)
        self.pump_input()
        if self.model.input_room() == 0 and not self._input_paused:
            self._input_paused = True
            self.port.pause_input()
        return kept

    def pump_input(self) -> None:
        self._pump(wire.RECEIVEQ)

    def _fill_rx(self, vq: DeviceQueue) -> int:
        model = self.model
        n = 0
        while model.input_len:
            chains = vq.pop_all(1)
            if not chains:
                break
            chain = chains[0]
            n += 1
            if not self._rx_usable(vq.mem, chain):
                vq.push(chain.head, 0)
                continue
            data = model.rx(chain.writable_len)
            _scatter(vq.mem, chain.writable, data)
            vq.push(chain.head, len(data))
        runner = self.runner
        if runner is not None:
            waiting = bool(model.input_len)  # and no buffer: a posted buffer is work now
            runner.set_passive(wire.RECEIVEQ, not waiting)
            if waiting and vq.enable_notifications():
                n += self._fill_rx(vq)
        if self._input_paused and model.input_room():
            self._input_paused = False
            self.port.resume_input()
        return n

    def _rx_usable(self, mem: Region, chain: Chain) -> bool:
        if chain.error is None and not chain.readable and chain.writable_len > 0:
            return True
        self.model.metrics.rx_bad_buffers += 1
        self._note("receive buffer handed back unused", chain.error or "not device-writable")
        return False

    # -- outside the runner's turn ---------------------------------------------------------------
    def _vq(self, index: int) -> DeviceQueue | None:
        runner = self.runner
        if runner is None or not runner.transport.serving:
            return None
        vqs = runner.transport.vqs
        return vqs[index] if index < len(vqs) else None

    def _pump(self, index: int) -> None:
        """Serve one queue from a host-side callback and publish, as the runner would."""
        vq = self._vq(index)
        runner = self.runner
        if vq is None or runner is None:
            return
        try:
            if index == wire.TRANSMITQ:
                more = self._take_tx(vq, PUMP_BATCH) == PUMP_BATCH
                if not more and not runner.is_passive(index):
                    # the runner sleeps: ask for the next kick past what we took (event idx)
                    more = vq.enable_notifications()
                if more:  # serve the rest after the loop's other work, as a runner turn would
                    asyncio.get_running_loop().call_soon(self._pump, index)
            else:
                self._fill_rx(vq)
            if vq.publish():
                runner.transport.notify_queue(index)
        except (DeviceError, RingError, MemoryAccessError) as e:
            runner.transport.mark_needs_reset(f"queue {index}: {e}")
            runner.generation += 1

    # -- window size ---------------------------------------------------------------------------
    def host_resized(self, cols: int, rows: int) -> None:
        """The host side's window changed: config change event to the cell (SIZE)."""
        if self.model.resize(cols, rows):
            log.info("console resized", cols=cols, rows=rows)
            if self.runner is not None:
                self.runner.notify_config()

    def _note(self, what: str, reason: str) -> None:
        if self._limiter.allow(time.monotonic()):
            log.warning(what, reason=reason)

    def stats(self) -> dict[str, int]:
        return {**self.model.metrics.as_dict(), "output_buffered": self.model.output_len,
                "input_buffered": self.model.input_len}
