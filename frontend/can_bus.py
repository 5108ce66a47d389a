"""python-can interface ``ivshmem``: a virtio-can link as a :class:`can.BusABC`.

``can.Bus(interface="ivshmem", channel="sim:/run/x.sock")`` (or ``uio:/dev/uioN``,
``uio:auto``, or ``vhost-user:/run/can.sock``: this process is then the vhost-user front-end of
a virtio-can back-end listening there); registered through the ``can.interface`` entry point, so
python-can's own tools work: ``python -m can.logger -i ivshmem -c sim:/run/x.sock``.

A python-can bus is a blocking object that may be created outside any event loop, while the
virtio driver is asyncio (bring-up, interrupts, reconnect). The bus therefore runs the driver on
a private event loop in one background thread, which also keeps the RX ring full while the
application is busy elsewhere. Received frames wait in a queue whose state an eventfd mirrors:
``fileno()`` returns that eventfd, so ``can.Notifier`` watches it with ``add_reader`` and needs
no thread of its own.

``send`` does not hand the frame to that thread: it puts it on the TX ring itself, under a lock
it shares with the loop thread, and kicks the device (:meth:`CanDriver.submit_from_thread`).
Without LATE_TX_ACK it then returns: the device answers only NOT_OK for a stopped or bus-off
controller, which ``send`` checks before it submits; a NOT_OK that still arrives later (the
controller went bus-off meanwhile) is counted in ``tx_errors``, logged, and raised by the next
``send`` after its answer was reaped (answers are reaped in batches, at the latest 16 sends
later, or by the driver's thread on any interrupt), which then does not send its own frame (as a
socket reports an asynchronous error on a later call). With LATE_TX_ACK, ``send`` waits for the
answer: it spins on the used ring for up to ``spin_us`` and takes the answer itself, then sleeps
until the loop thread hands it over.

Several buses of one process may open the same channel (a logger beside the application, a
``Notifier`` and a sender): they share the link's driver and thread, each gets its own copy of
every received frame, and a frame one of them sends reaches the others, as SocketCAN's local
loopback does. Another process joins the same CAN traffic through a link of its own: the
backend's switch joins every ``--link`` it serves.

What a frame keeps: virtio-can carries the identifier, the extended / RTR / FD flags and the data,
but no bit-rate-switch (BRS) or error-state-indicator flag. An FD frame sent with
``bitrate_switch=True`` therefore arrives with ``bitrate_switch=False`` (whether the data phase
switches rate is the receiving controller's setting, not the frame's).

Logging goes through Python's ``logging`` (logger ``ivshmem_virtio``, with a ``NullHandler``):
opening a bus prints nothing unless the application configures logging.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import os
import select
import threading
import time
from typing import Any

import can
import uvloop
from can import BusABC, BusState, CanInitializationError, CanOperationError, CanProtocol

from ivshmem_virtio.errors import ConfigError, IvshmemVirtioError
from ivshmem_virtio.link import open_link, parse_link
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import (
    CanFrameError,
    encode_message,
    error_frame_to_message,
    frame_from_message,
    frame_to_message,
)

from .can import CanDriver, Received, ReceivedError
from .driver import Device
from .vhost_user import vhost_user_path
from .vhost_user_conn import VhostUserLink


class _SharedLink:
    """One link's driver, event loop and thread, shared by every bus of this process that opens
    the link's channel (as several sockets share one SocketCAN interface: a logger beside the
    application, a Notifier and a sender). Received frames go to each bus; a frame one bus
    sends reaches the others too, as the interface's local loopback does."""

    _lock = threading.Lock()
    _links: dict[str, _SharedLink] = {}  # channel -> its link, while a bus has it open

    def __init__(self, channel: str, options: tuple[Any, ...]) -> None:
        self.channel = channel
        self.options = options
        self.buses: list[IvshmemCanBus] = []
        # uvloop, as everywhere else here: its wake-ups made a LATE_TX_ACK send() 92 -> 72 us
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name=f"ivshmem-can {channel}")
        self.thread.start()
        self.driver: CanDriver | None = None

    @classmethod
    def attach(cls, bus: IvshmemCanBus, options: tuple[Any, ...]) -> _SharedLink:
        """The link of ``bus.channel``, opened now or by an earlier bus with the same options."""
        with cls._lock:
            link = cls._links.get(bus.channel)
            if link is not None:
                if link.options != options:
                    raise CanInitializationError(
                        f"ivshmem {bus.channel}: already open in this process with other "
                        "options (fd, late_tx_ack, timeout, mode): open it with the same ones")
                link.buses.append(bus)
                return link
            link = cls(bus.channel, options)
            fd, late_tx_ack, timeout, mode = options
            try:
                link.call(link._open(fd, late_tx_ack, timeout, mode), timeout + 5.0)
            except BaseException as e:
                link.stop_loop()
                if isinstance(e, CanInitializationError):
                    raise
                raise CanInitializationError(f"ivshmem {bus.channel}: {e}") from e
            link.buses.append(bus)
            cls._links[bus.channel] = link
            return link

    def detach(self, bus: IvshmemCanBus) -> None:
        """``bus`` leaves; the last one closes the device and stops the thread."""
        with self._lock:
            if bus in self.buses:
                self.buses.remove(bus)
            if self.buses:
                return
            if self._links.get(self.channel) is self:
                del self._links[self.channel]
        driver = self.driver
        if driver is not None:
            with contextlib.suppress(Exception):
                self.call(self._close(driver), 5.0)
        self.stop_loop()

    async def _open(self, fd: bool | None, late_tx_ack: bool, timeout: float,
                    mode: str) -> None:
        dev: Device
        if (path := vhost_user_path(self.channel)) is not None:
            dev = VhostUserLink(path, timeout=timeout)
        else:
            dev = open_link(self.channel, backend=False,
                            protocol=wire.IVSHMEM_PROTOCOL_CAN_FRONTEND, timeout=timeout)
        driver = CanDriver(dev, fd=True if fd is None else fd, late_tx_ack=late_tx_ack,
                           on_frame=self._on_frame, errors=True, on_error=self._on_error,
                           mode=mode, timeout=timeout)
        try:
            await driver.start(timeout)
        except BaseException:
            await driver.close()
            dev.close()
            raise
        self.driver = driver

    async def _close(self, driver: CanDriver) -> None:
        try:
            await driver.close()
        finally:
            driver.dev.close()

    def call(self, coro: Any, timeout: float | None) -> Any:  # noqa: ANN401 - its result
        """Run ``coro`` on the driver's loop and wait for its result from this thread."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()

    def _on_frame(self, r: Received) -> None:
        """Driver thread: every bus gets its own message object."""
        for bus in list(self.buses):
            bus._enqueue(frame_to_message(r.frame, timestamp=r.timestamp, channel=self.channel))

    def _on_error(self, r: ReceivedError) -> None:
        """Driver thread: an error frame (extension), queued as python-can's socketcan does."""
        for bus in list(self.buses):
            bus._enqueue(error_frame_to_message(r.frame, timestamp=r.timestamp,
                                                channel=self.channel))


