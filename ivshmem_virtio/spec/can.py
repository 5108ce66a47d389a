"""virtio-can wire format (OASIS virtio 1.4, device ID 36): constants, layouts, frame codec.

Wire format only: no device state, no transport. Feature bits follow the *spec* numbering
(RTR_FRAMES = 2, LATE_TX_ACK = 3); the RFC..v5 Linux driver and the OpenSynergy QEMU RFC swap them.
CAN identifiers are bare 11/29-bit values: SocketCAN's EFF/RTR/ERR bits never appear in ``can_id``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import can

# --- Identity -------------------------------------------------------------------------------
VIRTIO_ID_CAN: Final = 36
#: ivshmem PCI class protocol of the back end (device side): 0xC000 | device id.
IVSHMEM_PROTOCOL_CAN_BACKEND: Final = 0xC000 | VIRTIO_ID_CAN
#: ivshmem PCI class protocol of the front end (driver side): 0x8000 | device id.
IVSHMEM_PROTOCOL_CAN_FRONTEND: Final = 0x8000 | VIRTIO_ID_CAN

# --- Virtqueues -----------------------------------------------------------------------------
TXQ: Final = 0
RXQ: Final = 1
CONTROLQ: Final = 2
NUM_QUEUES: Final = 3

# --- Feature bits (bit numbers, spec numbering) ---------------------------------------------
VIRTIO_CAN_F_CAN_CLASSIC: Final = 0
VIRTIO_CAN_F_CAN_FD: Final = 1
VIRTIO_CAN_F_RTR_FRAMES: Final = 2
VIRTIO_CAN_F_LATE_TX_ACK: Final = 3

F_CAN_CLASSIC: Final = 1 << VIRTIO_CAN_F_CAN_CLASSIC
F_CAN_FD: Final = 1 << VIRTIO_CAN_F_CAN_FD
F_RTR_FRAMES: Final = 1 << VIRTIO_CAN_F_RTR_FRAMES
F_LATE_TX_ACK: Final = 1 << VIRTIO_CAN_F_LATE_TX_ACK
#: Project extension (rtos_inmate/README-virtio.md): a driver whose own CAN controller sits
#: behind it (the RTOS inmate's MCP2515) may report that controller's bus-off to the device with
#: the control request VIRTIO_CAN_IVV_BUSOFF_REPORT. Bit 23: the top of the device-specific range,
#: far from any bit the OASIS spec may assign next.
VIRTIO_CAN_F_IVV_BUSOFF_REPORT: Final = 23
F_IVV_BUSOFF_REPORT: Final = 1 << VIRTIO_CAN_F_IVV_BUSOFF_REPORT
#: Project extension (docs/protocol.md, virtio-can decisions): the controller's error state beyond
#: bus-off, which virtio-can has no way to carry. A driver with its own controller behind it (the
#: RTOS inmate) reports error-warning / error-passive / RX overflow with the control request
#: VIRTIO_CAN_IVV_ERROR_REPORT; the device shows the state in the config status
#: (VIRTIO_CAN_S_IVV_ERROR_*) and delivers SocketCAN-style error frames (VIRTIO_CAN_FLAGS_IVV_ERROR)
#: to every other link that negotiated the bit. Bit 22: next to bit 23, far from the spec's 0-3.
VIRTIO_CAN_F_IVV_ERROR_STATE: Final = 22
F_IVV_ERROR_STATE: Final = 1 << VIRTIO_CAN_F_IVV_ERROR_STATE
#: Every device-specific feature this module knows.
F_ALL: Final = (F_CAN_CLASSIC | F_CAN_FD | F_RTR_FRAMES | F_LATE_TX_ACK
                | F_IVV_BUSOFF_REPORT | F_IVV_ERROR_STATE)
#: virtio reserves bits 0..23 for device-specific features; transport bits sit above.
DEVICE_FEATURE_MASK: Final = (1 << 24) - 1

# --- Message types --------------------------------------------------------------------------
VIRTIO_CAN_TX: Final = 0x0001
VIRTIO_CAN_RX: Final = 0x0101
VIRTIO_CAN_SET_CTRL_MODE_START: Final = 0x0201
VIRTIO_CAN_SET_CTRL_MODE_STOP: Final = 0x0202
#: Project extension, only with F_IVV_BUSOFF_REPORT: "the controller behind this driver is
#: bus-off"; the device runs its bus-off flow for the whole switch.
VIRTIO_CAN_IVV_BUSOFF_REPORT: Final = 0x02F0
#: Project extension, only with F_IVV_ERROR_STATE: the controller behind this driver changed its
#: error state or lost frames (RX overflow); the body is :data:`ERROR_REPORT`.
VIRTIO_CAN_IVV_ERROR_REPORT: Final = 0x02F1

# --- Frame flags ----------------------------------------------------------------------------
VIRTIO_CAN_FLAGS_EXTENDED: Final = 0x8000
VIRTIO_CAN_FLAGS_FD: Final = 0x4000
VIRTIO_CAN_FLAGS_RTR: Final = 0x2000
#: Any flag bit outside this mask is undefined and makes a TX request NOT_OK.
VIRTIO_CAN_FLAGS_KNOWN: Final = (
    VIRTIO_CAN_FLAGS_EXTENDED | VIRTIO_CAN_FLAGS_FD | VIRTIO_CAN_FLAGS_RTR
)

#: Project extension, only to a link that negotiated F_IVV_ERROR_STATE: an error frame. ``can_id``
#: is a SocketCAN error class (CAN_ERR_*), ``length`` 8 and the payload SocketCAN's 8 error bytes,
#: so it maps 1:1 onto a python-can or SocketCAN error frame. The top bit of the le32 ``flags``: far
#: from the bits the spec assigns (0x2000-0x8000) and may assign next.
VIRTIO_CAN_FLAGS_IVV_ERROR: Final = 0x80000000

# --- Results --------------------------------------------------------------------------------
VIRTIO_CAN_RESULT_OK: Final = 0
#: Any value other than OK counts as NOT_OK for the driver; the device only ever writes 1.
VIRTIO_CAN_RESULT_NOT_OK: Final = 1
RESULT_SIZE: Final = 1

# --- Config space ---------------------------------------------------------------------------
VIRTIO_CAN_S_CTRL_BUSOFF: Final = 1 << 0
#: Project extension, only with F_IVV_ERROR_STATE: the controller is error-warning (an error
#: counter >= 96) / error-passive (>= 128). Top bits of ``status``, far from the spec's bit 0.
VIRTIO_CAN_S_IVV_ERROR_WARNING: Final = 1 << 14
VIRTIO_CAN_S_IVV_ERROR_PASSIVE: Final = 1 << 15
#: ``struct virtio_can_config { le16 status; }``
CONFIG: Final = struct.Struct("<H")
CONFIG_SIZE: Final = CONFIG.size

# --- Control request ------------------------------------------------------------------------
#: Control request, driver-readable part: ``le16 msg_type``; a writable ``u8 result`` follows.
CONTROL_REQUEST: Final = struct.Struct("<H")

# --- Error report (project extension, F_IVV_ERROR_STATE) -----------------------------------
#: ``le16 msg_type (0x02F1); u8 state; u8 crtl; u8 txerr; u8 rxerr; le16 rx_overflows``, then the
#: writable ``u8 result``. ``state`` is Linux's ``enum can_state`` (0 active, 1 warning,
#: 2 passive; bus-off has its own request), ``crtl`` the CAN_ERR_CRTL_* bits of SocketCAN's
#: ``data[1]`` as Linux's mcp251x would set them, ``txerr``/``rxerr`` the TEC/REC counters and
#: ``rx_overflows`` the frames lost to RX overflow since the previous report (saturating).
ERROR_REPORT: Final = struct.Struct("<HBBBBH")
ERROR_REPORT_SIZE: Final = ERROR_REPORT.size  # 8
assert ERROR_REPORT_SIZE == 8
CAN_STATE_ERROR_ACTIVE: Final = 0
CAN_STATE_ERROR_WARNING: Final = 1
CAN_STATE_ERROR_PASSIVE: Final = 2
#: SocketCAN error classes and controller bits (linux/can/error.h), used in error frames.
CAN_ERR_CRTL: Final = 0x00000004
CAN_ERR_CNT: Final = 0x00000200
CAN_ERR_DLC: Final = 8
CAN_ERR_CRTL_RX_OVERFLOW: Final = 0x01
CAN_ERR_CRTL_TX_OVERFLOW: Final = 0x02
CAN_ERR_CRTL_RX_WARNING: Final = 0x04
CAN_ERR_CRTL_TX_WARNING: Final = 0x08
CAN_ERR_CRTL_RX_PASSIVE: Final = 0x10
CAN_ERR_CRTL_TX_PASSIVE: Final = 0x20
CAN_ERR_CRTL_ACTIVE: Final = 0x40


@dataclass(frozen=True, slots=True)
class ErrorReport:
    """A decoded VIRTIO_CAN_IVV_ERROR_REPORT body: what the controller behind a driver saw."""

    state: int
    crtl: int
    txerr: int
    rxerr: int
    rx_overflows: int

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> ErrorReport | None:
        """None when the request is short or names a state that is not active/warning/passive."""
        if len(buf) < ERROR_REPORT_SIZE:
            return None
        _msg, state, crtl, txerr, rxerr, ovr = ERROR_REPORT.unpack_from(buf)
        if state > CAN_STATE_ERROR_PASSIVE:
            return None
        return cls(state, crtl, txerr, rxerr, ovr)

    def encode(self) -> bytes:
        return ERROR_REPORT.pack(VIRTIO_CAN_IVV_ERROR_REPORT, self.state, self.crtl,
                                 self.txerr, self.rxerr, self.rx_overflows)


@dataclass(frozen=True, slots=True)
class CanErrorFrame:
    """A SocketCAN-style error frame: ``can_id`` = CAN_ERR_* classes, 8 data bytes."""

    can_id: int
    data: bytes

    @classmethod
    def from_report(cls, report: ErrorReport) -> CanErrorFrame:
        """The frame mcp251x would emit for this report (controller class, counters)."""
        data = bytes((0, report.crtl, 0, 0, 0, 0, report.txerr, report.rxerr))
        return cls(CAN_ERR_CRTL | CAN_ERR_CNT, data)


def encode_error_frame(frame: CanErrorFrame) -> bytes:
    """RX bytes of an error frame: header with VIRTIO_CAN_FLAGS_IVV_ERROR + 8 bytes."""
    header = FRAME_HEADER.pack(VIRTIO_CAN_RX, CAN_ERR_DLC, 0, 0, 0, VIRTIO_CAN_FLAGS_IVV_ERROR,
                               frame.can_id)
    return header + frame.data[:CAN_ERR_DLC].ljust(CAN_ERR_DLC, b"\0")


def decode_error_frame(buf: bytes | bytearray | memoryview) -> CanErrorFrame | None:
    """The error frame in RX bytes, or None when they are not one (then use decode_frame)."""
    if len(buf) < FRAME_HEADER_SIZE + CAN_ERR_DLC:
        return None
    msg_type, length, _d, _p, _x, flags, can_id = FRAME_HEADER.unpack_from(buf)
    if msg_type != VIRTIO_CAN_RX or flags != VIRTIO_CAN_FLAGS_IVV_ERROR or length != CAN_ERR_DLC:
        return None
    return CanErrorFrame(can_id & CAN_EFF_MASK,
                         bytes(buf[FRAME_HEADER_SIZE:FRAME_HEADER_SIZE + CAN_ERR_DLC]))


def error_frame_to_message(frame: CanErrorFrame, *, timestamp: float = 0.0,
                           channel: str | int | None = None) -> can.Message:
    """A python-can error frame, as python-can's socketcan interface presents one."""
    return can.Message(timestamp=timestamp, arbitration_id=frame.can_id, is_extended_id=False,
                       is_error_frame=True, dlc=CAN_ERR_DLC, data=frame.data, channel=channel,
                       is_rx=True)


