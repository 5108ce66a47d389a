"""virtio-can across processes over the sim link, plus in-process variants.

The multi-process tests share one stack per module: four sim hubs and one ``ivshmem-virtio can``
backend process, whose bus is the test interface ``sockbus`` (tests/can_helpers.py), so this
process can watch and feed the very bus the backend bridges. Frontends are CanDrivers in this
process (a process of their own as far as the link is concerned) and ``python -m can.logger``.
The in-process variants run the backend on the test's loop with python-can's ``virtual`` bus
(the bridge's reader-thread path) or a bus whose ``send`` the test holds or breaks.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import can
import pytest

from ivshmem_virtio.frontend.can import CanDriver
from ivshmem_virtio.procs import Child, run_cli
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import CanFrame, encode_frame

from .can_helpers import (
    RW_SIZE,
    GateBus,
    ProcStack,
    assert_silent,
    close_frontend,
    ensure_interfaces,
    frontend,
    frontends,
    inprocess_stack,
    plugin_env,
    recv_n,
    wait_until,
)
from .conftest import run

OK, NOT_OK = wire.VIRTIO_CAN_RESULT_OK, wire.VIRTIO_CAN_RESULT_NOT_OK
FULL: dict = {}  # every feature
CLASSIC_ONLY = {"fd": False}
FD_ONLY = {"classic": False, "rtr": False}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcStack]:
    st = ProcStack(tmp_path_factory.mktemp("can"), 4).start()
    try:
        yield st
    finally:
        codes = st.stop()
        assert codes["can-backend"] == 0, st.backend.log()
        assert "Traceback" not in st.backend.log()


@pytest.fixture
def observer(stack: ProcStack) -> Iterator:
    obs = stack.observer()
    try:
        yield obs
    finally:
        obs.close()
        stack.fault("hold", False)
        stack.fault("fail", False)


def data(i: int, n: int) -> bytes:
    return bytes((i + k) & 0xFF for k in range(n))


def every_kind() -> list[CanFrame]:
    """Classic, extended, FD of every valid length (both id kinds) and RTR frames."""
    frames = [CanFrame.data_frame(0x123, data(1, 8)), CanFrame.data_frame(0x7FF, b""),
              CanFrame.data_frame(0, data(2, 3)),
              CanFrame.data_frame(0x1FFFFFFF, data(3, 8), extended=True),
              CanFrame.data_frame(0, data(4, 1), extended=True)]
    for n in sorted(wire.CAN_FD_LENGTHS):
        frames.append(CanFrame.data_frame(0x100 + n, data(n, n), fd=True))
        frames.append(CanFrame.data_frame(0x1ABCDE00 + n, data(n + 1, n), fd=True,
                                          extended=True))
    for dlc in range(9):
        frames.append(CanFrame.remote_frame(0x200 + dlc, dlc))
    frames.append(CanFrame.remote_frame(0x18FF0000, 8, extended=True))
    return frames


def expected_length(frame: CanFrame) -> int:
    return wire.FRAME_HEADER_SIZE + len(frame.data)  # RTR: 16, its length field is the DLC


async def sends(drv: CanDriver, frames: list[CanFrame]) -> list[int]:
    return list(await asyncio.gather(*(drv.send(f) for f in frames)))


# --- frames of every kind -------------------------------------------------------------------------
def test_every_frame_kind_reaches_bus_and_other_frontends(stack: ProcStack, observer) -> None:
    frames = every_kind()
    classic = [f for f in frames if not f.fd]
    with_fd_no_rtr = [f for f in frames if not f.rtr]

    async def body() -> None:
        async with frontends((stack.links[0], FULL), (stack.links[1], FULL),
                             (stack.links[2], CLASSIC_ONLY),
                             (stack.links[3], {"rtr": False})) as (a, b, c, d):
            assert a.fd and not c.fd
            for f in frames:  # one at a time: the bus order is the send order
                assert await a.send(f) == OK, f
            assert await observer.await_count(len(frames)) == frames
            got_b = [await asyncio.wait_for(b.recv(), 10) for _ in frames]
            assert [r.frame for r in got_b] == frames
            assert [r.length for r in got_b] == [expected_length(f) for f in frames]
            # links get only what they negotiated (spec §8.3)
            assert await recv_n(c, len(classic)) == classic
            assert await recv_n(d, len(with_fd_no_rtr)) == with_fd_no_rtr
            await assert_silent(a)  # never its own frames back (§8.7)

            # and the other way: from the bus into every link
            for f in frames:
                observer.send(f)
            got_a = [await asyncio.wait_for(a.recv(), 10) for _ in frames]
            assert [r.frame for r in got_a] == frames
            assert [r.length for r in got_a] == [expected_length(f) for f in frames]
            assert await recv_n(b, len(frames)) == frames
            assert await recv_n(c, len(classic)) == classic
            assert await recv_n(d, len(with_fd_no_rtr)) == with_fd_no_rtr
            assert a.metrics.rx_invalid == 0

    run(body())


# --- validation -----------------------------------------------------------------------------------
def header(*, msg_type: int = wire.VIRTIO_CAN_TX, length: int = 0, flags: int = 0,
           can_id: int = 0x10, payload: bytes | None = None) -> bytes:
    body = bytes(length) if payload is None else payload
    return wire.FRAME_HEADER.pack(msg_type, length, 0, 0, 0, flags, can_id) + body


def invalid_requests() -> list[tuple[str, bytes]]:
    ext, fdf, rtr = (wire.VIRTIO_CAN_FLAGS_EXTENDED, wire.VIRTIO_CAN_FLAGS_FD,
                     wire.VIRTIO_CAN_FLAGS_RTR)
    cases = [(f"undefined flag bit {b}", header(flags=1 << b)) for b in range(32)
             if (1 << b) & ~wire.VIRTIO_CAN_FLAGS_KNOWN]
    cases += [
        ("std id > 0x7FF", header(can_id=0x800)),
        ("ext id > 0x1FFFFFFF", header(can_id=0x20000000, flags=ext)),
        ("classic length 9", header(length=9)),
        ("classic length 64", header(length=64)),
        ("FD length 65", header(length=65, flags=fdf)),
        ("RTR with FD", header(flags=rtr | fdf, length=0, payload=b"")),
        ("RTR DLC 9", header(flags=rtr, length=9, payload=b"")),
        ("RX msg_type on TX", header(msg_type=wire.VIRTIO_CAN_RX, length=1)),
        ("payload shorter than length", header(length=8, payload=bytes(4))),
    ]
    cases += [(f"FD length {n}", header(length=n, flags=fdf))
              for n in range(9, 64) if n not in wire.CAN_FD_LENGTHS]
    return cases


def test_every_validation_rule_answers_not_ok_and_nothing_reaches_the_bus(
        stack: ProcStack, observer) -> None:
    sentinel = CanFrame.data_frame(0x7AB, b"sentinel")

    async def body() -> None:
        async with frontends((stack.links[0], FULL), (stack.links[1], FULL),
                             (stack.links[2], CLASSIC_ONLY),
                             (stack.links[3], FD_ONLY)) as (a, b, c, d):
            for name, req in invalid_requests():
                assert await a.send_raw(req) == NOT_OK, name
            # frame types the link did not negotiate
            assert await c.send(CanFrame.data_frame(0x1, data(0, 12), fd=True)) == NOT_OK
            assert await d.send(CanFrame.data_frame(0x1, data(0, 8))) == NOT_OK
            assert await d.send(CanFrame.remote_frame(0x1, 4)) == NOT_OK
            # nothing of it went anywhere: the first frame everyone sees is the sentinel
            assert await a.send(sentinel) == OK
            assert await observer.await_count(1) == [sentinel]
            assert await recv_n(b, 1) == [sentinel]
            assert await recv_n(c, 1) == [sentinel]
            await assert_silent(b)
            await assert_silent(d)  # FD-only: a classic sentinel is not for it
            assert observer.frames() == [sentinel]

    run(body())


def test_rtr_without_classic_is_refused(stack: ProcStack) -> None:
    """RTR_FRAMES requires CAN_CLASSIC: such a driver gets NEEDS_RESET, never a live link."""
    async def body() -> None:
        with pytest.raises(Exception, match="START|closed|lost|reset"):
            await frontend(stack.links[3], classic=False, fd=True, rtr=True, reconnect=False)
        async with frontends((stack.links[3], FULL)) as (d,):  # the link is fine afterwards
            assert d.controller_started

    run(body())


# --- controller mode -----------------------------------------------------------------------------
def test_start_stop_idempotent_and_stopped_neither_sends_nor_delivers(
        stack: ProcStack, observer) -> None:
    async def body() -> None:
        async with frontends((stack.links[0], FULL), (stack.links[1], FULL)) as (a, b):
            assert a.controller_started  # START on attach
            assert await a.start_controller() == OK  # repeated START
            assert await a.stop_controller() == OK
            assert await a.stop_controller() == OK  # repeated STOP
            assert not a.controller_started
            assert await a.send(CanFrame.data_frame(0x11, b"stopped")) == NOT_OK
            observer.send(CanFrame.data_frame(0x12, b"bus"))
            assert await b.send(CanFrame.data_frame(0x13, b"peer")) == OK
            assert await recv_n(b, 1) == [CanFrame.data_frame(0x12, b"bus")]
            assert await observer.await_count(1) == [CanFrame.data_frame(0x13, b"peer")]
            await assert_silent(a)
            # frames that arrived while stopped are dropped, not kept for the next START
            assert await a.start_controller() == OK
            assert await a.start_controller() == OK
            fresh = CanFrame.data_frame(0x14, b"fresh")
            observer.send(fresh)
            assert await recv_n(a, 1) == [fresh]
            await assert_silent(a)
            assert await a.send(CanFrame.data_frame(0x15, b"again")) == OK

    run(body())


# --- bus-off --------------------------------------------------------------------------------------
def test_bus_off_flow(stack: ProcStack, observer) -> None:
    """Bus error -> status bit + config event on every link, STOPPED, pending TX failed."""
    async def body() -> None:
        async with frontends((stack.links[0], FULL),
                             (stack.links[1], {"late_tx_ack": False})) as (a, b):
            assert a.has(wire.F_LATE_TX_ACK) and not b.has(wire.F_LATE_TX_ACK)
            stack.fault("hold", True)  # the bus takes nothing: A's frames stay pending
            pending = [asyncio.create_task(a.send(CanFrame.data_frame(0x300 + i, data(i, 8))))
                       for i in range(5)]
            await asyncio.sleep(0.2)
            assert not any(t.done() for t in pending)  # LATE_TX_ACK: not on the bus yet
            assert await b.send(CanFrame.data_frame(0x3FF, b"queued")) == OK  # acked at once
            events_a, events_b = a.metrics.config_events, b.metrics.config_events
            stack.fault("fail", True)  # the held send now fails: bus-off
            assert await asyncio.gather(*pending) == [NOT_OK] * 5
            await a.wait_for(lambda: a.bus_off)
            await b.wait_for(lambda: b.bus_off)
            assert a.metrics.config_events > events_a and b.metrics.config_events > events_b
            assert a.status & wire.VIRTIO_CAN_S_CTRL_BUSOFF
            assert b.status & wire.VIRTIO_CAN_S_CTRL_BUSOFF
            stack.fault("fail", False)
            stack.fault("hold", False)
            # STOPPED: sends fail, bus frames are not delivered
            assert await a.send(CanFrame.data_frame(0x310, b"x")) == NOT_OK
            assert await b.send(CanFrame.data_frame(0x311, b"x")) == NOT_OK
            observer.send(CanFrame.data_frame(0x312, b"lost"))
            await assert_silent(a, 0.2)
            await assert_silent(b)
            assert observer.frames() == []  # none of the pending frames reached the bus
            # START recovers (ip link restart): status cleared first, then the answer
            assert await a.start_controller() == OK
            assert not a.bus_off and not a.status & wire.VIRTIO_CAN_S_CTRL_BUSOFF
            back = CanFrame.data_frame(0x320, b"back")
            assert await a.send(back) == OK
            assert await observer.await_count(1) == [back]
            assert b.bus_off  # B has not restarted yet
            await assert_silent(b)
            assert await b.start_controller() == OK and not b.bus_off
            assert b.metrics.bus_off_events == 1 and a.metrics.bus_off_events == 1

    run(body())


# --- RX buffers -----------------------------------------------------------------------------------
def test_24_byte_rx_buffers(stack: ProcStack, observer) -> None:
    classic = [CanFrame.data_frame(0x1, data(1, 8)), CanFrame.data_frame(0x1F, data(2, 8),
                                                                         extended=True),
               CanFrame.remote_frame(0x2, 8), CanFrame.data_frame(0x3, b"")]
    fd12 = CanFrame.data_frame(0x4, data(3, 12), fd=True)
    fd8 = CanFrame.data_frame(0x5, data(4, 8), fd=True)

    async def body() -> None:
        async with frontends((stack.links[2], CLASSIC_ONLY),
                             (stack.links[3], {"rx_buffer_size": 24})) as (c, e):
            assert c.rx_size == 24 and e.rx_size == 24 and e.fd
            for f in [classic[0], fd12, classic[1], fd8, classic[2], classic[3]]:
                observer.send(f)
            got = [await asyncio.wait_for(c.recv(), 10) for _ in classic]
            assert [r.frame for r in got] == classic  # FD frames are not for a classic link
            assert [r.length for r in got] == [24, 24, 16, 16]
            # an FD link with 24-byte buffers: the 12-byte FD frame does not fit; its buffer
            # comes back empty and the next frame takes the next buffer (spec §8.2)
            got = [await asyncio.wait_for(e.recv(), 10) for _ in range(5)]
            assert [r.frame for r in got] == [classic[0], classic[1], fd8, classic[2],
                                              classic[3]]
            assert e.metrics.rx_empty == 1 and e.metrics.rx_invalid == 0
            await assert_silent(c)

    run(body())


# --- volume ---------------------------------------------------------------------------------------
N_BULK = 10_000
WINDOW = 128  # frames in flight towards a frontend: always fewer than its posted buffers


def numbered(i: int) -> CanFrame:
    if i % 3 == 0:
        return CanFrame.data_frame(i & 0x7FF, i.to_bytes(4, "little"))
    if i % 3 == 1:
        return CanFrame.data_frame(i, i.to_bytes(4, "little") * 2, extended=True)
    return CanFrame.data_frame(i & 0x7FF, i.to_bytes(4, "little") * 3, fd=True)


async def feed_windowed(send: Callable[[list[CanFrame]], Awaitable[None]],
                        drv: CanDriver, frames: list[CanFrame]) -> list[CanFrame]:
    """Send in windows and collect what ``drv`` receives: buffers stay posted throughout."""
    got: list[CanFrame] = []
    for start in range(0, len(frames), WINDOW):
        chunk = frames[start:start + WINDOW]
        await send(chunk)
        got += await recv_n(drv, len(chunk))
    return got


def test_10000_frames_each_way_none_lost_or_reordered(stack: ProcStack, observer) -> None:
    frames = [numbered(i) for i in range(N_BULK)]
    loop_send = observer.send

    async def bus_send(chunk: list[CanFrame]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: [loop_send(f)
                                                                       for f in chunk])

    async def body() -> None:
        async with frontends((stack.links[0], FULL), (stack.links[1], FULL)) as (a, b):
            # frontend -> bus, all of them in flight at once (the driver queues past the ring)
            assert set(await sends(a, frames)) == {OK}
            assert await observer.await_count(N_BULK, 60) == frames
            # bus -> frontend
            assert await feed_windowed(bus_send, a, frames) == frames
            # frontend -> frontend over the switch
            async def a_send(chunk: list[CanFrame]) -> None:
                assert set(await sends(a, chunk)) == {OK}
            b.rx = asyncio.Queue()  # drop what B received from A's first run
            assert await feed_windowed(a_send, b, frames[:2000]) == frames[:2000]
            assert a.metrics.rx_invalid == b.metrics.rx_invalid == 0

    run(body(), 120)


def test_frontend_without_rx_buffers_stalls_nobody(stack: ProcStack, observer) -> None:
    frames = [numbered(i) for i in range(1000)]

    async def bus_send(chunk: list[CanFrame]) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: [observer.send(f)
                                                                       for f in chunk])

    async def body() -> None:
        async with frontends((stack.links[0], FULL),
                             (stack.links[3], {"rx_buffers": 0})) as (a, mute):
            assert await feed_windowed(bus_send, a, frames) == frames
            assert set(await sends(a, frames[:500])) == {OK}  # the bus still takes A's TX
            assert await observer.await_count(500) == frames[:500]  # its own sends are not heard
            ping = CanFrame.data_frame(0x42, b"mute")
            assert await mute.send(ping) == OK  # and the mute link itself can still send
            assert await recv_n(a, 1) == [ping]
            await assert_silent(mute)

    run(body(), 90)


# --- hostile chains -------------------------------------------------------------------------------
BEYOND = RW_SIZE + 0x1000  # an address outside the R/W section


def _case_requests(drv: CanDriver) -> dict[str, tuple[int, list, list, str]]:
    """name -> (queue, readable, writable, expected): 'not_ok', 'reset' or 'empty'."""
    alloc = drv.transport.allocator
    assert alloc is not None
    mem = drv.transport.hdr
    buf = alloc.alloc(256)
    good_tx = encode_frame(CanFrame.data_frame(0x66, b"hostile"), wire.VIRTIO_CAN_TX)
    mem.write(buf, good_tx)
    ctl = buf + 128
    mem.write(ctl, wire.CONTROL_REQUEST.pack(wire.VIRTIO_CAN_SET_CTRL_MODE_START))
    res = buf + 200
    tx, cq, rx = wire.TXQ, wire.CONTROLQ, wire.RXQ
    return {
        "tx_short_header": (tx, [(buf, 10)], [(res, 1)], "reset"),
        "tx_no_result_byte": (tx, [(buf, len(good_tx))], [], "reset"),
        "tx_zero_length_result": (tx, [(buf, len(good_tx))], [(res, 0)], "reset"),
        "tx_result_out_of_range": (tx, [(buf, len(good_tx))], [(BEYOND, 1)], "reset"),
        "tx_payload_out_of_range": (tx, [(BEYOND, len(good_tx))], [(res, 1)], "not_ok"),
        "tx_huge_payload_address": (tx, [(buf, 16), (1 << 62, 8)], [(res, 1)], "not_ok"),
        "ctrl_short": (cq, [(ctl, 1)], [(res, 1)], "reset"),
        "ctrl_no_result_byte": (cq, [(ctl, 2)], [], "reset"),
        "ctrl_request_out_of_range": (cq, [(BEYOND, 2)], [(res, 1)], "not_ok"),
        "rx_buffer_device_readable": (rx, [(buf, 80)], [], "empty"),
        "rx_buffer_out_of_range": (rx, [], [(BEYOND, 80)], "empty"),
    }


HOSTILE = ["tx_short_header", "tx_no_result_byte", "tx_zero_length_result",
           "tx_result_out_of_range", "tx_payload_out_of_range", "tx_huge_payload_address",
           "ctrl_short", "ctrl_no_result_byte", "ctrl_request_out_of_range",
           "rx_buffer_device_readable", "rx_buffer_out_of_range"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_chain(stack: ProcStack, observer, case: str) -> None:
    """Raw bad chains get NOT_OK or NEEDS_RESET; the backend and the other links carry on."""
    async def body() -> None:
        async with frontends((stack.links[0], FULL),
                             (stack.links[2], {"rx_buffers": 64})) as (a, h):
            queue, readable, writable, expected = _case_requests(h)[case]
            mem = h.transport.hdr
            if expected == "reset":
                with pytest.raises(ConnectionError):
                    await h.raw_request(queue, readable, writable)
                await wait_until(lambda: h.bring_ups == 2 and h.controller_started)
            else:
                used = await h.raw_request(queue, readable, writable)
                if expected == "not_ok":
                    assert used == 1 and mem.u8(writable[0][0]) == NOT_OK
                else:
                    assert used == 0
                assert h.bring_ups == 1
            assert not h.transport.needs_reset()
            # the other link never noticed, and the hostile one works again
            ping = CanFrame.data_frame(0x77, case.encode()[:8])
            assert await a.send(ping) == OK
            assert await observer.await_count(1) == [ping]
            assert await recv_n(h, 1) == [ping]
            assert await h.send(CanFrame.data_frame(0x78, b"ok")) == OK
            assert await recv_n(a, 1) == [CanFrame.data_frame(0x78, b"ok")]
            assert stack.backend.proc.poll() is None

    run(body())


# --- python-can's own tools -----------------------------------------------------------------------
_PRINTED = re.compile(r"ID:\s+([0-9a-f]+)\s+([XS]) [RT]x ([E ]) ([R ]) ([F ]) .*?DL:\s*(\d+)"
                      r"(?:\s+((?:[0-9a-f]{2})(?: [0-9a-f]{2})*))?")


def printed_frames(text: str) -> list[CanFrame]:
    """Frames from python-can's ``str(Message)`` lines (what can.logger prints to stdout)."""
    out = []
    for line in text.splitlines():
        m = _PRINTED.search(line)
        if m is None:
            continue
        can_id, ext, _err, rtr, fd, dlc, hexdata = m.groups()
        if rtr == "R":
            out.append(CanFrame.remote_frame(int(can_id, 16), int(dlc), extended=ext == "X"))
        else:
            out.append(CanFrame.data_frame(int(can_id, 16), bytes.fromhex(hexdata or ""),
                                           extended=ext == "X", fd=fd == "F"))
    return out