class IvshmemCanBus(BusABC):
    """A virtio-can controller over an ivshmem link, as a python-can bus.

    :param channel: the link: ``sim:SOCKET``, ``uio:/dev/uioN``, ``uio:auto``, or
        ``vhost-user:SOCKET`` (a vhost-user virtio-can back-end).
    :param fd: ask for CAN FD (default: whatever the device offers).
    :param receive_own_messages: also receive the frames this bus sent (a local echo after the
        device accepted them; the device never echoes a frame to its sender).
    :param late_tx_ack: ask the device to answer a send only once the frame is on the bus.
    :param rx_queue_size: received frames kept for ``recv`` (0 = unbounded); when full the
        oldest is dropped, as python-can's ``virtual`` interface does.
    :param timeout: seconds to wait for the backend at start-up.
    :param spin_us: with LATE_TX_ACK, how long ``send`` polls for the device's answer before
        it sleeps (0: always sleep).
    :param mode: how the driver's thread waits for interrupts: ``block`` (default), ``poll``
        or ``adaptive`` (as the backend's ``--mode``).
    """

    def __init__(self, channel: str, can_filters: can.typechecking.CanFilters | None = None, *,
                 fd: bool | None = None, receive_own_messages: bool = False,
                 late_tx_ack: bool = True, rx_queue_size: int = 0, timeout: float = 10.0,
                 spin_us: float = 100.0, mode: str = "block", **kwargs: Any) -> None:
        try:
            if vhost_user_path(str(channel)) is None:
                parse_link(str(channel))
        except ConfigError as e:
            raise CanInitializationError(str(e)) from None
        if mode not in ("block", "poll", "adaptive"):
            raise CanInitializationError(f"mode {mode!r}: expected block, poll or adaptive")
        self.channel = str(channel)
        self.receive_own_messages = receive_own_messages
        self.rx_queue_size = rx_queue_size
        self.rx_dropped = 0
        self.spin_us = spin_us
        self._mode = mode
        self._timeout = timeout
        self._rxq: collections.deque[can.Message] = collections.deque()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._link = _SharedLink.attach(self, (fd, late_tx_ack, timeout, mode))
        except BaseException:
            os.close(self._efd)
            raise
        self._driver: CanDriver | None = self._link.driver
        assert self._driver is not None
        self._can_protocol = CanProtocol.CAN_FD if self._driver.fd else CanProtocol.CAN_20
        over = "" if self.channel.startswith("vhost-user:") else "ivshmem "
        self.channel_info = f"virtio-can over {over}{self.channel}"
        super().__init__(channel=channel, can_filters=can_filters, **kwargs)

    # -- the driver's thread (shared with the other buses of this channel) --------------------
    def _call(self, coro: Any, timeout: float | None) -> Any:  # noqa: ANN401 - its result
        return self._link.call(coro, timeout)

    def _enqueue(self, msg: can.Message) -> None:
        self._rxq.append(msg)
        if self.rx_queue_size and len(self._rxq) > self.rx_queue_size:
            with contextlib.suppress(IndexError):
                self._rxq.popleft()
                self.rx_dropped += 1
        os.eventfd_write(self._efd, 1)

    def _take(self) -> can.Message | None:
        """Pop one message; the eventfd stays readable exactly while messages are queued."""
        try:
            msg: can.Message | None = self._rxq.popleft()
        except IndexError:
            msg = None
        if not self._rxq:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
            if self._rxq:  # a frame arrived between the check and the drain
                os.eventfd_write(self._efd, 1)
        return msg

    # -- BusABC ------------------------------------------------------------------------------------
    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._take()
            if msg is not None:
                return msg, False
            if self._is_shutdown:
                raise CanOperationError("the bus is shut down")
            driver = self._driver
            if driver is not None and driver.closed:
                raise CanOperationError(f"ivshmem {self.channel}: device lost")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None, False
            # wake at least once a second to notice a shutdown from another thread
            select.select([self._efd], [], [], 1.0 if left is None else min(left, 1.0))

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        """Send ``msg``. With LATE_TX_ACK: returns once the frame is on the bus. Without: once
        the device has the request (a later refusal is raised by a later call, see above)."""
        if self._is_shutdown:
            raise CanOperationError("the bus is shut down")
        driver = self._driver
        assert driver is not None
        try:
            request = encode_message(msg, wire.VIRTIO_CAN_TX)
        except CanFrameError as e:
            raise CanOperationError(f"cannot send this message over virtio-can: {e}") from None
        if driver.refused and (n := driver.take_refused()):
            raise CanOperationError(f"the device refused {n} frame(s) sent before (NOT_OK, "
                                    f"{self._why(driver)}); this one was not sent")
        if driver.bus_off or not driver.controller_started:
            raise CanOperationError(f"the controller is {self._why(driver)}: frame not sent")
        late = driver.has(wire.F_LATE_TX_ACK)
        try:
            req = driver.submit_from_thread(request, waited=late)
            if req is None:  # reconnecting, ring full: through the loop's backlog, in order
                result = self._call(driver.send(frame_from_message(msg)), timeout)
            elif late:
                result = driver.wait_from_thread(req, timeout, self.spin_us)
            else:
                result = wire.VIRTIO_CAN_RESULT_OK
        except TimeoutError:
            raise CanOperationError(f"send not answered within {timeout} s") from None
        except (ConnectionError, IvshmemVirtioError) as e:
            raise CanOperationError(f"ivshmem {self.channel}: {e}") from None
        if result != wire.VIRTIO_CAN_RESULT_OK:
            raise CanOperationError(f"the device answered NOT_OK ({self._why(driver)})")
        buses = self._link.buses
        if len(buses) > 1 or self.receive_own_messages:  # (the frame only for those)
            frame = frame_from_message(msg)
            now = time.time()
            for bus in list(buses):  # this process's other buses on the channel see it
                if bus is not self:
                    bus._enqueue(frame_to_message(frame, timestamp=now, channel=self.channel))
            if self.receive_own_messages:
                self._enqueue(frame_to_message(frame, timestamp=now, channel=self.channel,
                                               is_rx=False))

    @property
    def tx_errors(self) -> int:
        """Frames the device refused after ``send`` had returned (no LATE_TX_ACK), in total."""
        driver = self._driver
        return 0 if driver is None else driver.metrics.tx_fails_unwaited

    @staticmethod
    def _why(driver: CanDriver) -> str:
        return "bus-off" if driver.bus_off else (
            "stopped" if not driver.controller_started else "frame refused")

    def fileno(self) -> int:
        return self._efd

    @property
    def state(self) -> BusState:
        """ERROR when stopped or bus-off; PASSIVE when the controller is error-passive (the
        project's error-state extension, as python-can's kvaser interface maps it); else
        ACTIVE (error-warning is still active in python-can's three states)."""
        driver = self._driver
        if driver is None or driver.bus_off or not driver.controller_started:
            return BusState.ERROR
        if driver.error_passive:
            return BusState.PASSIVE
        return BusState.ACTIVE

    @state.setter
    def state(self, new_state: BusState) -> None:
        """ACTIVE starts the controller (recovers from bus-off), ERROR stops it."""
        driver = self._driver
        assert driver is not None
        if new_state == BusState.ACTIVE:
            result = self._call(driver.start_controller(), self._timeout)
        elif new_state == BusState.ERROR:
            result = self._call(driver.stop_controller(), self._timeout)
        else:
            raise NotImplementedError("virtio-can has no listen-only (passive) mode")
        if result != wire.VIRTIO_CAN_RESULT_OK:
            raise CanOperationError(f"the device refused {new_state.name}")

    def shutdown(self) -> None:
        if self._is_shutdown:
            return
        super().shutdown()
        self._link.detach(self)
        os.close(self._efd)

    @staticmethod
    def _detect_available_configs() -> list[can.typechecking.AutoDetectedConfig]:
        """Links cannot be discovered without knowing the hub sockets or uio devices."""
        return []