# --- Frame header ---------------------------------------------------------------------------
#: msg_type, length, reserved_classic_dlc, padding, reserved_xl_priority, flags, can_id.
FRAME_HEADER: Final = struct.Struct("<HHBBHII")
FRAME_HEADER_SIZE: Final = FRAME_HEADER.size  # 16
assert FRAME_HEADER_SIZE == 16

CAN_SFF_MASK: Final = 0x7FF
CAN_EFF_MASK: Final = 0x1FFFFFFF
CAN_CLASSIC_MAX_LEN: Final = 8
CAN_FD_MAX_LEN: Final = 64
#: Payload sizes a CAN FD frame can carry (DLC 0..15).
CAN_FD_LENGTHS: Final = frozenset((*range(9), 12, 16, 20, 24, 32, 48, 64))
#: RX buffer sizes the Linux driver posts: classic-only links and FD links.
RX_BUFFER_SIZE_CLASSIC: Final = FRAME_HEADER_SIZE + CAN_CLASSIC_MAX_LEN  # 24
RX_BUFFER_SIZE_FD: Final = FRAME_HEADER_SIZE + CAN_FD_MAX_LEN  # 80


class FrameFault(StrEnum):
    """Why bytes are not a valid virtio-can frame; stable keys for logs and tests."""

    SHORT_HEADER = "short_header"
    MSG_TYPE = "msg_type"
    UNDEFINED_FLAGS = "undefined_flags"
    RTR_WITH_FD = "rtr_with_fd"
    ID_RANGE = "id_range"
    LENGTH = "length"
    FD_LENGTH = "fd_length"
    SHORT_PAYLOAD = "short_payload"


