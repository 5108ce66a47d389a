"""python-can interface ``ivshmem``: a virtio-can link as a :class:`can.BusABC`.

``can.Bus(interface="ivshmem", channel="sim:/run/x.sock")`` (or ``uio:/dev/uioN``,
``uio:auto``); registered through the ``can.interface`` entry point, so python-can's own tools
work: ``python -m can.logger -i ivshmem -c sim:/run/x.sock``.

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
``send``, which then does not send its own frame (as a socket reports an asynchronous error on
the next call). With LATE_TX_ACK, ``send`` waits for the answer: it spins on the used ring for
up to ``spin_us`` and takes the answer itself, then sleeps until the loop thread hands it over.

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
    encode_frame,
    error_frame_to_message,
    frame_from_message,
    frame_to_message,
)

from .can import CanDriver, Received, ReceivedError


class IvshmemCanBus(BusABC):
    """A virtio-can controller over an ivshmem link, as a python-can bus.

    :param channel: the link: ``sim:SOCKET``, ``uio:/dev/uioN`` or ``uio:auto``.
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
        # uvloop, as everywhere else here: its wake-ups made a LATE_TX_ACK send() 92 -> 72 us
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"ivshmem-can {self.channel}")
        self._thread.start()
        self._driver: CanDriver | None = None
        try:
            self._call(self._open(fd, late_tx_ack), timeout + 5.0)
        except BaseException as e:
            self._stop_loop()
            os.close(self._efd)
            if isinstance(e, CanInitializationError):
                raise
            raise CanInitializationError(f"ivshmem {self.channel}: {e}") from e
        assert self._driver is not None
        self._can_protocol = CanProtocol.CAN_FD if self._driver.fd else CanProtocol.CAN_20
        self.channel_info = f"virtio-can over ivshmem {self.channel}"
        super().__init__(channel=channel, can_filters=can_filters, **kwargs)

    # -- the driver's thread ----------------------------------------------------------------------
    async def _open(self, fd: bool | None, late_tx_ack: bool) -> None:
        dev = open_link(self.channel, backend=False,
                        protocol=wire.IVSHMEM_PROTOCOL_CAN_FRONTEND, timeout=self._timeout)
        driver = CanDriver(dev, fd=True if fd is None else fd, late_tx_ack=late_tx_ack,
                           on_frame=self._on_frame, errors=True, on_error=self._on_error,
                           mode=self._mode, timeout=self._timeout)
        try:
            await driver.start(self._timeout)
        except BaseException:
            await driver.close()
            dev.close()
            raise
        self._driver = driver

    def _call(self, coro: Any, timeout: float | None) -> Any:
        """Run ``coro`` on the driver's loop and wait for its result from this thread."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def _on_frame(self, r: Received) -> None:
        """Driver thread: queue the frame, then make the eventfd readable."""
        self._enqueue(frame_to_message(r.frame, timestamp=r.timestamp, channel=self.channel))

    def _on_error(self, r: ReceivedError) -> None:
        """Driver thread: an error frame (extension) is queued as python-can's socketcan does."""
        self._enqueue(error_frame_to_message(r.frame, timestamp=r.timestamp,
                                             channel=self.channel))

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
        the device has the request (a later refusal is raised by the next call, see above)."""
        if self._is_shutdown:
            raise CanOperationError("the bus is shut down")
        driver = self._driver
        assert driver is not None
        try:
            frame = frame_from_message(msg)
        except CanFrameError as e:
            raise CanOperationError(f"cannot send this message over virtio-can: {e}") from None
        if driver.refused and (n := driver.take_refused()):
            raise CanOperationError(f"the device refused {n} frame(s) sent before (NOT_OK, "
                                    f"{self._why(driver)}); this one was not sent")
        if driver.bus_off or not driver.controller_started:
            raise CanOperationError(f"the controller is {self._why(driver)}: frame not sent")
        late = driver.has(wire.F_LATE_TX_ACK)
        try:
            req = driver.submit_from_thread(encode_frame(frame, wire.VIRTIO_CAN_TX), waited=late)
            if req is None:  # reconnecting, ring full: through the loop's backlog, in order
                result = self._call(driver.send(frame), timeout)
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
        if self.receive_own_messages:
            self._enqueue(frame_to_message(frame, timestamp=time.time(), channel=self.channel,
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
        driver = self._driver
        if driver is not None:
            with contextlib.suppress(Exception):
                self._call(self._close(driver), 5.0)
        self._stop_loop()
        os.close(self._efd)

    async def _close(self, driver: CanDriver) -> None:
        try:
            await driver.close()
        finally:
            driver.dev.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    @staticmethod
    def _detect_available_configs() -> list[can.typechecking.AutoDetectedConfig]:
        """Links cannot be discovered without knowing the hub sockets or uio devices."""
        return []
