"""Unit tests of the virtio-can wire format and the pure device model (can.md §1, §8)."""

from __future__ import annotations

import struct

import can
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ivshmem_virtio.backend.devices.can import (
    BUS,
    BusOffEffects,
    CanLinkModel,
    CanRequestError,
    CanSwitch,
    ControllerState,
    TxReject,
    TxSend,
)
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import CanFrame, CanFrameError, FrameFault

OK = wire.VIRTIO_CAN_RESULT_OK
NOT_OK = wire.VIRTIO_CAN_RESULT_NOT_OK
START = struct.pack("<H", wire.VIRTIO_CAN_SET_CTRL_MODE_START)
STOP = struct.pack("<H", wire.VIRTIO_CAN_SET_CTRL_MODE_STOP)
CLASSIC_ONLY = wire.F_CAN_CLASSIC
INVALID_FD_LENGTHS = sorted(set(range(9, 65)) - wire.CAN_FD_LENGTHS)


def raw(
    can_id: int = 0x123,
    data: bytes = b"",
    flags: int = 0,
    length: int | None = None,
    msg_type: int = wire.VIRTIO_CAN_TX,
) -> bytes:
    """A hand-built request, independent of the codec under test."""
    n = len(data) if length is None else length
    return struct.pack("<HHBBHII", msg_type, n, 0, 0, 0, flags, can_id) + data


def started_link(features: int = wire.F_ALL) -> CanLinkModel:
    link = CanLinkModel()
    assert link.set_features(features)
    assert link.handle_control(START) == OK
    return link


def assert_reject(link: CanLinkModel, request: bytes, reason: str) -> None:
    fails = link.metrics.tx_fails
    decision = link.handle_tx(request)
    assert isinstance(decision, TxReject)
    assert decision.result == NOT_OK
    assert decision.reason == reason
    assert link.metrics.tx_fails == fails + 1


# --- constants and layout -------------------------------------------------------------------


def test_constants_follow_spec_numbering() -> None:
    assert wire.VIRTIO_ID_CAN == 36
    assert (wire.IVSHMEM_PROTOCOL_CAN_BACKEND, wire.IVSHMEM_PROTOCOL_CAN_FRONTEND) == (
        0xC024,
        0x8024,
    )
    assert (
        wire.VIRTIO_CAN_F_CAN_CLASSIC,
        wire.VIRTIO_CAN_F_CAN_FD,
        wire.VIRTIO_CAN_F_RTR_FRAMES,
        wire.VIRTIO_CAN_F_LATE_TX_ACK,
    ) == (0, 1, 2, 3)
    assert (wire.VIRTIO_CAN_TX, wire.VIRTIO_CAN_RX) == (0x0001, 0x0101)
    assert wire.VIRTIO_CAN_SET_CTRL_MODE_START == 0x0201
    assert wire.VIRTIO_CAN_SET_CTRL_MODE_STOP == 0x0202
    assert (wire.VIRTIO_CAN_FLAGS_EXTENDED, wire.VIRTIO_CAN_FLAGS_FD) == (0x8000, 0x4000)
    assert wire.VIRTIO_CAN_FLAGS_RTR == 0x2000
    assert (OK, NOT_OK, wire.VIRTIO_CAN_S_CTRL_BUSOFF) == (0, 1, 1)
    assert wire.CONFIG_SIZE == 2
    assert wire.FRAME_HEADER.size == 16
    assert (wire.RX_BUFFER_SIZE_CLASSIC, wire.RX_BUFFER_SIZE_FD) == (24, 80)
    assert wire.CAN_FD_LENGTHS == {0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64}


def test_header_field_offsets() -> None:
    frame = CanFrame.data_frame(0x1ABCDEF0, b"\xaa\xbb", extended=True, fd=True)
    buf = wire.encode_frame(frame, wire.VIRTIO_CAN_RX)
    assert buf[0:2] == b"\x01\x01"  # msg_type RX
    assert buf[2:4] == b"\x02\x00"  # length
    assert buf[4:8] == b"\x00" * 4  # reserved_classic_dlc, padding, reserved_xl_priority
    assert buf[8:12] == (0xC000).to_bytes(4, "little")  # EXTENDED | FD
    assert buf[12:16] == (0x1ABCDEF0).to_bytes(4, "little")  # bare id, no EFF bit
    assert buf[16:] == b"\xaa\xbb"


