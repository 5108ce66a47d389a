"""The adaptive waiting policy: one poll window per waiter, KVM's halt-polling rule."""

from __future__ import annotations

import asyncio
import os

import uvloop

from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.link import IrqWaiter, PollWindow
from ivshmem_virtio.shm import Region

US = 1e-6


def us(w: PollWindow) -> float:
    return round(w.window / US, 3)


def test_grows_from_start_by_doubling_up_to_the_cap():
    w = PollWindow(cap_us=100, start_us=10)
    assert w.window == 0  # no polling before a wake-up says it pays
    seen = []
    for _ in range(6):
        w.record(50 * US, caught=False, now=1.0)  # woke 50 us after going idle: < cap
        seen.append(us(w))
    assert seen == [10, 20, 40, 80, 100, 100]


def test_caught_keeps_the_window():
    w = PollWindow(cap_us=100, start_us=10)
    w.record(50 * US, False, 1.0)
    w.record(50 * US, False, 1.0)
    w.record(5 * US, caught=True, now=1.0)
    assert us(w) == 20 and w.caught == 1


def test_long_idle_halves_then_stops_polling():
    w = PollWindow(cap_us=100, start_us=10)
    for _ in range(5):
        w.record(50 * US, False, 1.0)
    assert us(w) == 100
    seen = []
    for _ in range(5):
        w.record(0.5, caught=False, now=2.0)  # idle for 0.5 s: no window would catch it
        seen.append(us(w))
    assert seen == [50, 25, 12.5, 0, 0]


def test_one_preempted_poll_halves_the_window():
    w = PollWindow(cap_us=100, start_us=10)
    for _ in range(4):
        w.record(50 * US, False, 1.0)
    w.judge(polled=80 * US, cpu=10 * US, now=1.0)  # 1/8 of the wall time on a CPU
    assert us(w) == 40 and w.preemptions == 1 and w.hold_until == 0
    w.judge(polled=30 * US, cpu=29 * US, now=1.0)  # a clean poll: the strike is forgotten
    w.judge(polled=80 * US, cpu=10 * US, now=1.0)
    assert us(w) == 20 and w.hold_until == 0


def test_preempted_twice_in_a_row_drops_the_window_and_holds_it_with_a_growing_back_off():
    w = PollWindow(cap_us=100, start_us=10)
    for _ in range(4):
        w.record(50 * US, False, 1.0)
    w.judge(polled=80 * US, cpu=10 * US, now=1.0)
    w.judge(polled=40 * US, cpu=5 * US, now=1.0)
    assert w.window == 0 and w.preemptions == 2
    w.record(50 * US, False, 1.0 + PollWindow.HOLD_MIN / 2)
    assert w.window == 0  # held
    w.record(50 * US, False, 1.0 + PollWindow.HOLD_MIN)
    assert us(w) == 10  # grows again
    w.judge(polled=30 * US, cpu=1 * US, now=2.0)  # still oversubscribed: held again, longer
    # the second hold is twice as long
    assert round(w.hold_until - 2.0, 9) == 2 * PollWindow.HOLD_MIN
    w.judge(polled=30 * US, cpu=29 * US, now=3.0)  # a poll that kept its CPU: hold resets
    assert w.hold == PollWindow.HOLD_MIN and w.strikes == 0


def test_short_polls_are_not_judged():
    w = PollWindow(cap_us=100, start_us=10)
    w.record(50 * US, False, 1.0)
    w.judge(polled=5 * US, cpu=0.0, now=1.0)
    assert us(w) == 10


class _EventfdDevice(IvshmemDevice):
    """Just enough of a device for IrqWaiter: one eventfd as the interrupt."""

    def __init__(self) -> None:
        self.id, self.max_peers, self.vectors, self.protocol, self.name = 0, 2, 1, 0, "efd"
        self.state_table = self.rw = Region(bytearray(64))
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)

    def set_state(self, value: int) -> None: ...
    def doorbell(self, peer: int, vector: int) -> None: ...
    def set_int_control(self, enabled: bool) -> None: ...

    def interrupt_fds(self) -> list[int]:
        return [self.efd]

    def ack_interrupts(self) -> int:
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def ring(self) -> None:
        os.eventfd_write(self.efd, 1)

    def close(self) -> None:
        os.close(self.efd)