def test_can_logger_records_frames_from_another_frontend(stack: ProcStack, tmp_path: Path) -> None:
    # printed to stdout (unbuffered), so the test sees each frame arrive before it ends the logger
    logger = Child("can-logger", [sys.executable, "-m", "can.logger", "-i", "ivshmem",
                                  "-c", stack.links[3]], tmp_path, env=plugin_env(tmp_path))
    frames = [f for f in every_kind() if f.rtr or len(f.data) in (0, 3, 8, 12, 64)]
    try:
        logger.wait_for("Connected to IvshmemCanBus", 30)

        async def body() -> None:
            async with frontends((stack.links[0], FULL)) as (a,):
                for f in frames:
                    assert await a.send(f) == OK
            await wait_until(lambda: len(printed_frames(logger.log())) >= len(frames), 30)

        run(body())
        logger.signal(signal.SIGINT)  # the logger shuts the bus down on KeyboardInterrupt
        assert logger.proc.wait(15) == 0, logger.log()
    finally:
        logger.stop(5)
    assert printed_frames(logger.log()) == frames


def test_can_player_replays_a_recording(stack: ProcStack, tmp_path: Path) -> None:
    frames = [f for f in every_kind() if f.rtr or len(f.data) in (0, 3, 8, 12, 64)]
    trace = tmp_path / "trace.blf"  # BLF keeps FD, extended ids and the DLC of RTR frames
    with can.BLFWriter(str(trace)) as w:
        for i, f in enumerate(frames):
            w.on_message_received(wire.frame_to_message(f, timestamp=1000.0 + i / 1000))

    async def body() -> None:
        async with frontends((stack.links[0], FULL)) as (a,):
            player = Child("can-player", [sys.executable, "-m", "can.player", "-i", "ivshmem",
                                          "-c", stack.links[3], "--ignore-timestamps",
                                          str(trace)], tmp_path, env=plugin_env(tmp_path))
            try:
                code = await asyncio.get_running_loop().run_in_executor(
                    None, player.proc.wait, 30)
                assert code == 0, player.log()
            finally:
                player.stop(5)
            assert await recv_n(a, len(frames)) == frames

    run(body())