def test_decode_ignores_trailing_bytes_and_reserved_fields() -> None:
    buf = bytearray(raw(0x10, b"\x01\x02") + b"\xff" * 10)
    buf[4:8] = b"\x0f\x01\x02\x03"
    assert wire.decode_frame(buf) == CanFrame.data_frame(0x10, b"\x01\x02")


def test_decode_from_memoryview() -> None:
    buf = memoryview(bytearray(raw(0x7FF, b"abc")))
    frame = wire.decode_frame(buf)
    assert frame.data == b"abc" and isinstance(frame.data, bytes)


@pytest.mark.parametrize(
    ("kwargs", "fault"),
    [
        ({"can_id": 0x800}, FrameFault.ID_RANGE),
        ({"can_id": 0x20000000, "extended": True}, FrameFault.ID_RANGE),
        ({"can_id": -1}, FrameFault.ID_RANGE),
        ({"data": bytes(9)}, FrameFault.LENGTH),
        ({"data": bytes(65), "fd": True}, FrameFault.LENGTH),
        ({"data": bytes(10), "fd": True}, FrameFault.FD_LENGTH),
    ],
)
def test_frame_cannot_be_built_invalid(kwargs: dict, fault: FrameFault) -> None:
    args = {"can_id": 1, "data": b""} | kwargs
    with pytest.raises(CanFrameError) as info:
        CanFrame.data_frame(**args)
    assert info.value.fault is fault


def test_frame_invariants() -> None:
    with pytest.raises(CanFrameError):
        CanFrame(1, b"\x00", False, False, True, 1)  # RTR with payload
    with pytest.raises(CanFrameError):
        CanFrame(1, b"", False, True, True, 0)  # RTR + FD
    with pytest.raises(CanFrameError):
        CanFrame(1, b"\x00\x01", False, False, False, 3)  # dlc != len(data)
    with pytest.raises(CanFrameError):
        CanFrame.remote_frame(1, 9)
    assert CanFrame(1, bytearray(b"\x01"), False, False, False, 1).data == b"\x01"


# --- controller -------------------------------------------------------------------------------


def test_controller_starts_stopped_and_start_stop_are_idempotent() -> None:
    link = CanLinkModel()
    assert link.state is ControllerState.STOPPED and not link.started
    assert link.handle_control(STOP) == OK  # repeated STOP (already stopped) is OK
    assert link.handle_control(START) == OK
    assert link.handle_control(START) == OK  # repeated START is OK
    assert link.started
    assert link.handle_control(STOP) == OK
    assert link.handle_control(STOP) == OK
    assert not link.started
    assert link.metrics.control_count == 5
    assert link.metrics.control_fails == 0


@pytest.mark.parametrize("msg_type", [0x0000, 0x0001, 0x0101, 0x0200, 0x0203, 0xFFFF])
def test_unknown_control_is_not_ok(msg_type: int) -> None:
    link = CanLinkModel()
    assert link.handle_control(struct.pack("<H", msg_type)) == NOT_OK
    assert link.metrics.control_fails == 1
    assert link.state is ControllerState.STOPPED


def test_control_ignores_trailing_bytes() -> None:
    link = CanLinkModel()
    assert link.handle_control(START + b"\x99") == OK and link.started


@pytest.mark.parametrize("request_bytes", [b"", b"\x01"])
def test_short_control_request_needs_reset(request_bytes: bytes) -> None:
    link = CanLinkModel()
    with pytest.raises(CanRequestError):
        link.handle_control(request_bytes)
    assert link.metrics.control_count == 0


# --- features ---------------------------------------------------------------------------------


def test_offered_features_default_and_validation() -> None:
    assert CanLinkModel().device_features == wire.F_ALL
    assert CanLinkModel(wire.F_CAN_FD).device_features == wire.F_CAN_FD
    with pytest.raises(ValueError):
        CanLinkModel(wire.F_RTR_FRAMES | wire.F_CAN_FD)  # RTR needs CLASSIC
    with pytest.raises(ValueError):
        CanLinkModel(wire.F_LATE_TX_ACK)  # neither CLASSIC nor FD
    with pytest.raises(ValueError):
        CanLinkModel(wire.F_ALL | 1 << 4)  # unknown bit