def _run(coro_fn):
    dev = _EventfdDevice()
    try:
        return uvloop.run(coro_fn(dev))
    finally:
        dev.close()


def test_adaptive_waiter_learns_to_poll_and_catches_work_without_an_interrupt(monkeypatch):
    # (its short polls are not judged here: on a loaded test machine a 10 us poll preempted
    # mid-way is rightly judged "preempted" and halved, which is another test's subject)
    monkeypatch.setattr(PollWindow, "MEASURED", float("inf"))

    async def body(dev):
        waiter = IrqWaiter(dev, mode="adaptive", spin_us=50_000)
        loop = asyncio.get_running_loop()
        async def ring_once_asleep() -> None:
            # (not after a fixed delay: on a loaded machine a poll preempted for longer would
            # see the interrupt while still polling, which neither grows nor shrinks)
            while not waiter._sleeping:
                await asyncio.sleep(0)
            dev.ring()

        for _ in range(3):  # quick interrupts after each sleep began: each grows the window
            ring = loop.create_task(ring_once_asleep())
            await waiter.wait(lambda: False)
            await ring
        assert us(waiter.policy) == 40  # 10, 20, 40
        waiter.policy.window = 0.05  # (a preemption on a loaded machine cannot outlast it)
        flag: list[int] = []
        loop.call_soon(flag.append, 1)  # work shows up while it polls, no interrupt at all
        await waiter.wait(lambda: bool(flag))
        assert waiter.policy.caught == 1
        waiter.close()

    _run(body)


def test_idle_waiter_stops_polling():
    """An idle link must not burn a core: after long gaps the window is 0 and a wait sleeps
    after one look at the rings (counted, not timed)."""

    async def body(dev):
        waiter = IrqWaiter(dev, mode="adaptive", spin_us=200)
        waiter.policy.window = 200e-6
        loop = asyncio.get_running_loop()
        for _ in range(6):
            loop.call_later(0.01, dev.ring)  # 10 ms gaps: far past the cap
            await waiter.wait(lambda: False)
        assert waiter.policy.window == 0
        looks = []
        loop.call_later(0.05, dev.ring)
        await waiter.wait(lambda: looks.append(1) is not None)  # never work
        assert len(looks) == 1  # the re-check before sleeping, no polling
        waiter.close()

    _run(body)


def test_kick_without_poll_and_nothing_expected_sleep_at_once():
    async def body(dev):
        expected = [True]
        waiter = IrqWaiter(dev, mode="adaptive", spin_us=50_000,
                           expecting=lambda: expected[0])
        waiter.policy.window = 0.05
        loop = asyncio.get_running_loop()
        looks = []

        def look() -> bool:
            looks.append(1)
            return False

        waiter.kick(poll=False)
        await waiter.wait(look)  # the kick is pending: returns at once
        loop.call_later(0.01, dev.ring)
        await waiter.wait(look)  # the kick's "no poll" holds for this wait
        assert len(looks) == 1
        expected[0] = False
        looks.clear()
        loop.call_later(0.01, dev.ring)
        await waiter.wait(look)  # nothing in flight: nothing to poll for
        assert len(looks) == 1
        waiter.close()

    _run(body)


def test_block_and_poll_modes_ignore_the_window():
    async def body(dev):
        blocker = IrqWaiter(dev, mode="block", spin_us=50_000)
        blocker.policy.window = 0.05
        looks = []
        asyncio.get_running_loop().call_later(0.01, dev.ring)
        await blocker.wait(lambda: looks.append(1) is not None)
        assert len(looks) == 1
        blocker.close()
        poller = IrqWaiter(dev, mode="poll")
        n = []
        await poller.wait(lambda: (n.append(1), len(n) > 1000)[1])  # polls until work
        assert len(n) == 1001
        poller.close()

    _run(body)


