"""Pure virtio-can device model: bytes in, effects out.

No asyncio, no shared memory, no python-can bus. The runner drains the virtqueues, hands the
readable bytes of each request to :class:`CanLinkModel`, writes the returned result byte or RX
bytes back, and moves frames between links and the bus with :class:`CanSwitch`. Every rule here
follows ``spec/can.md`` §1 ("MUST reject") and the project decisions of §8.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import asdict, dataclass
from enum import Enum, StrEnum
from typing import Final

from ivshmem_virtio.errors import DeviceError
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import CanFrame, CanFrameError

#: What a link offers unless configured otherwise: everything this model implements.
DEFAULT_FEATURES: Final = wire.F_ALL


class CanRequestError(DeviceError):
    """A request that cannot be answered at all (shorter than its header, §8.6).

    The runner turns it into the needs-reset rule of virtio-ivshmem.md §8.2.
    """


class ControllerState(Enum):
    """The virtio-can controller mode; a link starts STOPPED."""

    STOPPED = "stopped"
    STARTED = "started"


class RejectReason(StrEnum):
    """Why a TX request was answered NOT_OK (wire faults use :class:`wire.FrameFault` values)."""

    STOPPED = "stopped"
    NOT_NEGOTIATED = "not_negotiated"


@dataclass(frozen=True, slots=True)
class TxReject:
    """Answer NOT_OK now; nothing goes on the bus."""

    reason: str
    result: int = wire.VIRTIO_CAN_RESULT_NOT_OK


@dataclass(frozen=True, slots=True)
class TxSend:
    """Put ``frame`` on the switch; complete OK once queued, or once on the bus if ``late_ack``.

    A failed bus send completes with NOT_OK instead; the runner counts it in ``tx_fails``.
    """

    frame: CanFrame
    late_ack: bool


TxDecision = TxReject | TxSend


@dataclass(frozen=True, slots=True)
class BusOffEffects:
    """What the runner must do after :meth:`CanLinkModel.bus_off`."""

    #: The status word changed: set config_event and send a config-change notification.
    notify_config: bool
    #: Complete every pending TX of this link with NOT_OK (entering STOPPED cancels them).
    fail_pending_tx: bool


@dataclass(slots=True)
class CanLinkMetrics:
    """Per-link counters with fixed names (Firecracker style); monotonic for the daemon's life."""

    control_count: int = 0  # control requests answered
    control_fails: int = 0  # ... of which NOT_OK (unknown msg_type)
    tx_count: int = 0  # TX frames accepted for the bus
    tx_bytes: int = 0  # payload bytes of those frames
    tx_fails: int = 0  # TX answered NOT_OK (validation here; the runner adds bus failures)
    rx_count: int = 0  # frames written into an RX buffer
    rx_bytes: int = 0  # payload bytes of those frames
    rx_dropped: int = 0  # frames not delivered, for any of the reasons below
    rx_dropped_stopped: int = 0  # controller STOPPED (§8.5)
    rx_dropped_unsupported: int = 0  # frame type not negotiated (§8.3)
    rx_dropped_small_buffer: int = 0  # RX buffer shorter than the frame (§8.2)
    bus_off_count: int = 0  # bus-off events
    error_reports: int = 0  # error-state reports this link's driver sent (extension)
    error_frames: int = 0  # error frames written into this link's RX buffers (extension)

    def as_dict(self) -> dict[str, int]:
        """Stable keys for structlog events and metrics export."""
        return asdict(self)


def _validate_features(bits: int, offered: int) -> str | None:
    """Return why a device-specific feature set is not acceptable, or None."""
    if bits & ~offered:
        return f"features {bits & ~offered:#x} were not offered"
    if not bits & (wire.F_CAN_CLASSIC | wire.F_CAN_FD):
        return "at least one of CAN_CLASSIC and CAN_FD is required"
    if bits & wire.F_RTR_FRAMES and not bits & wire.F_CAN_CLASSIC:
        return "RTR_FRAMES requires CAN_CLASSIC"
    return None