def test_set_features() -> None:
    link = CanLinkModel(wire.F_CAN_CLASSIC | wire.F_CAN_FD)
    assert link.negotiated_features == 0
    assert link.set_features(wire.F_CAN_CLASSIC | 1 << 32 | 1 << 33)  # transport bits ignored
    assert link.negotiated_features == wire.F_CAN_CLASSIC
    assert not link.set_features(wire.F_CAN_CLASSIC | wire.F_RTR_FRAMES)  # not offered
    assert link.negotiated_features == 0
    assert not link.set_features(0)
    full = CanLinkModel()
    assert not full.set_features(wire.F_RTR_FRAMES | wire.F_CAN_FD)
    assert not full.set_features(wire.F_LATE_TX_ACK)
    assert full.set_features(wire.F_ALL)


def test_reset_forgets_features_and_stops_but_keeps_status() -> None:
    link = started_link()
    link.bus_off()
    link.handle_control(START)
    link.bus_off()
    link.reset()
    assert link.negotiated_features == 0
    assert not link.started
    assert link.status == wire.VIRTIO_CAN_S_CTRL_BUSOFF


# --- TX validation ----------------------------------------------------------------------------


def test_valid_classic_tx_is_sent() -> None:
    link = started_link()
    decision = link.handle_tx(raw(0x123, b"\x01\x02\x03"))
    assert decision == TxSend(CanFrame.data_frame(0x123, b"\x01\x02\x03"), late_ack=True)
    assert link.metrics.tx_count == 1 and link.metrics.tx_bytes == 3


def test_late_ack_only_when_negotiated() -> None:
    link = started_link(wire.F_CAN_CLASSIC)
    decision = link.handle_tx(raw())
    assert isinstance(decision, TxSend) and decision.late_ack is False


@pytest.mark.parametrize("can_id", [0, 0x7FF])
def test_std_id_bounds_accepted(can_id: int) -> None:
    assert isinstance(started_link().handle_tx(raw(can_id)), TxSend)


@pytest.mark.parametrize("can_id", [0, 0x7FF, 0x800, 0x1FFFFFFF])
def test_ext_id_bounds_accepted(can_id: int) -> None:
    decision = started_link().handle_tx(raw(can_id, flags=wire.VIRTIO_CAN_FLAGS_EXTENDED))
    assert isinstance(decision, TxSend) and decision.frame.extended


@pytest.mark.parametrize("can_id", [0x800, 0xFFFF, 0x80000123, 0x40000000, 0x20000000])
def test_std_id_out_of_range_rejected(can_id: int) -> None:
    assert_reject(started_link(), raw(can_id), "id_range")


@pytest.mark.parametrize("can_id", [0x20000000, 0x80000000 | 0x123, 0xFFFFFFFF])
def test_ext_id_out_of_range_rejected(can_id: int) -> None:
    """Includes a SocketCAN EFF-flagged id: those bits never belong in can_id."""
    assert_reject(started_link(), raw(can_id, flags=wire.VIRTIO_CAN_FLAGS_EXTENDED), "id_range")


@pytest.mark.parametrize("bit", [b for b in range(32) if 1 << b & ~wire.VIRTIO_CAN_FLAGS_KNOWN])
def test_every_undefined_flag_bit_rejected(bit: int) -> None:
    assert_reject(started_link(), raw(flags=1 << bit), "undefined_flags")


@pytest.mark.parametrize("length", [9, 15, 64, 0xFFFF])
def test_classic_length_over_8_rejected(length: int) -> None:
    assert_reject(started_link(), raw(data=bytes(length)), "length")


def test_classic_length_field_over_8_without_payload_rejected() -> None:
    """The length is checked before any payload is looked at (check before copy)."""
    assert_reject(started_link(), raw(length=0xFFFF), "length")


@pytest.mark.parametrize("length", [65, 80, 0xFFFF])
def test_fd_length_over_64_rejected(length: int) -> None:
    assert_reject(started_link(), raw(length=length, flags=wire.VIRTIO_CAN_FLAGS_FD), "length")


@pytest.mark.parametrize("length", sorted(wire.CAN_FD_LENGTHS))
def test_every_valid_fd_length_accepted(length: int) -> None:
    link = started_link()
    decision = link.handle_tx(raw(data=bytes(range(length)), flags=wire.VIRTIO_CAN_FLAGS_FD))
    assert isinstance(decision, TxSend)
    assert decision.frame.fd and decision.frame.data == bytes(range(length))


@pytest.mark.parametrize("length", INVALID_FD_LENGTHS)
def test_every_invalid_fd_length_rejected(length: int) -> None:
    request = raw(data=bytes(length), flags=wire.VIRTIO_CAN_FLAGS_FD)
    assert_reject(started_link(), request, "fd_length")