def test_a_doorbell_storm_is_muted_then_looked_at_again():
    """More than STORM interrupts that brought nothing within STORM_S: the fds are not watched
    for MUTE_S (a storm costs bounded CPU), then watched again and the waiter woken, so an
    interrupt that came with the storm is not lost."""
    from ivshmem_virtio.link import STORM

    async def body(dev):
        waiter = IrqWaiter(dev, mode="block")
        for _ in range(STORM):
            waiter.empty_interrupt()
        assert waiter.muted == 0 and waiter._fds == [dev.efd]
        waiter.empty_interrupt()
        assert waiter.muted == 1 and waiter._fds == []
        dev.ring()  # real work arrives during the mute
        await asyncio.wait_for(waiter.wait(lambda: False), 1.0)  # woken at the mute's end
        assert waiter._fds == [dev.efd]  # watched again
        waiter.close()

    _run(body)


def test_only_a_doorbell_rung_while_awake_counts_as_an_empty_wake_up():
    """woke_for_nothing (the owner's turn found nothing) counts toward a storm only when a
    doorbell rang while the owner was awake, once per doorbell; an in-process kick (a stop, an
    inline spin handing over) is not a peer's doorbell."""

    async def body(dev):
        waiter = IrqWaiter(dev, mode="block")
        waiter.kick()
        await waiter.wait(lambda: False)
        waiter.woke_for_nothing()
        assert waiter._storm_n == 0
        dev.ring()
        await asyncio.sleep(0.01)  # the fd callback runs while the owner is not in wait()
        await waiter.wait(lambda: False)  # returns at once: the doorbell set the event
        waiter.woke_for_nothing()
        assert waiter._storm_n == 1
        waiter.woke_for_nothing()
        assert waiter._storm_n == 1  # that doorbell counted once
        waiter.close()

    _run(body)


def test_a_storm_turned_over_slowly_is_still_a_storm():
    """A slow CPU (a Raspberry Pi, an emulator) handles fewer empty interrupts per millisecond:
    a storm is counted within STORM_S, not per millisecond (here one every 1.2 ms)."""
    from ivshmem_virtio.link import STORM, STORM_S

    async def body(dev):
        waiter = IrqWaiter(dev, mode="block")
        assert (STORM + 1) * 1.2e-3 < STORM_S
        for _ in range(STORM + 1):
            waiter.empty_interrupt()
            await asyncio.sleep(1.2e-3)
        assert waiter.muted == 1
        waiter.close()

    _run(body)


def test_a_storm_that_goes_on_is_muted_longer_each_time():
    """A storm right after a mute ended doubles the next mute, up to MUTE_MAX_S, so a storm
    that never stops costs ~nothing; one that comes later starts again from MUTE_S."""
    from ivshmem_virtio.link import MUTE_MAX_S, MUTE_S, STORM

    async def body(dev):
        waiter = IrqWaiter(dev, mode="block")
        lengths = []
        for _ in range(8):
            for _ in range(STORM + 1):
                waiter.empty_interrupt()
            lengths.append(waiter._mute_s)
            waiter._unmute()  # (the mute's end, early)
        assert lengths[:3] == [MUTE_S, 2 * MUTE_S, 4 * MUTE_S] and lengths[-1] == MUTE_MAX_S
        assert waiter.muted == 8
        waiter._unmuted_at -= 1.0  # the last mute ended long ago
        for _ in range(STORM + 1):
            waiter.empty_interrupt()
        assert waiter._mute_s == MUTE_S
        waiter.close()

    _run(body)


def test_a_closed_waiter_stays_closed_after_a_mute():
    from ivshmem_virtio.link import MUTE_S, STORM

    async def body(dev):
        waiter = IrqWaiter(dev, mode="block")
        for _ in range(STORM + 1):
            waiter.empty_interrupt()
        waiter.close()
        await asyncio.sleep(MUTE_S * 3)
        assert waiter._fds == []

    _run(body)