class CanLinkModel:
    """The device side of ONE virtio-can link (one frontend): features, controller, codec."""

    def __init__(self, offered_features: int = DEFAULT_FEATURES) -> None:
        problem = _validate_features(offered_features, wire.F_ALL)
        if problem is not None:
            raise ValueError(f"invalid offered virtio-can features: {problem}")
        self._offered = offered_features
        self._negotiated = 0
        self.bus_off_reports = 0  # driver-side controller bus-offs reported (extension)
        #: Error reports received and not yet taken by the runner (extension, bit 22).
        self.error_reports: list[wire.ErrorReport] = []
        self._state = ControllerState.STOPPED
        self._status = 0
        self.metrics = CanLinkMetrics()

    # --- features -------------------------------------------------------------------------
    @property
    def device_features(self) -> int:
        """Device-specific feature bits to offer (the transport adds VERSION_1 etc.)."""
        return self._offered

    @property
    def negotiated_features(self) -> int:
        return self._negotiated

    def features_acceptable(self, bits: int) -> bool:
        """Whether the driver's device-specific feature bits can be honoured (FEATURES_OK)."""
        return _validate_features(bits & wire.DEVICE_FEATURE_MASK, self._offered) is None

    def set_features(self, bits: int) -> bool:
        """Record the driver's features; bits above 23 (transport) are ignored.

        Returns False, keeping nothing negotiated, when the set is not acceptable, so that the
        transport can refuse FEATURES_OK.
        """
        device_bits = bits & wire.DEVICE_FEATURE_MASK
        if not self.features_acceptable(device_bits):
            self._negotiated = 0
            return False
        self._negotiated = device_bits
        return True

    def _has(self, feature: int) -> bool:
        return bool(self._negotiated & feature)

    @property
    def late_tx_ack(self) -> bool:
        return self._has(wire.F_LATE_TX_ACK)

    # --- controller -----------------------------------------------------------------------
    @property
    def state(self) -> ControllerState:
        return self._state

    @property
    def started(self) -> bool:
        return self._state is ControllerState.STARTED

    @property
    def status(self) -> int:
        return self._status

    def config_bytes(self) -> bytes:
        """The device config space: ``le16 status``."""
        return wire.CONFIG.pack(self._status)

    def reset(self) -> None:
        """Device reset: forget features, stop the controller; config and counters are kept."""
        self._negotiated = 0
        self._state = ControllerState.STOPPED

    def handle_control(self, request: bytes | bytearray | memoryview) -> int:
        """Apply a control request and return the result byte.

        START and STOP are idempotent (§8.5): a repeated one answers OK. START clears the
        bus-off bit (status is updated before the answer, so no config notification is needed).
        Whenever :attr:`started` is False afterwards, every pending TX of this link must be
        completed with NOT_OK (entering STOPPED cancels them).
        """
        if len(request) < wire.CONTROL_REQUEST.size:
            raise CanRequestError(f"control request of {len(request)} bytes has no msg_type")
        (msg_type,) = wire.CONTROL_REQUEST.unpack_from(request)
        self.metrics.control_count += 1
        if msg_type == wire.VIRTIO_CAN_SET_CTRL_MODE_START:
            self._status &= ~wire.VIRTIO_CAN_S_CTRL_BUSOFF
            self._state = ControllerState.STARTED
            return wire.VIRTIO_CAN_RESULT_OK
        if msg_type == wire.VIRTIO_CAN_SET_CTRL_MODE_STOP:
            self._state = ControllerState.STOPPED
            return wire.VIRTIO_CAN_RESULT_OK
        if msg_type == wire.VIRTIO_CAN_IVV_BUSOFF_REPORT and \
                self._negotiated & wire.F_IVV_BUSOFF_REPORT:
            self.bus_off_reports += 1  # the runner turns it into the switch-wide bus-off flow
            return wire.VIRTIO_CAN_RESULT_OK
        if msg_type == wire.VIRTIO_CAN_IVV_ERROR_REPORT and self._has(wire.F_IVV_ERROR_STATE):
            report = wire.ErrorReport.decode(request)
            if report is not None:
                self.metrics.error_reports += 1
                self.error_reports.append(report)  # the runner shows it to the other links
                return wire.VIRTIO_CAN_RESULT_OK
        self.metrics.control_fails += 1
        return wire.VIRTIO_CAN_RESULT_NOT_OK

    def bus_off(self) -> BusOffEffects:
        """The controller went bus-off: set the status bit and enter STOPPED.

        A later START (``ip link`` restart) recovers.
        """
        newly = not self._status & wire.VIRTIO_CAN_S_CTRL_BUSOFF
        was_started = self.started
        self._status |= wire.VIRTIO_CAN_S_CTRL_BUSOFF
        self._state = ControllerState.STOPPED
        if newly:
            self.metrics.bus_off_count += 1
        return BusOffEffects(notify_config=newly, fail_pending_tx=was_started)

    @property
    def error_state_ext(self) -> bool:
        """Whether this link negotiated the error-state extension (bit 22)."""
        return self._has(wire.F_IVV_ERROR_STATE)

    def set_error_state(self, state: int) -> bool:
        """Show the switch's error state in ``status`` (only with bit 22); True if it changed."""
        if not self.error_state_ext:
            return False
        bits = (wire.VIRTIO_CAN_S_IVV_ERROR_PASSIVE if state == wire.CAN_STATE_ERROR_PASSIVE
                else wire.VIRTIO_CAN_S_IVV_ERROR_WARNING if state == wire.CAN_STATE_ERROR_WARNING
                else 0)
        mask = wire.VIRTIO_CAN_S_IVV_ERROR_PASSIVE | wire.VIRTIO_CAN_S_IVV_ERROR_WARNING
        new = (self._status & ~mask) | bits
        changed = new != self._status
        self._status = new
        return changed

    def rx_encode_error(self, frame: wire.CanErrorFrame, buffer_len: int) -> bytes | None:
        """RX bytes of an error frame, or None (not negotiated, stopped, buffer too small)."""
        if not self.error_state_ext:
            return None
        if not self.started:
            self._drop("rx_dropped_stopped")
            return None
        if buffer_len < wire.FRAME_HEADER_SIZE + wire.CAN_ERR_DLC:
            self._drop("rx_dropped_small_buffer")
            return None
        self.metrics.error_frames += 1
        return wire.encode_error_frame(frame)

    # --- frame types ----------------------------------------------------------------------
    def supports(self, frame: CanFrame) -> bool:
        """Whether this link negotiated the frame's type (the same rule for TX and RX)."""
        if frame.rtr:
            return self._has(wire.F_RTR_FRAMES) and self._has(wire.F_CAN_CLASSIC)
        return self._has(wire.F_CAN_FD if frame.fd else wire.F_CAN_CLASSIC)

    # --- TX -------------------------------------------------------------------------------
    def handle_tx(self, request: bytes | bytearray | memoryview) -> TxDecision:
        """Validate the readable part of a TX request (header + payload).

        Raises :class:`CanRequestError` when it is shorter than the 16-byte header (§8.6);
        every other fault is a :class:`TxReject` (NOT_OK, nothing sent).
        """
        if len(request) < wire.FRAME_HEADER_SIZE:
            raise CanRequestError(
                f"TX request of {len(request)} bytes < {wire.FRAME_HEADER_SIZE}-byte header"
            )
        try:
            frame = wire.decode_frame(request, wire.VIRTIO_CAN_TX)
        except CanFrameError as exc:
            return self._reject(exc.fault.value)
        # Checked after decoding so that a malformed frame reports its wire fault.
        if not self.started:
            return self._reject(RejectReason.STOPPED.value)
        if not self.supports(frame):
            return self._reject(RejectReason.NOT_NEGOTIATED.value)
        self.metrics.tx_count += 1
        self.metrics.tx_bytes += len(frame.data)
        return TxSend(frame, self.late_tx_ack)

    def _reject(self, reason: str) -> TxReject:
        self.metrics.tx_fails += 1
        return TxReject(reason)

    # --- RX -------------------------------------------------------------------------------
    def accepts(self, frame: CanFrame) -> bool:
        """Whether a frame from the bus or another link may be delivered to this link now."""
        return self.started and self.supports(frame)

    def admit(self, frame: CanFrame) -> bool:
        """:meth:`accepts`, counting the frame as dropped for this link when it does not."""
        if not self.started:
            self._drop("rx_dropped_stopped")
            return False
        if not self.supports(frame):
            self._drop("rx_dropped_unsupported")
            return False
        return True

    def rx_encode(self, frame: CanFrame, buffer_len: int) -> bytes | None:
        """The bytes to write into an RX buffer of ``buffer_len`` bytes, or None.

        Exactly 16 + length bytes for a data frame and 16 for an RTR frame (§8.1); the runner
        reports their size as the used length. None means: hand the buffer back with used
        length 0 and move on (§8.2); the drop is already counted. A frame this link no longer
        accepts (it stopped since the frame was queued) also gives None, so check
        :meth:`accepts` first to avoid spending a buffer on it.
        """
        if not self.admit(frame):
            return None
        if buffer_len < frame.wire_size:
            self._drop("rx_dropped_small_buffer")
            return None
        self.metrics.rx_count += 1
        self.metrics.rx_bytes += len(frame.data)
        return wire.encode_frame(frame, wire.VIRTIO_CAN_RX)

    def _drop(self, counter: str) -> None:
        self.metrics.rx_dropped += 1
        setattr(self.metrics, counter, getattr(self.metrics, counter) + 1)