def test_fd_without_can_fd_rejected() -> None:
    request = raw(data=bytes(12), flags=wire.VIRTIO_CAN_FLAGS_FD)
    assert_reject(started_link(wire.F_CAN_CLASSIC), request, "not_negotiated")
    # an FD frame of classic size is still an FD frame
    request = raw(data=bytes(8), flags=wire.VIRTIO_CAN_FLAGS_FD)
    assert_reject(started_link(wire.F_CAN_CLASSIC | wire.F_RTR_FRAMES), request, "not_negotiated")


def test_classic_without_can_classic_rejected() -> None:
    assert_reject(started_link(wire.F_CAN_FD), raw(data=b"\x01"), "not_negotiated")


def test_rtr_without_rtr_frames_rejected() -> None:
    request = raw(length=4, flags=wire.VIRTIO_CAN_FLAGS_RTR)
    assert_reject(started_link(wire.F_CAN_CLASSIC | wire.F_CAN_FD), request, "not_negotiated")


def test_rtr_with_fd_rejected() -> None:
    request = raw(flags=wire.VIRTIO_CAN_FLAGS_RTR | wire.VIRTIO_CAN_FLAGS_FD)
    assert_reject(started_link(), request, "rtr_with_fd")


@pytest.mark.parametrize("msg_type", [0x0000, wire.VIRTIO_CAN_RX, 0x0201, 0x0002])
def test_wrong_msg_type_rejected(msg_type: int) -> None:
    assert_reject(started_link(), raw(msg_type=msg_type), "msg_type")


def test_tx_while_stopped_rejected() -> None:
    link = CanLinkModel()
    link.set_features(wire.F_ALL)
    assert_reject(link, raw(), "stopped")
    link.handle_control(START)
    assert isinstance(link.handle_tx(raw()), TxSend)
    link.handle_control(STOP)
    assert_reject(link, raw(), "stopped")
    assert link.metrics.tx_count == 1


def test_tx_before_features_rejected() -> None:
    link = CanLinkModel()
    link.handle_control(START)
    assert_reject(link, raw(), "not_negotiated")


@pytest.mark.parametrize(("length", "have"), [(1, 0), (8, 7), (8, 0), (64, 63), (12, 8)])
def test_request_shorter_than_header_plus_length_rejected(length: int, have: int) -> None:
    flags = wire.VIRTIO_CAN_FLAGS_FD if length > 8 else 0
    request = raw(data=bytes(have), length=length, flags=flags)
    assert_reject(started_link(), request, "short_payload")


@pytest.mark.parametrize("size", [0, 1, 15])
def test_request_shorter_than_header_needs_reset(size: int) -> None:
    link = started_link()
    with pytest.raises(CanRequestError):
        link.handle_tx(raw(data=bytes(8))[:size])
    assert link.metrics.tx_fails == 0


# --- RTR ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dlc", range(9))
def test_rtr_tx_length_carries_dlc_without_payload(dlc: int) -> None:
    link = started_link()
    decision = link.handle_tx(raw(0x55, length=dlc, flags=wire.VIRTIO_CAN_FLAGS_RTR))
    assert isinstance(decision, TxSend)
    assert decision.frame == CanFrame.remote_frame(0x55, dlc)
    assert link.metrics.tx_bytes == 0


def test_rtr_dlc_over_8_rejected() -> None:
    assert_reject(started_link(), raw(length=9, flags=wire.VIRTIO_CAN_FLAGS_RTR), "length")


@pytest.mark.parametrize("dlc", [0, 3, 8])
def test_rtr_rx_is_16_bytes_with_dlc_in_length(dlc: int) -> None:
    link = started_link()
    frame = CanFrame.remote_frame(0x1234567, dlc, extended=True)
    out = link.rx_encode(frame, wire.RX_BUFFER_SIZE_CLASSIC)
    assert out == raw(
        0x1234567,
        length=dlc,
        flags=wire.VIRTIO_CAN_FLAGS_RTR | wire.VIRTIO_CAN_FLAGS_EXTENDED,
        msg_type=wire.VIRTIO_CAN_RX,
    )
    assert len(out) == 16
    assert link.rx_encode(frame, 16) is not None  # a bare header is enough for RTR


