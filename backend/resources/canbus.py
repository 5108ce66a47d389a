"""The CAN bus the virtio-can links share: any python-can bus, bridged without blocking the loop.

python-can buses are blocking objects: ``recv`` waits, and ``send`` may wait too (a full
SocketCAN TX queue, a vendor driver). The event loop that serves the links must never wait, so:

* frames from the bus arrive through ``loop.add_reader`` on the bus's own ``fileno()`` where it
  has a real one (socketcan, udp_multicast), else from a reader thread that hands batches over
  with ``call_soon_threadsafe`` (virtual and most vendor interfaces);
* frames to the bus go out in submission order (FIFO on the wire), and each one's outcome reaches
  the owner, so LATE_TX_ACK can complete a request only once the bus accepted the frame. Where
  the interface is known to answer at once without waiting (python-can's ``virtual`` while every
  receiver's queue is unbounded; ``socketcan`` with ``timeout=0``, which either hands the frame
  to the kernel or refuses it whole) and nothing is queued ahead, the loop sends the frame itself
  and knows the outcome on return: no thread hand-off either way, which is most of the cost of a
  frame. Everything else, and every frame behind one that had to wait, goes through one writer
  thread, and its outcome comes back to the loop in batches.

A bus error (``send``/``recv`` raising, or a SocketCAN bus-off error frame) is reported to the
owner, which turns it into the virtio-can bus-off flow; frames still queued for the writer when
that happens are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final, cast

import can
import structlog

from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.log import RateLimiter
from ivshmem_virtio.spec.can import CanFrame, CanFrameError, frame_from_message

log = structlog.get_logger("ivshmem_virtio.backend.canbus")

#: SocketCAN error class bit of a bus-off error frame (linux/can/error.h CAN_ERR_BUSOFF).
CAN_ERR_BUSOFF: Final = 0x00000040
#: Frames handed from the bus to the loop per callback: bounds the time one batch holds the loop.
RX_BATCH: Final = 256
#: How long a reader that saw a bus error waits before reading again (no error storm).
ERROR_BACKOFF: Final = 0.5

FramesCallback = Callable[[list[CanFrame]], None]
ErrorCallback = Callable[[str], None]
TxDoneCallback = Callable[[list[tuple["TxTicket", bool]]], None]
#: ``try_send(msg)``: True once the bus took ``msg``, False when it would have to wait (nothing
#: was sent); raises on a bus error.
DirectSend = Callable[[can.Message], bool]


def parse_bus_spec(spec: str) -> tuple[str, str]:
    """``IFACE:CHANNEL`` -> (interface, channel); the channel may itself hold colons (IPv6)."""
    iface, sep, channel = spec.partition(":")
    if not sep or not iface or not channel:
        raise ConfigError(f"--bus {spec!r}: expected IFACE:CHANNEL, e.g. socketcan:can0, "
                          "virtual:NAME or udp_multicast:GROUP")
    from can.interfaces import VALID_INTERFACES

    if iface not in VALID_INTERFACES:
        raise ConfigError(f"--bus {spec!r}: {iface!r} is not an installed python-can interface "
                          f"({', '.join(sorted(VALID_INTERFACES))})")
    return iface, channel


def open_bus(spec: str, *, fd: bool = False) -> can.BusABC:
    """Open the bus named by ``spec``; every failure is a configuration error (exit 2).

    ``fd`` asks the interface for CAN FD where it needs to be told (socketcan); python-can
    config files are ignored so that the command line alone says what is opened.
    """
    iface, channel = parse_bus_spec(spec)
    kwargs: dict[str, Any] = {"fd": True} if fd else {}
    try:
        return can.Bus(interface=iface, channel=channel, ignore_config=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - interfaces raise anything from OSError to ImportError
        raise ConfigError(f"--bus {spec}: cannot open: {e}") from e


def to_message(frame: CanFrame) -> can.Message:
    """The python-can message for a frame going to the bus (already validated: no re-check)."""
    return can.Message(timestamp=time.time(), arbitration_id=frame.can_id,
                       is_extended_id=frame.extended, is_remote_frame=frame.rtr, is_fd=frame.fd,
                       dlc=frame.dlc, data=None if frame.rtr else frame.data, is_rx=False,
                       check=False)


def direct_sender(bus: can.BusABC) -> DirectSend | None:
    """A way to send on ``bus`` from the event loop without ever waiting, or None.

    Only for interfaces whose ``send`` is known to either take the frame at once or send nothing
    (a subclass that overrides ``send`` -- a vendor wrapper, a test bus that holds frames -- is
    not known, and gets the writer thread):

    * ``virtual`` puts a copy into every other bus's queue; it never waits while all of them are
      unbounded. With a bounded one it could wait, or fail after some receivers got the frame,
      so then the frame is left to the writer thread, whose timeout applies.
    * ``socketcan`` with ``timeout=0`` checks that the socket is writable and writes one
      datagram; a full buffer (or any error) sends nothing, so the writer thread simply tries
      again with its timeout and reports a failure that persists.
    """
    send = type(bus).send
    from can.interfaces.virtual import VirtualBus

    if send is VirtualBus.send:
        # VirtualBus's own send: a VirtualBus, whose channel is the list of receivers' queues
        receivers = cast(VirtualBus, bus).channel

        def virtual(msg: can.Message) -> bool:
            for q in receivers:
                if q.maxsize:
                    return False
            send(bus, msg, None)
            return True

        return virtual
    try:
        from can.interfaces.socketcan import SocketcanBus
    except ImportError:  # pragma: no cover - not Linux
        return None
    if send is SocketcanBus.send:

        def socketcan(msg: can.Message) -> bool:
            try:
                send(bus, msg, 0)
            except can.CanOperationError:
                return False
            return True

        return socketcan
    return None


_ticket_lock = threading.Lock()


class TxTicket:
    """One frame queued for the writer thread; the owner keeps it to match the outcome.

    ``tag`` is the owner's (the bridge never looks at it): who sent the frame.
    """

    __slots__ = ("frame", "epoch", "cancelled", "sending", "tag")

    def __init__(self, frame: CanFrame, epoch: int, tag: object = None) -> None:
        self.frame = frame
        self.epoch = epoch
        self.cancelled = False
        self.sending = False
        self.tag = tag

    def cancel(self) -> bool:
        """Keep the frame off the bus; False if the writer already handed it to the bus.

        A frame that is being sent cannot be recalled: its request completes with the bus's
        answer, so that NOT_OK always means "not sent".
        """
        with _ticket_lock:
            if self.sending:
                return False
            self.cancelled = True
            return True

    def claim(self, epoch: int) -> bool:
        """Writer side: take the frame for sending unless it was cancelled meanwhile."""
        with _ticket_lock:
            if self.cancelled or self.epoch != epoch:
                return False
            self.sending = True
            return True


@dataclass(slots=True)
class BridgeMetrics:
    """Counters with fixed names; only the loop thread writes them, except ``tx_*``, which the
    writer thread writes while it has frames and the loop only while it has none."""

    rx_count: int = 0  # frames read from the bus and routed
    rx_errors: int = 0  # error frames and messages virtio-can cannot carry
    tx_count: int = 0  # frames the bus accepted
    tx_direct: int = 0  # ... of which the loop sent itself (no thread hand-off)
    tx_fails: int = 0  # frames the bus refused
    tx_cancelled: int = 0  # frames dropped before sending (bus-off, STOP)
    bus_errors: int = 0  # errors reported as bus-off

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


_STOP = object()


class CanBusBridge:
    """Moves frames between one python-can bus and the owner's callbacks on the event loop."""

    def __init__(self, bus: can.BusABC, *, name: str = "", tx_timeout: float = 1.0,
                 direct: bool = True) -> None:
        self.bus = bus
        self.name = name or str(getattr(bus, "channel_info", "bus"))
        self.tx_timeout = tx_timeout
        self.metrics = BridgeMetrics()
        self.uses_fileno = False
        #: sending from the loop where the interface allows it (``direct=False``: always the thread)
        self.direct: DirectSend | None = direct_sender(bus) if direct else None
        self._queued = 0  # loop side: tickets given to the writer whose outcome is not back yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_frames: FramesCallback | None = None
        self._on_error: ErrorCallback | None = None
        self._on_tx_done: TxDoneCallback | None = None
        self._epoch = 0
        self._epoch_lock = threading.Lock()
        self._txq: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fd = -1
        self._limiter = RateLimiter()

    # -- life cycle -------------------------------------------------------------------------
    def start(self, on_frames: FramesCallback, on_error: ErrorCallback,
              on_tx_done: TxDoneCallback) -> None:
        """Begin moving frames; call from the event loop that runs the owner.

        ``on_frames(frames)``: a batch read from the bus; ``on_error(reason)``: a bus error;
        ``on_tx_done([(ticket, ok), ...])``: the outcomes of queued frames, in send order.
        """
        self._loop = asyncio.get_running_loop()
        self._on_frames = on_frames
        self._on_error = on_error
        self._on_tx_done = on_tx_done
        writer = threading.Thread(target=self._writer, name="can-bus-tx", daemon=True)
        writer.start()
        self._threads.append(writer)
        try:
            fd = self.bus.fileno()
        except (NotImplementedError, OSError, ValueError):
            fd = -1
        if isinstance(fd, int) and fd >= 0:
            self._fd = fd
            self.uses_fileno = True
            self._loop.add_reader(fd, self._on_readable)
        else:
            reader = threading.Thread(target=self._reader, name="can-bus-rx", daemon=True)
            reader.start()
            self._threads.append(reader)
        log.info("can bus bridged", bus=self.name, rx="fileno" if self.uses_fileno else "thread",
                 tx="direct" if self.direct is not None else "thread")

    def close(self) -> None:
        """Stop both directions and shut the bus down (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._fd >= 0 and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
        self._txq.put(_STOP)
        for t in self._threads:
            t.join(5)
        with contextlib.suppress(Exception):
            self.bus.shutdown()

    # -- TX -----------------------------------------------------------------------------------
    def send(self, frame: CanFrame, tag: object = None) -> TxTicket | bool:
        """Put ``frame`` on the bus (call on the loop), in call order.

        True: the bus accepted it before this returned. False: it was not sent, and a bus error
        was already reported through ``on_error`` (or the bridge is closed). A :class:`TxTicket`:
        it waits for the writer thread; ``on_tx_done`` reports its outcome later, on the loop.
        A frame is sent directly only while no ticket is outstanding, so the wire order is the
        call order whichever way each frame goes.
        """
        direct = self.direct
        if direct is not None and not self._queued:
            if self._closed.is_set():
                self.metrics.tx_cancelled += 1
                return False
            try:
                sent = direct(to_message(frame))
            except Exception as e:  # noqa: BLE001 - any interface failure is a bus error
                self.metrics.tx_fails += 1
                self._error(f"send failed: {e}")
                return False
            if sent:
                self.metrics.tx_count += 1
                self.metrics.tx_direct += 1
                return True
            # the bus would have to wait: this frame and the ones behind it go to the writer
        ticket = TxTicket(frame, self._epoch, tag)
        self._queued += 1
        self._txq.put(ticket)
        return ticket

    def cancel_all(self) -> None:
        """Bus-off: frames queued so far are not sent (they complete with ok=False)."""
        with self._epoch_lock:
            self._epoch += 1

    def _writer(self) -> None:
        """The only thread that calls ``bus.send``: one at a time, in queue order."""
        while True:
            item = self._txq.get()
            results: list[tuple[TxTicket, bool]] = []
            while item is not _STOP:
                assert isinstance(item, TxTicket)
                results.append((item, self._send_one(item)))
                if len(results) >= RX_BATCH:
                    self._post(self._tx_done, results)
                    results = []
                try:
                    item = self._txq.get_nowait()
                except queue.Empty:
                    break
            if results:
                self._post(self._tx_done, results)
            if item is _STOP:
                return

    def _send_one(self, ticket: TxTicket) -> bool:
        if self._closed.is_set() or not ticket.claim(self._epoch):
            self.metrics.tx_cancelled += 1
            return False
        try:
            self.bus.send(to_message(ticket.frame), timeout=self.tx_timeout)
        except Exception as e:  # noqa: BLE001 - any interface failure is a bus error
            self.metrics.tx_fails += 1
            with self._epoch_lock:
                self._epoch += 1  # what is queued behind the failed frame is not sent
            self._post(self._error, f"send failed: {e}")
            return False
        self.metrics.tx_count += 1
        return True

    def _tx_done(self, results: list[tuple[TxTicket, bool]]) -> None:
        self._queued -= len(results)
        assert self._on_tx_done is not None
        self._on_tx_done(results)

    # -- RX -------------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        """add_reader callback: drain what the bus has without waiting."""
        msgs: list[can.Message] = []
        try:
            self._take_ready(msgs)
        except Exception as e:  # noqa: BLE001 - any interface failure is a bus error
            self._deliver(msgs)
            self._error(f"receive failed: {e}")
            self._pause_reader()
            return
        self._deliver(msgs)

    def _take_ready(self, msgs: list[can.Message]) -> None:
        """Append what the bus holds without waiting, up to RX_BATCH frames in ``msgs``
        (appended in place: a recv that raises leaves what came before it there)."""
        while len(msgs) < RX_BATCH:
            msg = self.bus.recv(0)
            if msg is None:
                return
            msgs.append(msg)

    def _pause_reader(self) -> None:
        """A failing fd stays readable: stop watching it for a while instead of spinning."""
        loop = self._loop
        if loop is None or self._fd < 0:
            return
        loop.remove_reader(self._fd)

        def resume() -> None:
            if not self._closed.is_set():
                loop.add_reader(self._fd, self._on_readable)

        loop.call_later(ERROR_BACKOFF, resume)

    def _reader(self) -> None:
        """Reader thread for buses without a usable fd: batches go to the loop in one call."""
        while not self._closed.is_set():
            try:
                msg = self.bus.recv(0.1)
                if msg is None:
                    continue
                msgs = [msg]
                self._take_ready(msgs)
            except Exception as e:  # noqa: BLE001 - any interface failure is a bus error
                if self._closed.is_set():
                    return
                self._post(self._error, f"receive failed: {e}")
                time.sleep(ERROR_BACKOFF)
                continue
            self._post(self._deliver, msgs)

    def _deliver(self, msgs: list[can.Message]) -> None:
        if self._closed.is_set() or not msgs:
            return
        frames: list[CanFrame] = []
        for msg in msgs:
            if msg.is_error_frame:
                if msg.arbitration_id & CAN_ERR_BUSOFF:
                    self._error("bus-off error frame")
                else:
                    self.metrics.rx_errors += 1
                continue
            try:
                frames.append(frame_from_message(msg))
            except CanFrameError as e:
                self.metrics.rx_errors += 1
                if self._limiter.allow(time.monotonic()):
                    log.warning("frame from the bus dropped", bus=self.name, error=str(e))
        if frames:
            self.metrics.rx_count += len(frames)
            assert self._on_frames is not None
            self._on_frames(frames)

    # -- errors and thread hand-over -----------------------------------------------------------
    def _error(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self.metrics.bus_errors += 1
        if self._limiter.allow(time.monotonic()):
            log.warning("can bus error", bus=self.name, reason=reason)
        assert self._on_error is not None
        self._on_error(reason)

    def _post(self, fn: Callable[..., None], arg: object) -> None:
        """Run ``fn(arg)`` on the loop (from a bridge thread); dropped once closed."""
        loop = self._loop
        if loop is None or self._closed.is_set():
            return
        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            loop.call_soon_threadsafe(fn, arg)