class CanFrameError(ValueError):
    """Bytes or a message that cannot be a valid virtio-can frame."""

    def __init__(self, fault: FrameFault, detail: str = "") -> None:
        super().__init__(f"{fault.value}: {detail}" if detail else fault.value)
        self.fault = fault


def _frame_fault(
    can_id: int, length: int, extended: bool, fd: bool, rtr: bool
) -> tuple[FrameFault, str] | None:
    """Single place for the frame-level rules, shared by the codec and the dataclass."""
    if rtr and fd:
        return FrameFault.RTR_WITH_FD, "RTR frames are classic only"
    limit = CAN_EFF_MASK if extended else CAN_SFF_MASK
    if not 0 <= can_id <= limit:
        return FrameFault.ID_RANGE, f"can_id {can_id:#x} > {limit:#x}"
    if fd:
        if not 0 <= length <= CAN_FD_MAX_LEN:
            return FrameFault.LENGTH, f"FD length {length} > {CAN_FD_MAX_LEN}"
        if length not in CAN_FD_LENGTHS:
            return FrameFault.FD_LENGTH, f"FD length {length} is not a valid FD size"
    elif not 0 <= length <= CAN_CLASSIC_MAX_LEN:
        return FrameFault.LENGTH, f"classic length {length} > {CAN_CLASSIC_MAX_LEN}"
    return None


