"""Several python-can buses on one ivshmem channel in one process (issue 14).

python-can users open more than one bus on a channel (a logger beside the application, a
``Notifier`` and a sender), as ``virtual`` and ``socketcan`` allow. The buses of a process share
the link's driver: each gets its own copy of every received frame, and a frame one of them sends
reaches the others, as SocketCAN's local loopback does; the link closes with the last bus.
"""

from __future__ import annotations

from collections.abc import Iterator

import can
import pytest

from .can_helpers import ProcStack, ensure_interfaces


@pytest.fixture(scope="module")
def links(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    ensure_interfaces()
    st = ProcStack(tmp_path_factory.mktemp("shared"), 2, ())
    st.start()
    try:
        yield st.links
    finally:
        assert st.stop()["can-backend"] == 0, st.backend.log()


def _msg(i: int) -> can.Message:
    return can.Message(arbitration_id=0x100 + i, data=bytes([i, 1, 2]), is_extended_id=False)


def test_two_buses_on_one_channel_each_get_every_frame(links):
    a1 = can.Bus(interface="ivshmem", channel=links[0])
    a2 = can.Bus(interface="ivshmem", channel=links[0])  # the second open shares the link
    b = can.Bus(interface="ivshmem", channel=links[1])
    try:
        assert a1._link is a2._link
        b.send(_msg(1))
        got1, got2 = a1.recv(10), a2.recv(10)
        assert got1 is not None and got2 is not None and got1 is not got2
        assert got1.arbitration_id == got2.arbitration_id == 0x101
        # one bus of the channel sends: the other bus of this process and the far link see it,
        # the sender does not (no receive_own_messages)
        a1.send(_msg(2))
        assert a2.recv(10).arbitration_id == 0x102
        assert b.recv(10).arbitration_id == 0x102
        assert a1.recv(0.2) is None
        # a Notifier on one bus and plain recv on the other, side by side
        seen: list[can.Message] = []
        notifier = can.Notifier(a2, [seen.append], timeout=0.1)
        try:
            for i in range(3, 8):
                b.send(_msg(i))
            assert [a1.recv(10).arbitration_id for _ in range(5)] == [0x103 + i for i in range(5)]
            deadline = 100
            while len(seen) < 5 and deadline:
                a1.recv(0.05)
                deadline -= 1
            assert [m.arbitration_id for m in seen] == [0x103 + i for i in range(5)]
        finally:
            notifier.stop()
        # the link stays up while one bus has it
        a1.shutdown()
        b.send(_msg(9))
        assert a2.recv(10).arbitration_id == 0x109
    finally:
        for bus in (a1, a2, b):
            bus.shutdown()
    # closed with the last bus, and opened afresh by the next one
    again = can.Bus(interface="ivshmem", channel=links[0])
    try:
        assert again._link is not a2._link
        b2 = can.Bus(interface="ivshmem", channel=links[1])
        try:
            b2.send(_msg(10))
            assert again.recv(10).arbitration_id == 0x10A
        finally:
            b2.shutdown()
    finally:
        again.shutdown()


def test_a_second_bus_with_other_options_is_refused(links):
    first = can.Bus(interface="ivshmem", channel=links[0], late_tx_ack=True)
    try:
        with pytest.raises(can.CanInitializationError, match="other options"):
            can.Bus(interface="ivshmem", channel=links[0], late_tx_ack=False)
        assert len(first._link.buses) == 1
    finally:
        first.shutdown()