# --- RX -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", range(9))
def test_classic_rx_fits_24_byte_buffer_exactly(length: int) -> None:
    link = started_link()
    frame = CanFrame.data_frame(0x100, bytes(range(length)))
    out = link.rx_encode(frame, wire.RX_BUFFER_SIZE_CLASSIC)
    assert out == raw(0x100, bytes(range(length)), msg_type=wire.VIRTIO_CAN_RX)
    assert len(out) == 16 + length  # never a byte more (§8.1)
    assert link.metrics.rx_count == 1 and link.metrics.rx_bytes == length


@pytest.mark.parametrize("length", [12, 16, 64])
def test_fd_frame_over_8_does_not_fit_24_byte_buffer(length: int) -> None:
    link = started_link()
    frame = CanFrame.data_frame(0x100, bytes(length), fd=True)
    assert link.rx_encode(frame, wire.RX_BUFFER_SIZE_CLASSIC) is None
    assert link.metrics.rx_dropped == 1 and link.metrics.rx_dropped_small_buffer == 1
    assert link.metrics.rx_count == 0
    out = link.rx_encode(frame, wire.RX_BUFFER_SIZE_FD)
    assert out is not None and len(out) == 16 + length


def test_buffer_one_byte_short_is_none() -> None:
    link = started_link()
    frame = CanFrame.data_frame(1, bytes(8))
    assert link.rx_encode(frame, 23) is None
    assert link.rx_encode(frame, 0) is None
    assert link.rx_encode(frame, 24) is not None


def test_no_rx_while_stopped() -> None:
    link = CanLinkModel()
    link.set_features(wire.F_ALL)
    frame = CanFrame.data_frame(1, b"\x01")
    assert not link.accepts(frame)
    assert link.rx_encode(frame, 80) is None
    assert link.metrics.rx_dropped_stopped == 1 and link.metrics.rx_dropped == 1
    link.handle_control(START)
    assert link.accepts(frame)
    link.handle_control(STOP)
    assert not link.accepts(frame)


def test_rx_only_negotiated_frame_types() -> None:
    classic = started_link(wire.F_CAN_CLASSIC)
    fd_only = started_link(wire.F_CAN_FD)
    full = started_link()
    fd8 = CanFrame.data_frame(1, bytes(8), fd=True)
    cl8 = CanFrame.data_frame(1, bytes(8))
    rtr = CanFrame.remote_frame(1, 2)
    assert not classic.accepts(fd8) and classic.accepts(cl8) and not classic.accepts(rtr)
    assert fd_only.accepts(fd8) and not fd_only.accepts(cl8) and not fd_only.accepts(rtr)
    assert full.accepts(fd8) and full.accepts(cl8) and full.accepts(rtr)
    assert classic.rx_encode(fd8, 80) is None
    assert classic.metrics.rx_dropped_unsupported == 1


def test_accepts_does_not_count() -> None:
    link = started_link(wire.F_CAN_CLASSIC)
    link.accepts(CanFrame.data_frame(1, bytes(12), fd=True))
    assert link.metrics.rx_dropped == 0


# --- bus-off ------------------------------------------------------------------------------------


def test_bus_off_flow() -> None:
    link = started_link()
    assert link.config_bytes() == b"\x00\x00"
    effects = link.bus_off()
    assert effects == BusOffEffects(notify_config=True, fail_pending_tx=True)
    assert link.status == wire.VIRTIO_CAN_S_CTRL_BUSOFF
    assert link.config_bytes() == b"\x01\x00"
    assert not link.started
    assert_reject(link, raw(), "stopped")
    assert not link.accepts(CanFrame.data_frame(1, b""))
    # a repeated bus-off changes nothing and needs no notification
    assert link.bus_off() == BusOffEffects(notify_config=False, fail_pending_tx=False)
    assert link.metrics.bus_off_count == 1
    # START recovers and clears the bit before answering
    assert link.handle_control(START) == OK
    assert link.status == 0 and link.config_bytes() == b"\x00\x00"
    assert isinstance(link.handle_tx(raw()), TxSend)


def test_bus_off_while_stopped_still_sets_status() -> None:
    link = CanLinkModel()
    assert link.bus_off() == BusOffEffects(notify_config=True, fail_pending_tx=False)
    assert link.status == wire.VIRTIO_CAN_S_CTRL_BUSOFF


def test_stop_keeps_bus_off_bit() -> None:
    link = started_link()
    link.bus_off()
    assert link.handle_control(STOP) == OK
    assert link.status == wire.VIRTIO_CAN_S_CTRL_BUSOFF


# --- switch -------------------------------------------------------------------------------------