class _Bus(Enum):
    BUS = "bus"


#: The switch target meaning "the CAN bus resource" (python-can bus, MCP2515 inmate, ...).
BUS: Final = _Bus.BUS

LinkId = Hashable
Target = LinkId | _Bus


class CanSwitch:
    """Software CAN switch: one bus shared by several links.

    Pure routing: it returns destinations in attach order and the runner appends to per-
    destination FIFOs in call order, which keeps FIFO order per destination. A frame is never
    echoed to the link that sent it (§8.7); links that do not accept a frame get it counted as
    dropped (§8.3, §8.5).
    """

    def __init__(self, *, has_bus: bool = True) -> None:
        self._links: dict[LinkId, CanLinkModel] = {}
        self.has_bus = has_bus

    def attach(self, link_id: LinkId, link: CanLinkModel) -> None:
        if link_id in self._links or link_id is BUS:
            raise ValueError(f"link id {link_id!r} already in use")
        self._links[link_id] = link

    def detach(self, link_id: LinkId) -> CanLinkModel:
        return self._links.pop(link_id)

    def link(self, link_id: LinkId) -> CanLinkModel:
        return self._links[link_id]

    @property
    def link_ids(self) -> list[LinkId]:
        return list(self._links)

    def from_link(self, link_id: LinkId, frame: CanFrame) -> list[tuple[Target, CanFrame]]:
        """Destinations of a frame a link sent: the bus, then every OTHER accepting link."""
        if link_id not in self._links:
            raise KeyError(link_id)
        out: list[tuple[Target, CanFrame]] = [(BUS, frame)] if self.has_bus else []
        out.extend(
            (other_id, frame)
            for other_id, other in self._links.items()
            if other_id != link_id and other.admit(frame)
        )
        return out

    def from_bus(self, frame: CanFrame) -> list[LinkId]:
        """Links that accept a frame received from the bus."""
        return [link_id for link_id, link in self._links.items() if link.admit(frame)]

    def bus_off(self) -> dict[LinkId, BusOffEffects]:
        """The shared controller went bus-off: every link sees it."""
        return {link_id: link.bus_off() for link_id, link in self._links.items()}
