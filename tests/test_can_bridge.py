"""The bus bridge's send path: from the loop when the interface allows it, else the writer thread.

A frame goes out directly only while nothing waits for the writer thread, so the wire order is
the send order however each frame travels; LATE_TX_ACK still means "the bus accepted it", and a
frame that had to wait behind a held one completes only after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import can
import pytest
from can.interfaces.virtual import VirtualBus

from ivshmem_virtio.backend.resources.canbus import (
    CanBusBridge,
    TxTicket,
    direct_sender,
    to_message,
)
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import CanFrame

from .can_helpers import GateBus, SockBus, frontends, inprocess_stack, recv_n
from .conftest import run

OK = wire.VIRTIO_CAN_RESULT_OK


def frame(i: int) -> CanFrame:
    return CanFrame.data_frame(i & 0x7FF, i.to_bytes(4, "little"))


@contextlib.contextmanager
def virtual_pair(name: str, **watch_kw: object) -> Iterator[tuple[can.BusABC, can.BusABC]]:
    bus = can.Bus(interface="virtual", channel=name)
    watch = can.Bus(interface="virtual", channel=name, **watch_kw)
    try:
        yield bus, watch
    finally:
        watch.shutdown()
        bus.shutdown()


# --- which interfaces are sent to directly --------------------------------------------------------
def test_direct_only_for_interfaces_known_not_to_wait(tmp_path: Path) -> None:
    with virtual_pair(f"d-{tmp_path.name}") as (bus, watch):
        send = direct_sender(bus)
        assert send is not None
        assert send(to_message(frame(1))) is True
        got = watch.recv(1)
        assert got is not None and wire.frame_from_message(got) == frame(1)
    gate = GateBus(f"g-{tmp_path.name}")  # overrides send: it may hold frames
    sock = SockBus(str(tmp_path / "bus"), faults=False)
    plain = VirtualBus(f"n-{tmp_path.name}")
    try:
        assert direct_sender(gate) is None
        assert direct_sender(sock) is None
        assert CanBusBridge(gate).direct is None
        assert CanBusBridge(plain, direct=False).direct is None
    finally:
        gate.shutdown()
        sock.shutdown()
        plain.shutdown()


def test_virtual_with_a_bounded_receiver_is_left_to_the_thread(tmp_path: Path) -> None:
    """A full bounded queue would make ``virtual`` wait, or fail half-delivered: never direct."""
    with virtual_pair(f"b-{tmp_path.name}", rx_queue_size=1) as (bus, watch):
        send = direct_sender(bus)
        assert send is not None
        assert send(to_message(frame(1))) is False
        assert watch.recv(0) is None  # nothing was sent


def test_socketcan_sends_directly_or_sends_nothing() -> None:
    """``socketcan`` with timeout 0: a full socket buffer refuses the frame whole."""
    from can.interfaces.socketcan import SocketcanBus

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    bus = SocketcanBus.__new__(SocketcanBus)  # the send path only, over a stand-in socket
    bus.socket = a
    bus.channel = "vcan-test"
    bus._is_shutdown = True  # nothing to shut down
    try:
        send = direct_sender(bus)
        assert send is not None
        assert send(to_message(frame(1))) is True
        assert len(b.recv(100)) == 16  # one struct can_frame
        a.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                a.send(bytes(16))
        assert not select.select([], [a], [], 0)[1]
        assert send(to_message(frame(2))) is False  # would wait: the thread's job
        b.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                b.recv(100)
        assert send(to_message(frame(3))) is True
        assert b.recv(100)[8:12] == (3).to_bytes(4, "little")
    finally:
        a.close()
        b.close()


# --- the bridge ----------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.done: list[tuple[TxTicket, bool]] = []
        self.changed = asyncio.Event()

    def on_frames(self, frames: list[CanFrame]) -> None:
        pass

    def on_error(self, reason: str) -> None:
        self.errors.append(reason)

    def on_tx_done(self, results: list[tuple[TxTicket, bool]]) -> None:
        self.done += results
        self.changed.set()

    async def wait_done(self, n: int) -> None:
        while len(self.done) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 5)


def test_fifo_across_direct_and_thread_sends(tmp_path: Path) -> None:
    """A frame that must wait sends every later one through the thread until it is through."""
    async def body() -> None:
        with virtual_pair(f"f-{tmp_path.name}") as (bus, watch):
            bridge = CanBusBridge(bus)
            refuse = threading.Event()
            gate = threading.Event()
            gate.set()
            real_send = type(bus).send

            def direct(msg: can.Message) -> bool:  # a socketcan-like interface
                if refuse.is_set():
                    return False
                real_send(bus, msg, None)
                return True

            def held_send(msg: can.Message, timeout: float | None = None) -> None:
                gate.wait(10)
                real_send(bus, msg, timeout)

            bridge.direct = direct
            bus.send = held_send  # type: ignore[method-assign] - what the writer thread calls
            rec = Recorder()
            bridge.start(rec.on_frames, rec.on_error, rec.on_tx_done)
            try:
                assert [bridge.send(frame(i), "tag") for i in range(3)] == [True] * 3
                refuse.set()
                gate.clear()
                t3 = bridge.send(frame(3), "tag")
                assert isinstance(t3, TxTicket) and t3.tag == "tag"
                refuse.clear()  # the bus could take frames again, but 3 is not through yet
                t4 = bridge.send(frame(4), "tag")
                assert isinstance(t4, TxTicket)
                await asyncio.sleep(0.05)
                assert rec.done == []  # LATE_TX_ACK: neither is on the bus
                gate.set()
                await rec.wait_done(2)
                assert rec.done == [(t3, True), (t4, True)]
                assert bridge.send(frame(5), "tag") is True  # nothing outstanding: direct again
                loop = asyncio.get_running_loop()
                seen = [await loop.run_in_executor(None, watch.recv, 5) for _ in range(6)]
                assert [wire.frame_from_message(m) for m in seen] == [frame(i) for i in range(6)]
                assert bridge.metrics.tx_count == 6 and bridge.metrics.tx_direct == 4
                assert rec.errors == []
            finally:
                bridge.close()

    run(body())


def test_direct_send_failure_is_a_bus_error_before_send_returns(tmp_path: Path) -> None:
    async def body() -> None:
        with virtual_pair(f"e-{tmp_path.name}") as (bus, _watch):
            bridge = CanBusBridge(bus)

            def broken(msg: can.Message) -> bool:
                raise can.CanOperationError("injected")

            bridge.direct = broken
            rec = Recorder()
            bridge.start(rec.on_frames, rec.on_error, rec.on_tx_done)
            try:
                assert bridge.send(frame(1)) is False
                assert len(rec.errors) == 1 and "injected" in rec.errors[0]
                assert bridge.metrics.tx_fails == 1 and bridge.metrics.bus_errors == 1
            finally:
                bridge.close()

    run(body())


# --- end to end -----------------------------------------------------------------------------------
def test_late_tx_ack_stream_with_a_bus_that_sometimes_waits(tmp_path: Path) -> None:
    """Frames alternate between direct and writer-thread sends: the wire order, the other link's
    order and every LATE_TX_ACK answer stay right."""
    async def body() -> None:
        bus = can.Bus(interface="virtual", channel=f"s-{tmp_path.name}")
        watch = can.Bus(interface="virtual", channel=f"s-{tmp_path.name}")
        loop = asyncio.get_running_loop()
        try:
            async with inprocess_stack(tmp_path, 2, bus) as st:
                bridge = st.backend.bridge
                assert bridge is not None and bridge.direct is not None
                real = bridge.direct
                calls = [0]

                def sometimes(msg: can.Message) -> bool:
                    calls[0] += 1
                    return calls[0] % 7 != 0 and real(msg)

                bridge.direct = sometimes
                async with frontends((st.links[0], {}), (st.links[1], {})) as (a, b):
                    frames = [frame(i) for i in range(600)]
                    results: list[int] = []
                    for start in range(0, len(frames), 100):  # below b's 256 RX buffers
                        chunk = frames[start:start + 100]
                        results += await asyncio.gather(*(a.send(f) for f in chunk))
                        assert await recv_n(b, len(chunk)) == chunk
                    assert results == [OK] * len(frames)
                    seen = [await loop.run_in_executor(None, watch.recv, 5) for _ in frames]
                    assert [wire.frame_from_message(m) for m in seen] == frames
                    m = bridge.metrics
                    assert 0 < m.tx_direct < m.tx_count == len(frames)
                    assert not [s for s in st.backend.links.values() if s.pending]
        finally:
            watch.shutdown()

    run(body())


@pytest.mark.parametrize("late_tx_ack", [True, False])
def test_direct_bus_error_runs_the_bus_off_flow(tmp_path: Path, late_tx_ack: bool) -> None:
    async def body() -> None:
        bus = can.Bus(interface="virtual", channel=f"x-{tmp_path.name}")
        async with inprocess_stack(tmp_path, 2, bus) as st:
            bridge = st.backend.bridge
            assert bridge is not None and bridge.direct is not None
            real = bridge.direct
            fail = [False]

            def flaky(msg: can.Message) -> bool:
                if fail[0]:
                    raise can.CanOperationError("injected")
                return real(msg)

            bridge.direct = flaky
            async with frontends((st.links[0], {"late_tx_ack": late_tx_ack}),
                                 (st.links[1], {})) as (a, b):
                assert await a.send(frame(1)) == OK
                assert await recv_n(b, 1) == [frame(1)]
                fail[0] = True
                expected = OK if not late_tx_ack else wire.VIRTIO_CAN_RESULT_NOT_OK
                assert await a.send(frame(2)) == expected
                await a.wait_for(lambda: a.bus_off)
                await b.wait_for(lambda: b.bus_off)
                assert st.backend.bus_off_count == 1
                assert await a.send(frame(3)) == wire.VIRTIO_CAN_RESULT_NOT_OK  # STOPPED
                fail[0] = False
                assert await a.start_controller() == OK
                assert await b.start_controller() == OK
                assert await a.send(frame(4)) == OK
                assert await recv_n(b, 1) == [frame(4)]  # 2 and 3 never reached anyone
                svc = st.backend.links[st.links[0]]
                assert svc.stats()["tx_bus_fails"] == 1

    run(body())


def test_direct_path_keeps_the_virtual_bus_unchanged_for_other_users(tmp_path: Path) -> None:
    """Sending from the loop leaves python-can's virtual bus usable by its other users."""
    with virtual_pair(f"u-{tmp_path.name}") as (bus, watch):
        send = direct_sender(bus)
        assert send is not None
        msg = to_message(CanFrame.data_frame(0x1ABCDE, b"\x01\x02", extended=True))
        assert send(msg)
        got = watch.recv(1)
        assert got is not None and got.is_extended_id and got.arbitration_id == 0x1ABCDE
        assert bytes(got.data) == b"\x01\x02" and got.is_rx
        watch.send(can.Message(arbitration_id=0x5, data=b"x", is_extended_id=False))
        back = bus.recv(1)
        assert back is not None and back.arbitration_id == 0x5