def make_switch(**links: int) -> CanSwitch:
    switch = CanSwitch()
    for name, features in links.items():
        switch.attach(name, started_link(features))
    return switch


def test_switch_never_echoes_to_sender() -> None:
    switch = make_switch(a=wire.F_ALL, b=wire.F_ALL, c=wire.F_ALL)
    frame = CanFrame.data_frame(0x10, b"\x01")
    assert switch.from_link("a", frame) == [(BUS, frame), ("b", frame), ("c", frame)]
    assert switch.from_link("b", frame) == [(BUS, frame), ("a", frame), ("c", frame)]
    assert switch.link("a").metrics.rx_dropped == 0


def test_switch_respects_per_link_negotiation_and_state() -> None:
    switch = make_switch(fd=wire.F_ALL, classic=wire.F_CAN_CLASSIC, stopped=wire.F_ALL)
    switch.link("stopped").handle_control(STOP)
    fd_frame = CanFrame.data_frame(0x10, bytes(16), fd=True)
    cl_frame = CanFrame.data_frame(0x10, bytes(4))
    rtr = CanFrame.remote_frame(0x10, 1)
    assert switch.from_bus(fd_frame) == ["fd"]
    assert switch.from_bus(cl_frame) == ["fd", "classic"]
    assert switch.from_bus(rtr) == ["fd"]
    assert switch.from_link("fd", fd_frame) == [(BUS, fd_frame)]
    assert switch.from_link("classic", cl_frame) == [(BUS, cl_frame), ("fd", cl_frame)]
    classic = switch.link("classic").metrics
    assert classic.rx_dropped_unsupported == 3 and classic.rx_dropped == 3
    assert switch.link("stopped").metrics.rx_dropped_stopped == 5
    assert switch.link("fd").metrics.rx_dropped == 0


def test_switch_without_bus_and_fifo_order() -> None:
    switch = CanSwitch(has_bus=False)
    switch.attach(1, started_link())
    switch.attach(2, started_link())
    frames = [CanFrame.data_frame(i, bytes([i])) for i in range(20)]
    queue: dict[object, list[CanFrame]] = {}
    for frame in frames:
        for target, routed in switch.from_link(1, frame):
            queue.setdefault(target, []).append(routed)
    assert queue == {2: frames}


def test_switch_attach_detach_and_bus_off() -> None:
    switch = make_switch(a=wire.F_ALL, b=wire.F_ALL)
    with pytest.raises(ValueError):
        switch.attach("a", CanLinkModel())
    with pytest.raises(KeyError):
        switch.from_link("zz", CanFrame.data_frame(1, b""))
    effects = switch.bus_off()
    assert set(effects) == {"a", "b"}
    assert all(e.notify_config and e.fail_pending_tx for e in effects.values())
    switch.detach("b")
    assert switch.link_ids == ["a"]


# --- round trips ----------------------------------------------------------------------------------


@st.composite
def frames(draw: st.DrawFn) -> CanFrame:
    extended = draw(st.booleans())
    can_id = draw(st.integers(0, wire.CAN_EFF_MASK if extended else wire.CAN_SFF_MASK))
    kind = draw(st.sampled_from(["classic", "fd", "rtr"]))
    if kind == "rtr":
        return CanFrame.remote_frame(can_id, draw(st.integers(0, 8)), extended=extended)
    if kind == "fd":
        size = draw(st.sampled_from(sorted(wire.CAN_FD_LENGTHS)))
        return CanFrame.data_frame(
            can_id, draw(st.binary(min_size=size, max_size=size)), extended=extended, fd=True
        )
    return CanFrame.data_frame(can_id, draw(st.binary(max_size=8)), extended=extended)


@given(frames(), st.sampled_from([wire.VIRTIO_CAN_TX, wire.VIRTIO_CAN_RX]))
def test_encode_decode_round_trip(frame: CanFrame, msg_type: int) -> None:
    buf = wire.encode_frame(frame, msg_type)
    assert len(buf) == frame.wire_size
    assert wire.decode_frame(buf, msg_type) == frame


@given(frames())
def test_message_round_trip(frame: CanFrame) -> None:
    msg = wire.frame_to_message(frame)
    assert msg.arbitration_id == frame.can_id
    assert msg.is_extended_id == frame.extended
    assert msg.is_remote_frame == frame.rtr
    assert msg.is_fd == frame.fd
    assert msg.dlc == frame.dlc
    assert bytes(msg.data) == frame.data
    assert wire.frame_from_message(msg) == frame


