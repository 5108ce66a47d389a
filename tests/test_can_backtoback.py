"""One back-to-back suite, two interfaces: python-can's ``virtual`` and our ``ivshmem``.

Every test body is identical for both; only the ``make_bus`` fixture knows how to open a bus.
For ``ivshmem`` each bus is a virtio-can frontend on its own link of one ``ivshmem-virtio can``
backend process (hubs and backend are started once for the module), so a frame goes through
the python-can API, the virtio rings, the backend's switch and back out again. The buses are
opened with ``can.Bus(interface=...)``, as any python-can user would.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator

import can
import pytest

from .can_helpers import ProcStack, ensure_interfaces, msg, recv_all, same

MakeBus = Callable[..., can.BusABC]
_names = itertools.count()


@pytest.fixture(scope="module")
def ivshmem_links(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    ensure_interfaces()
    st = ProcStack(tmp_path_factory.mktemp("b2b"), 3, ("--fd",))
    st.start()
    try:
        yield st.links
    finally:
        assert st.stop()["can-backend"] == 0, st.backend.log()


@pytest.fixture(params=["virtual", "ivshmem"])
def make_bus(request: pytest.FixtureRequest) -> Iterator[MakeBus]:
    buses: list[can.BusABC] = []
    if request.param == "virtual":
        channel = f"b2b-{next(_names)}"

        def make(**kw: object) -> can.BusABC:
            bus = can.Bus(interface="virtual", channel=channel, **kw)
            buses.append(bus)
            return bus
    else:
        links = iter(request.getfixturevalue("ivshmem_links"))

        def make(**kw: object) -> can.BusABC:
            bus = can.Bus(interface="ivshmem", channel=next(links), **kw)
            buses.append(bus)
            return bus
    try:
        yield make
    finally:
        for bus in buses:
            bus.shutdown()


# --- the suite ------------------------------------------------------------------------------------
def test_classic_frame(make_bus: MakeBus) -> None:
    a, b = make_bus(), make_bus()
    sent = msg(0x123, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    a.send(sent)
    got = b.recv(10)
    assert got is not None and same(got, sent)
    assert got.is_rx and got.timestamp > 0 and not got.is_error_frame


def test_standard_and_extended_ids(make_bus: MakeBus) -> None:
    a, b = make_bus(), make_bus()
    sent = [msg(0, b""), msg(0x7FF, b"\xff"), msg(0x555, b"std", is_extended_id=False),
            msg(0x555, b"ext", is_extended_id=True), msg(0x1FFFFFFF, b"max"), msg(0x800, b"x")]
    for m in sent:
        a.send(m)
    got = recv_all(b, len(sent))
    assert all(same(g, s) for g, s in zip(got, sent, strict=True))


def test_fd_frames_of_every_length(make_bus: MakeBus) -> None:
    a, b = make_bus(fd=True), make_bus(fd=True)
    lengths = [0, 1, 7, 8, 12, 16, 20, 24, 32, 48, 64]
    sent = [msg(0x100 + n, bytes(range(n)), is_fd=True) for n in lengths]
    for m in sent:
        a.send(m)
    got = recv_all(b, len(sent))
    assert all(same(g, s) for g, s in zip(got, sent, strict=True))
    assert all(g.is_fd for g in got)


def test_remote_frames_keep_their_dlc(make_bus: MakeBus) -> None:
    a, b = make_bus(), make_bus()
    sent = [msg(0x200 + d, is_remote_frame=True, dlc=d) for d in range(9)]
    sent.append(msg(0x18DAF110, is_remote_frame=True, dlc=3))
    for m in sent:
        a.send(m)
    got = recv_all(b, len(sent))
    assert all(same(g, s) for g, s in zip(got, sent, strict=True))


def test_order_is_kept(make_bus: MakeBus) -> None:
    a, b = make_bus(), make_bus()
    sent = [msg(i & 0x7FF, i.to_bytes(4, "little"), is_extended_id=False) for i in range(500)]
    for m in sent:
        a.send(m)
    got = recv_all(b, len(sent))
    assert [bytes(g.data) for g in got] == [bytes(s.data) for s in sent]


def test_every_other_node_hears_a_frame(make_bus: MakeBus) -> None:
    a, b, c = make_bus(), make_bus(), make_bus()
    a.send(msg(0x10, b"a"))
    c.send(msg(0x30, b"c"))
    assert [m.arbitration_id for m in recv_all(b, 2)] == [0x10, 0x30]
    assert [m.arbitration_id for m in recv_all(c, 1)] == [0x10]
    assert [m.arbitration_id for m in recv_all(a, 1)] == [0x30]


def test_no_echo_to_the_sender_by_default(make_bus: MakeBus) -> None:
    a, b = make_bus(), make_bus()
    a.send(msg(0x42, b"once"))
    assert b.recv(10) is not None
    assert a.recv(0.2) is None


def test_receive_own_messages(make_bus: MakeBus) -> None:
    a, b = make_bus(receive_own_messages=True), make_bus()
    sent = msg(0x43, b"echo")
    a.send(sent)
    own = a.recv(10)
    assert own is not None and same(own, sent) and not own.is_rx
    other = b.recv(10)
    assert other is not None and same(other, sent) and other.is_rx


def test_recv_timeout(make_bus: MakeBus) -> None:
    a = make_bus()
    assert a.recv(0.05) is None
    assert a.recv(0) is None


def test_filters(make_bus: MakeBus) -> None:
    a, b = make_bus(), make_bus(can_filters=[{"can_id": 0x100, "can_mask": 0x7F0,
                                             "extended": False}])
    for can_id in (0x205, 0x105, 0x10F, 0x110):
        a.send(msg(can_id, b"f", is_extended_id=False))
    got = [m.arbitration_id for m in recv_all(b, 2)]
    assert got == [0x105, 0x10F]
    a.send(msg(0x101, b"last", is_extended_id=False))  # all sent before it were delivered
    last = b.recv(10)
    assert last is not None and last.arbitration_id == 0x101


def test_iteration(make_bus: MakeBus) -> None:
    a, b = make_bus(), make_bus()
    for i in range(3):
        a.send(msg(0x50 + i, bytes([i])))
    it = iter(b)
    assert [next(it).arbitration_id for _ in range(3)] == [0x50, 0x51, 0x52]


def test_asyncio_notifier(make_bus: MakeBus) -> None:
    """can.Notifier on an event loop (it uses fileno() where the bus has one)."""
    a, b = make_bus(), make_bus()

    async def body() -> list[int]:
        reader = can.AsyncBufferedReader()
        notifier = can.Notifier(b, [reader], loop=asyncio.get_running_loop())
        try:
            loop = asyncio.get_running_loop()
            for i in range(20):
                await loop.run_in_executor(None, a.send, msg(0x60, bytes([i])))
            return [(await asyncio.wait_for(reader.get_message(), 10)).data[0]
                    for _ in range(20)]
        finally:
            notifier.stop()

    assert asyncio.run(body()) == list(range(20))


def test_state_and_shutdown(make_bus: MakeBus) -> None:
    a = make_bus()
    assert a.state == can.BusState.ACTIVE
    a.shutdown()
    a.shutdown()  # idempotent