@dataclass(frozen=True, slots=True)
class CanFrame:
    """One valid CAN frame as virtio-can carries it; invalid combinations cannot be built.

    ``dlc`` follows python-can: the payload length in bytes for data frames (classic or FD), and
    the requested DLC (0..8) for RTR frames, which carry no payload.
    """

    can_id: int
    data: bytes
    extended: bool
    fd: bool
    rtr: bool
    dlc: int

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes):
            object.__setattr__(self, "data", bytes(self.data))
        if self.rtr:
            if self.data:
                raise CanFrameError(FrameFault.LENGTH, "an RTR frame carries no payload")
        elif self.dlc != len(self.data):
            raise CanFrameError(FrameFault.LENGTH, f"dlc {self.dlc} != {len(self.data)} bytes")
        fault = _frame_fault(self.can_id, self.dlc, self.extended, self.fd, self.rtr)
        if fault is not None:
            raise CanFrameError(*fault)

    @classmethod
    def data_frame(
        cls, can_id: int, data: bytes, *, extended: bool = False, fd: bool = False
    ) -> CanFrame:
        """A data frame; ``dlc`` is derived from the payload."""
        return cls(can_id, bytes(data), extended, fd, False, len(data))

    @classmethod
    def remote_frame(cls, can_id: int, dlc: int, *, extended: bool = False) -> CanFrame:
        """A classic RTR frame requesting ``dlc`` bytes."""
        return cls(can_id, b"", extended, False, True, dlc)

    @property
    def flags(self) -> int:
        """The virtio-can ``flags`` word for this frame."""
        return (
            (VIRTIO_CAN_FLAGS_EXTENDED if self.extended else 0)
            | (VIRTIO_CAN_FLAGS_FD if self.fd else 0)
            | (VIRTIO_CAN_FLAGS_RTR if self.rtr else 0)
        )

    @property
    def length(self) -> int:
        """The header's ``length`` field: the DLC for RTR frames, else the payload size."""
        return self.dlc

    @property
    def wire_size(self) -> int:
        """Bytes of header + payload: 16 + length for data frames, 16 for RTR frames."""
        return FRAME_HEADER_SIZE + len(self.data)


def encode_frame(frame: CanFrame, msg_type: int = VIRTIO_CAN_RX) -> bytes:
    """Header + payload, exactly ``frame.wire_size`` bytes (project decision §8.1)."""
    header = FRAME_HEADER.pack(msg_type, frame.length, 0, 0, 0, frame.flags, frame.can_id)
    return header + frame.data


