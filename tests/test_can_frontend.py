"""The Python virtio-can driver's TX bounce slots: a slab per bring-up, the allocator for the rest.

Every slot taken for a request comes back when it completes, whatever the answer; a request too
big for a slot (``send_raw`` of anything) takes an allocation as before; a reconnect builds a new
slab in the new allocator.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import can

from ivshmem_virtio.frontend.can import REAP_BATCH
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import CanFrame, encode_frame

from .can_helpers import frontend, frontends, inprocess_stack, recv_n, wait_until
from .conftest import run

OK, NOT_OK = wire.VIRTIO_CAN_RESULT_OK, wire.VIRTIO_CAN_RESULT_NOT_OK


def frame(i: int, n: int = 8, fd: bool = False) -> CanFrame:
    return CanFrame.data_frame(i & 0x7FF, bytes((i + k) & 0xFF for k in range(n)), fd=fd)


def test_tx_slots_come_back_and_big_requests_use_the_allocator(tmp_path: Path) -> None:
    async def body() -> None:
        bus = can.Bus(interface="virtual", channel=f"slots-{tmp_path.name}")
        async with inprocess_stack(tmp_path, 2, bus) as st:
            async with frontends((st.links[0], {}), (st.links[1], {"fd": False})) as (a, c):
                assert a.fd and not c.fd
                assert a._tx_slot_size == 128 and c._tx_slot_size == 32  # 16 + 64 + 1, 16 + 8 + 1
                slots = len(a._tx_slots)
                assert slots == a.vqs[wire.TXQ].size // 2
                frames = [frame(i, 64 if i % 2 else 8, fd=bool(i % 2)) for i in range(400)]
                assert await asyncio.gather(*(a.send(f) for f in frames)) == [OK] * 400
                assert len(a._tx_slots) == slots  # more requests than slots: the rest queued
                alloc = a.transport.allocator
                assert alloc is not None
                free = alloc.free_bytes
                big = encode_frame(frame(1), wire.VIRTIO_CAN_TX) + bytes(200)  # tail ignored
                assert await a.send_raw(big) == OK
                assert await a.send_raw(b"\0" * 16 + bytes(200)) == NOT_OK  # msg_type 0
                assert alloc.free_bytes == free and len(a._tx_slots) == slots
                # a classic link's slots hold classic frames; a refused FD one is answered too
                assert await c.send(frame(5, 12, fd=True)) == NOT_OK
                assert await c.send(frame(6)) == OK
                assert len(c._tx_slots) == c.vqs[wire.TXQ].size // 2
                got = await recv_n(c, len([f for f in frames if not f.fd]) + 1)
                assert got == [f for f in frames if not f.fd] + [frame(1)]

    run(body())


def test_a_reconnect_builds_a_new_slab(tmp_path: Path) -> None:
    async def body() -> None:
        bus = can.Bus(interface="virtual", channel=f"reslab-{tmp_path.name}")
        async with inprocess_stack(tmp_path, 1, bus) as st:
            drv = await frontend(st.links[0])
            try:
                assert await drv.send(frame(1)) == OK
                st.runners[0].transport.mark_needs_reset("test")
                await wait_until(lambda: drv.bring_ups == 2 and drv.controller_started)
                assert len(drv._tx_slots) == drv.vqs[wire.TXQ].size // 2
                assert await asyncio.gather(*(drv.send(frame(i)) for i in range(300))) == \
                    [OK] * 300
                assert len(drv._tx_slots) == drv.vqs[wire.TXQ].size // 2
            finally:
                await drv.close()
                drv.dev.close()

    run(body())


def test_send_nowait_from_the_loop_keeps_order_and_counts_refusals(tmp_path: Path) -> None:
    """Frames put on the ring without waiting (the echo's way) all arrive, in order, and the
    slots come back; a frame the device refuses (an FD frame on a classic link) is counted in
    ``refused`` when its answer is reaped: by a send at the latest once ``REAP_BATCH`` slots
    are in use, and that reap frees every answered slot."""

    async def body() -> None:
        bus = can.Bus(interface="virtual", channel=f"nowait-{tmp_path.name}")
        async with inprocess_stack(tmp_path, 2, bus) as st:
            async with frontends((st.links[0], {"fd": False}), (st.links[1], {})) as (a, b):
                slots = len(a._tx_slots)
                sent = []
                for i in range(300):
                    f = frame(i)
                    if not a.send_nowait(f):  # ring or slab full: the waiting way
                        assert await a.send(f) == OK
                    sent.append(f)
                assert await recv_n(b, 300) == sent
                txq = a.vqs[wire.TXQ]

                def all_answered() -> bool:
                    return txq._used_idx[0] == txq.avail_idx

                assert a.send_nowait(frame(7, 12, fd=True))  # answered NOT_OK
                later: list[CanFrame] = []
                while not a.refused:  # (an interrupt of the loop may reap it too)
                    assert len(later) <= REAP_BATCH, "the NOT_OK answer was never reaped"
                    await wait_until(all_answered)
                    later.append(frame(8 + len(later)))
                    assert a.send_nowait(later[-1])
                assert a.take_refused() == 1
                assert await recv_n(b, len(later)) == later
                if later:  # a send reaped: every answered slot came back, its own is in use
                    assert len(a._tx_slots) == slots - 1

    run(body())