def test_python_can_bus_reports_and_recovers_bus_off(stack: ProcStack) -> None:
    """The ``ivshmem`` interface: NOT_OK becomes CanOperationError, state ERROR, ACTIVE restarts."""
    ensure_interfaces()
    bus = can.Bus(interface="ivshmem", channel=stack.links[2])
    try:
        assert bus.state == can.BusState.ACTIVE and bus.protocol == can.CanProtocol.CAN_FD
        stack.fault("fail", True)
        with pytest.raises(can.CanOperationError):
            bus.send(can.Message(arbitration_id=0x5, data=b"x", is_extended_id=False))
        stack.fault("fail", False)
        deadline = time.monotonic() + 10
        while bus.state != can.BusState.ERROR and time.monotonic() < deadline:
            time.sleep(0.01)
        assert bus.state == can.BusState.ERROR
        with pytest.raises(can.CanOperationError, match="bus-off|stopped"):
            bus.send(can.Message(arbitration_id=0x6, data=b"x", is_extended_id=False))
        bus.state = can.BusState.ACTIVE  # START, as `ip link set up` after a bus-off
        assert bus.state == can.BusState.ACTIVE
        bus.send(can.Message(arbitration_id=0x7, data=b"x", is_extended_id=False))
    finally:
        stack.fault("fail", False)
        bus.shutdown()