@given(frames())
def test_tx_then_rx_round_trip_through_model(frame: CanFrame) -> None:
    link = started_link()
    decision = link.handle_tx(wire.encode_frame(frame, wire.VIRTIO_CAN_TX))
    assert isinstance(decision, TxSend) and decision.frame == frame
    out = link.rx_encode(decision.frame, wire.RX_BUFFER_SIZE_FD)
    assert out is not None and wire.decode_frame(out, wire.VIRTIO_CAN_RX) == frame


@given(st.binary(max_size=96))
def test_arbitrary_tx_bytes_never_crash(data: bytes) -> None:
    link = started_link()
    if len(data) < 16:
        with pytest.raises(CanRequestError):
            link.handle_tx(data)
    else:
        assert isinstance(link.handle_tx(data), TxReject | TxSend)


@st.composite
def messages(draw: st.DrawFn) -> can.Message:
    """python-can messages, valid frames or not (ids past the range, FD sizes, RTR with FD)."""
    remote = draw(st.booleans())
    fd = draw(st.booleans())
    ids = st.one_of(st.integers(0, wire.CAN_SFF_MASK + 1), st.integers(0, wire.CAN_EFF_MASK + 2))
    sizes = st.one_of(st.integers(0, 9), st.sampled_from(sorted(wire.CAN_FD_LENGTHS)),
                      st.integers(0, 66))
    return can.Message(arbitration_id=draw(ids),
                       is_extended_id=draw(st.booleans()), is_remote_frame=remote, is_fd=fd,
                       is_error_frame=draw(st.integers(0, 15)) == 0,
                       dlc=draw(st.integers(0, 8)) if remote else None,
                       data=None if remote else bytes(draw(sizes)), check=False)


@given(messages(), st.sampled_from([wire.VIRTIO_CAN_TX, wire.VIRTIO_CAN_RX]))
def test_encode_message_is_the_frame_path(msg: can.Message, msg_type: int) -> None:
    """The one-call encoder of python-can's send path: the same bytes and the same refusals as
    converting to a CanFrame and encoding that."""
    try:
        want: bytes | FrameFault = wire.encode_frame(wire.frame_from_message(msg), msg_type)
    except CanFrameError as e:
        want = e.fault
    try:
        got: bytes | FrameFault = wire.encode_message(msg, msg_type)
    except CanFrameError as e:
        got = e.fault
    assert got == want


def test_message_conversion_details() -> None:
    msg = can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b"\x01\x02")
    assert wire.frame_from_message(msg) == CanFrame.data_frame(0x7FF, b"\x01\x02")
    remote = can.Message(arbitration_id=5, is_extended_id=True, is_remote_frame=True, dlc=6)
    assert wire.frame_from_message(remote) == CanFrame.remote_frame(5, 6, extended=True)
    # python-can defaults to extended ids: an 11-bit id stays extended
    assert wire.frame_from_message(can.Message(arbitration_id=1)).extended
    with pytest.raises(CanFrameError):
        wire.frame_from_message(can.Message(is_error_frame=True))
    with pytest.raises(CanFrameError):
        wire.frame_from_message(can.Message(arbitration_id=0x800, is_extended_id=False))
    with pytest.raises(CanFrameError):
        wire.frame_from_message(can.Message(is_fd=True, data=bytes(10)))
    out = wire.frame_to_message(CanFrame.data_frame(3, b"x"), channel="vcan0", timestamp=1.5)
    assert (out.channel, out.timestamp, out.is_rx) == ("vcan0", 1.5, True)


def test_bus_off_report_extension_needs_its_feature():
    """Project extension 0x02F0: only a driver that negotiated bit 23 may report a bus-off."""
    import struct

    from ivshmem_virtio.backend.devices.can import CanLinkModel
    from ivshmem_virtio.spec import can as w

    req = struct.pack("<H", w.VIRTIO_CAN_IVV_BUSOFF_REPORT)
    plain = CanLinkModel(w.F_CAN_CLASSIC | w.F_IVV_BUSOFF_REPORT)
    assert plain.set_features(w.F_CAN_CLASSIC)
    assert plain.handle_control(req) == w.VIRTIO_CAN_RESULT_NOT_OK
    assert plain.bus_off_reports == 0
    ext = CanLinkModel(w.F_CAN_CLASSIC | w.F_IVV_BUSOFF_REPORT)
    assert ext.set_features(w.F_CAN_CLASSIC | w.F_IVV_BUSOFF_REPORT)
    assert ext.handle_control(req) == w.VIRTIO_CAN_RESULT_OK
    assert ext.bus_off_reports == 1