def decode_frame(buf: bytes | bytearray | memoryview, msg_type: int = VIRTIO_CAN_TX) -> CanFrame:
    """Parse and validate untrusted header + payload bytes.

    Every wire rule is checked before the payload is sliced (check before copy); bytes past
    16 + length are ignored. The reserved fields are ignored, as the spec asks senders to zero
    them. Raises :class:`CanFrameError` with a :class:`FrameFault`.
    """
    if len(buf) < FRAME_HEADER_SIZE:
        raise CanFrameError(FrameFault.SHORT_HEADER, f"{len(buf)} < {FRAME_HEADER_SIZE} bytes")
    got_type, length, _dlc, _pad, _prio, flags, can_id = FRAME_HEADER.unpack_from(buf)
    if got_type != msg_type:
        raise CanFrameError(FrameFault.MSG_TYPE, f"msg_type {got_type:#06x} != {msg_type:#06x}")
    if flags & ~VIRTIO_CAN_FLAGS_KNOWN:
        raise CanFrameError(FrameFault.UNDEFINED_FLAGS, f"flags {flags:#x}")
    extended = bool(flags & VIRTIO_CAN_FLAGS_EXTENDED)
    fd = bool(flags & VIRTIO_CAN_FLAGS_FD)
    rtr = bool(flags & VIRTIO_CAN_FLAGS_RTR)
    fault = _frame_fault(can_id, length, extended, fd, rtr)
    if fault is not None:
        raise CanFrameError(*fault)
    if rtr:
        return CanFrame(can_id, b"", extended, False, True, length)
    end = FRAME_HEADER_SIZE + length
    if len(buf) < end:
        raise CanFrameError(FrameFault.SHORT_PAYLOAD, f"{len(buf)} < {end} bytes")
    return CanFrame(can_id, bytes(buf[FRAME_HEADER_SIZE:end]), extended, fd, False, length)


def frame_from_message(msg: can.Message) -> CanFrame:
    """Convert a python-can message; error frames and invalid messages raise CanFrameError.

    FD is taken from ``msg.is_fd`` (the frame's flags), never from an interface name. BRS/ESI are
    not carried by virtio-can and are dropped.
    """
    if msg.is_error_frame:
        raise CanFrameError(FrameFault.UNDEFINED_FLAGS, "error frames are not carried")
    if msg.is_remote_frame:
        return CanFrame(msg.arbitration_id, b"", msg.is_extended_id, msg.is_fd, True, msg.dlc)
    data = bytes(msg.data)
    return CanFrame(msg.arbitration_id, data, msg.is_extended_id, msg.is_fd, False, len(data))


def encode_message(msg: can.Message, msg_type: int = VIRTIO_CAN_TX) -> bytes:
    """``encode_frame(frame_from_message(msg), msg_type)`` without the CanFrame in between:
    the same rules and errors, one call (python-can's ``send`` path pays each call twice or
    three times over when its thread wakes from a sleep: the CPU's caches went cold)."""
    if msg.is_error_frame:
        raise CanFrameError(FrameFault.UNDEFINED_FLAGS, "error frames are not carried")
    extended = msg.is_extended_id
    if msg.is_remote_frame:
        rtr, fd, data, length = True, msg.is_fd, b"", msg.dlc
    else:
        rtr, fd = False, msg.is_fd
        data = bytes(msg.data)
        length = len(data)
    fault = _frame_fault(msg.arbitration_id, length, extended, fd, rtr)
    if fault is not None:
        raise CanFrameError(*fault)
    flags = ((VIRTIO_CAN_FLAGS_EXTENDED if extended else 0) | (VIRTIO_CAN_FLAGS_FD if fd else 0)
             | (VIRTIO_CAN_FLAGS_RTR if rtr else 0))
    return FRAME_HEADER.pack(msg_type, length, 0, 0, 0, flags, msg.arbitration_id) + data


def frame_to_message(
    frame: CanFrame,
    *,
    timestamp: float = 0.0,
    channel: str | int | None = None,
    is_rx: bool = True,
) -> can.Message:
    """Convert to a python-can message (``dlc`` = byte length, or the DLC for RTR frames)."""
    return can.Message(
        timestamp=timestamp,
        arbitration_id=frame.can_id,
        is_extended_id=frame.extended,
        is_remote_frame=frame.rtr,
        is_fd=frame.fd,
        dlc=frame.dlc,
        data=None if frame.rtr else frame.data,
        channel=channel,
        is_rx=is_rx,
        check=True,
    )