# --- command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args, text", [
    (["--link", "sim:/nonexistent/x.sock", "--bus", "virtual"], "IFACE:CHANNEL"),
    (["--link", "sim:/nonexistent/x.sock", "--bus", "nosuchiface:x"], "not an installed"),
    (["--link", "sim:/n/a.sock", "--link", "sim:/n/a.sock", "--bus", "virtual:x"],
     "more than once"),
    (["--link", "sim:/nonexistent/x.sock", "--bus", "virtual:x"], "cannot reach"),
])
def test_cli_configuration_errors(args: list[str], text: str) -> None:
    r = run_cli(["can", *args], timeout=30)
    assert r.returncode == 2, r.stderr
    err = r.stderr.decode().strip()
    assert text in err and len(err.splitlines()) == 1, err


# --- in-process -----------------------------------------------------------------------------------
def test_inprocess_virtual_bus_both_directions(tmp_path: Path) -> None:
    async def body() -> None:
        bus = can.Bus(interface="virtual", channel=f"ip-{tmp_path.name}")
        watch = can.Bus(interface="virtual", channel=f"ip-{tmp_path.name}")
        try:
            async with inprocess_stack(tmp_path, 2, bus) as st:
                assert st.backend.bridge is not None and not st.backend.bridge.uses_fileno
                async with frontends((st.links[0], FULL), (st.links[1], FULL)) as (a, b):
                    frames = every_kind()
                    assert set(await sends(a, frames)) == {OK}
                    loop = asyncio.get_running_loop()
                    seen = [await loop.run_in_executor(None, watch.recv, 5) for _ in frames]
                    assert [wire.frame_from_message(m) for m in seen] == frames
                    assert await recv_n(b, len(frames)) == frames
                    for f in frames:
                        watch.send(wire.frame_to_message(f, is_rx=False))
                    assert await recv_n(a, len(frames)) == frames
                    assert await recv_n(b, len(frames)) == frames
        finally:
            watch.shutdown()

    run(body())