def test_error_report_extension_needs_its_feature_and_a_whole_body() -> None:
    """Project extension 0x02F1 (bit 22): error-warning/passive and RX overflow from a driver.

    Without the bit (or with a short body, or a state beyond passive) it is NOT_OK and nothing
    is recorded; with it the report is kept for the runner, and the status word of a link that
    negotiated the bit shows the state, as a config status a Linux driver can read.
    """
    rep = wire.ErrorReport(wire.CAN_STATE_ERROR_PASSIVE, wire.CAN_ERR_CRTL_TX_PASSIVE, 130, 5, 2)
    body = rep.encode()
    assert len(body) == 8 and body[:2] == struct.pack("<H", 0x02F1)
    plain = CanLinkModel(wire.F_ALL)
    assert plain.set_features(CLASSIC_ONLY)
    assert plain.handle_control(body) == NOT_OK and plain.error_reports == []
    assert not plain.set_error_state(wire.CAN_STATE_ERROR_PASSIVE) and plain.status == 0
    ext = CanLinkModel(wire.F_ALL)
    assert ext.set_features(CLASSIC_ONLY | wire.F_IVV_ERROR_STATE)
    assert ext.handle_control(body[:6]) == NOT_OK
    assert ext.handle_control(body[:2] + bytes([3]) + body[3:]) == NOT_OK  # bus-off: own request
    assert ext.handle_control(body) == OK
    assert ext.error_reports == [rep] and ext.metrics.error_reports == 1
    assert ext.set_error_state(rep.state)
    assert ext.status == wire.VIRTIO_CAN_S_IVV_ERROR_PASSIVE
    assert ext.set_error_state(wire.CAN_STATE_ERROR_WARNING)
    assert ext.status == wire.VIRTIO_CAN_S_IVV_ERROR_WARNING
    assert ext.set_error_state(wire.CAN_STATE_ERROR_ACTIVE) and ext.status == 0


def test_error_frame_codec_matches_socketcan() -> None:
    """The RX error frame carries SocketCAN's class bits and data bytes, as mcp251x sets them."""
    rep = wire.ErrorReport(wire.CAN_STATE_ERROR_PASSIVE,
                           wire.CAN_ERR_CRTL_RX_PASSIVE | wire.CAN_ERR_CRTL_RX_OVERFLOW, 0, 140, 1)
    frame = wire.CanErrorFrame.from_report(rep)
    raw_rx = wire.encode_error_frame(frame)
    assert len(raw_rx) == 24
    assert struct.unpack_from("<I", raw_rx, 8)[0] == wire.VIRTIO_CAN_FLAGS_IVV_ERROR
    assert wire.decode_error_frame(raw_rx) == frame
    # an ordinary decoder refuses it (undefined flag): a link without bit 22 never sees one
    with pytest.raises(CanFrameError):
        wire.decode_frame(raw_rx, wire.VIRTIO_CAN_RX)
    assert wire.decode_error_frame(wire.encode_frame(CanFrame.data_frame(4, bytes(8)))) is None
    msg = wire.error_frame_to_message(frame)
    assert msg.is_error_frame and msg.arbitration_id == wire.CAN_ERR_CRTL | wire.CAN_ERR_CNT
    assert msg.data[1] == 0x11 and msg.data[7] == 140


def test_error_frame_only_for_negotiating_started_links() -> None:
    """rx_encode_error: nothing for a link without bit 22; counted drop when stopped."""
    frame = wire.CanErrorFrame(wire.CAN_ERR_CRTL, bytes(8))
    plain = CanLinkModel(wire.F_ALL)
    assert plain.set_features(CLASSIC_ONLY)
    plain.handle_control(START)
    assert plain.rx_encode_error(frame, 24) is None
    ext = CanLinkModel(wire.F_ALL)
    assert ext.set_features(CLASSIC_ONLY | wire.F_IVV_ERROR_STATE)
    assert ext.rx_encode_error(frame, 24) is None and ext.metrics.rx_dropped_stopped == 1
    ext.handle_control(START)
    assert ext.rx_encode_error(frame, 23) is None
    assert ext.rx_encode_error(frame, 24) == wire.encode_error_frame(frame)
    assert ext.metrics.error_frames == 1
