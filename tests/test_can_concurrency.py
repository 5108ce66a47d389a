"""python-can senders on several threads at once, and no lost wake-up on the CAN paths.

Every test here runs the backend as a process (``ivshmem-virtio can``, two links on one switch)
and two ``ivshmem`` python-can buses in the test process. They check correctness only: every
frame arrives exactly once, in each sender's order, within a generous timeout; never timing.

The wake-up test waits for each burst to arrive before it pauses (longer than any spin
window), so a notification that is lost is not rescued by the next burst: it shows up as a
burst that never completes.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import can
import pytest

from tests.can_helpers import ensure_interfaces, proc_stack

WINDOW = 32  # frames a sender has unreceived: four of them fit the receiver's 256 RX buffers
TIMEOUT = 20.0  # seconds for any one burst: generous, a lost wake-up never completes


class Collector(can.Listener):
    """Frames a bus received (``can.Notifier`` calls it from its thread)."""

    def __init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self.cond = threading.Condition()

    def on_message_received(self, msg: can.Message) -> None:
        with self.cond:
            self.frames.append((msg.arbitration_id, bytes(msg.data)))
            self.cond.notify_all()

    def wait_for(self, sender: int, n: int, timeout: float = TIMEOUT) -> None:
        """Until ``n`` frames of ``sender`` arrived."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while sum(1 for c, _ in self.frames if c == 0x100 + sender) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"sender {sender}: {n} frames not there in {timeout} s")
                self.cond.wait(left)

    def wait_count(self, n: int, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.frames) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.frames)} of {n} frames arrived "
                                         f"within {timeout} s: a lost wake-up?")
                self.cond.wait(left)


def frame(sender: int, seq: int) -> can.Message:
    return can.Message(arbitration_id=0x100 + sender, data=seq.to_bytes(4, "little"),
                       is_extended_id=False)


def check_streams(got: list[tuple[int, bytes]], sent: dict[int, int]) -> None:
    """Every sender's frames arrived exactly once and in its order (and nothing else)."""
    per: dict[int, list[int]] = {}
    for can_id, data in got:
        per.setdefault(can_id - 0x100, []).append(int.from_bytes(data, "little"))
    assert set(per) == {s for s, n in sent.items() if n}, per.keys()
    for sender, seqs in per.items():
        assert seqs == list(range(sent[sender])), f"sender {sender}: lost, duplicated or " \
                                                  f"reordered ({len(seqs)} of {sent[sender]})"


@pytest.fixture
def cpu_hog() -> Iterator[None]:
    """A busy process beside the test (ended by its pid)."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait(10)


def open_pair(links: list[str], mode: str, late_a: bool, late_b: bool) -> tuple[can.BusABC,
                                                                                can.BusABC]:
    ensure_interfaces()
    a = can.Bus(interface="ivshmem", channel=links[0], late_tx_ack=late_a, mode=mode)
    try:
        b = can.Bus(interface="ivshmem", channel=links[1], late_tx_ack=late_b, mode=mode)
    except BaseException:
        a.shutdown()
        raise
    return a, b


@pytest.mark.parametrize("late_tx_ack", [False, True])
def test_threads_send_at_once_beside_a_notifier(tmp_path: Path, late_tx_ack: bool) -> None:
    """Four threads send on one bus while its Notifier receives what a thread of the other bus
    sends: every frame arrives once, each thread's in order, both ways."""
    threads, per_thread = 4, 400
    bus_arg = f"virtual:thr{os.getpid()}{int(late_tx_ack)}"
    with proc_stack(tmp_path, 2, "--fd", "--bus", bus_arg) as st:
        a, b = open_pair(st.links, "block", late_tx_ack, late_tx_ack)
        got_a, got_b = Collector(), Collector()
        notifiers = [can.Notifier(a, [got_a], timeout=0.1),
                     can.Notifier(b, [got_b], timeout=0.1)]
        try:
            def send(bus: can.BusABC, sender: int) -> None:
                for seq in range(per_thread):
                    bus.send(frame(sender, seq), TIMEOUT)
                    if seq % WINDOW == WINDOW - 1:  # the receiver's RX ring holds 256 frames
                        (got_a if bus is b else got_b).wait_for(sender, seq + 1)

            with concurrent.futures.ThreadPoolExecutor(threads + 1) as pool:
                jobs = [pool.submit(send, a, t) for t in range(threads)]
                jobs.append(pool.submit(send, b, threads))
                for job in jobs:
                    job.result(60)
            got_b.wait_count(threads * per_thread)
            got_a.wait_count(per_thread)
            time.sleep(0.05)  # nothing more may come (a duplicate)
            check_streams(got_b.frames, {t: per_thread for t in range(threads)})
            check_streams(got_a.frames, {threads: per_thread})
            assert a.tx_errors == 0 and b.tx_errors == 0
        finally:
            for n in notifiers:
                n.stop()
            a.shutdown()
            b.shutdown()


@pytest.mark.parametrize("mode", ["block", "poll", "adaptive"])
def test_no_lost_wakeup_over_bursts_and_pauses(tmp_path: Path, mode: str,
                                              cpu_hog: None) -> None:
    """Bursts from a random mix of senders (two threads of a bus without LATE_TX_ACK, one of a
    bus with it), each waited for, then a pause of 0-5 ms (past any spin window), with the
    backend and both frontends in ``mode`` and a CPU hog beside them."""
    rng = random.Random(12)
    rounds = 150
    with proc_stack(tmp_path, 2, "--fd", "--mode", mode,
                    "--bus", f"virtual:wake{os.getpid()}{mode}") as st:
        a, b = open_pair(st.links, mode, False, True)
        got_a, got_b = Collector(), Collector()
        notifiers = [can.Notifier(a, [got_a], timeout=0.1),
                     can.Notifier(b, [got_b], timeout=0.1)]
        buses = {0: a, 1: a, 2: b}  # senders 0, 1 on link 0 (reach b); 2 on link 1 (reach a)
        sent = dict.fromkeys(buses, 0)
        try:
            def burst(sender: int, n: int) -> None:
                for _ in range(n):
                    buses[sender].send(frame(sender, sent[sender]), TIMEOUT)
                    sent[sender] += 1

            with concurrent.futures.ThreadPoolExecutor(len(buses)) as pool:
                for _ in range(rounds):
                    who = [s for s in buses if rng.random() < 0.6] or [rng.choice(list(buses))]
                    jobs = [pool.submit(burst, s, rng.choice((1, 1, 2, 5, 17))) for s in who]
                    for job in jobs:
                        job.result(TIMEOUT * 2)  # a lost TX answer: send() raises
                    got_b.wait_count(sent[0] + sent[1])
                    got_a.wait_count(sent[2])
                    time.sleep(rng.choice((0.0, 0.001, 0.002, 0.005)))
            check_streams(got_b.frames, {0: sent[0], 1: sent[1]})
            check_streams(got_a.frames, {2: sent[2]})
        finally:
            for n in notifiers:
                n.stop()
            a.shutdown()
            b.shutdown()