def test_late_tx_ack_completes_only_once_the_bus_took_the_frame(tmp_path: Path) -> None:
    async def body() -> None:
        bus = GateBus(f"gate-{tmp_path.name}")
        watch = can.Bus(interface="virtual", channel=f"gate-{tmp_path.name}")
        loop = asyncio.get_running_loop()
        try:
            async with inprocess_stack(tmp_path, 2, bus) as st:
                async with frontends((st.links[0], FULL),
                                     (st.links[1], {"late_tx_ack": False})) as (a, b):
                    bus.gate.clear()  # the bus accepts nothing for now
                    first = asyncio.create_task(a.send(CanFrame.data_frame(0x1, b"first")))
                    await loop.run_in_executor(None, bus.sending.wait, 5)
                    # without LATE_TX_ACK a frame is answered once queued
                    assert await b.send(CanFrame.data_frame(0x2, b"early")) == OK
                    third = asyncio.create_task(a.send(CanFrame.data_frame(0x3, b"third")))
                    await asyncio.sleep(0.1)
                    assert not first.done() and not third.done()  # not on the bus yet
                    # the loop is not blocked by the bus: control is answered; STOP cancels
                    # the queued frame, but the one being transmitted cannot be recalled
                    assert await a.stop_controller() == OK
                    assert await third == NOT_OK
                    assert not first.done()
                    bus.gate.set()
                    assert await first == OK
                    seen = [await loop.run_in_executor(None, watch.recv, 5) for _ in range(2)]
                    assert [m.arbitration_id for m in seen] == [0x1, 0x2]  # FIFO on the wire
                    assert await a.start_controller() == OK
                    assert await a.send(CanFrame.data_frame(0x4, b"fourth")) == OK
                    m = await loop.run_in_executor(None, watch.recv, 5)
                    assert m.arbitration_id == 0x4  # the cancelled 0x3 never went out
        finally:
            watch.shutdown()

    run(body())


def test_inprocess_counters_for_drops_and_bus_off(tmp_path: Path) -> None:
    async def body() -> None:
        bus = GateBus(f"cnt-{tmp_path.name}")
        watch = can.Bus(interface="virtual", channel=f"cnt-{tmp_path.name}")
        try:
            async with inprocess_stack(tmp_path, 2, bus) as st:
                svc = [st.backend.links[link] for link in st.links]
                async with frontends((st.links[0], FULL),
                                     (st.links[1], {"rx_buffers": 0})) as (a, mute):
                    for i in range(20):
                        watch.send(can.Message(arbitration_id=i, data=b"x", is_extended_id=False))
                    assert len(await recv_n(a, 20)) == 20
                    await wait_until(lambda: svc[1].stats()["rx_dropped_no_buffer"] == 20)
                    assert svc[0].stats()["rx_count"] == 20
                    bus.fail = True
                    assert await a.send(CanFrame.data_frame(0x5, b"fail")) == NOT_OK
                    await a.wait_for(lambda: a.bus_off)
                    await mute.wait_for(lambda: mute.bus_off)
                    assert st.backend.bus_off_count == 1
                    assert all(s.model.metrics.bus_off_count == 1 for s in svc)
                    assert svc[0].stats()["tx_bus_fails"] == 1
                    bus.fail = False
                    assert await a.start_controller() == OK
                    assert await a.send(CanFrame.data_frame(0x6, b"ok")) == OK
        finally:
            watch.shutdown()

    run(body())


def test_frontend_reconnects_after_backend_restart(tmp_path: Path) -> None:
    """A backend restart looks like a slow START to the frontend, which then carries on."""
    async def body() -> None:
        bus = can.Bus(interface="virtual", channel=f"rc-{tmp_path.name}")
        async with inprocess_stack(tmp_path, 1, bus) as st:
            drv = await frontend(st.links[0])
            try:
                runner = st.runners[0]
                runner.transport.mark_needs_reset("test")  # the device breaks
                await wait_until(lambda: drv.bring_ups == 2 and drv.controller_started)
                assert await drv.send(CanFrame.data_frame(0x9, b"again")) == OK
            finally:
                await close_frontend(drv)

    run(body())


# --- the demo step -------------------------------------------------------------------------------
def test_demo_can_round_trip(tmp_path: Path) -> None:
    from ivshmem_virtio.app import can_demo

    rep = can_demo.can_round_trip(str(tmp_path), count=40)
    assert rep["ok"] and rep["frames"] == 40 and rep["mismatches"] == 0, rep
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".sock"]
