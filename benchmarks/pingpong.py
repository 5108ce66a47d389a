"""Two-process ping-pong in Python: the floor a Python frontend and backend can reach.

``python -m ivshmem_virtio.benchmarks.pingpong eventfd|spin ROUNDS WARMUP OUTFILE`` mirrors
pingpong.c: the parent
pings, a forked child answers, over one blocking eventfd per direction or a busy-polled sequence
number in shared memory. Round trips go to OUTFILE as native uint64 nanoseconds.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import sys
import time


def _eventfd(rounds: int, warmup: int) -> array.array:
    to_child = os.eventfd(0, os.EFD_CLOEXEC)
    to_parent = os.eventfd(0, os.EFD_CLOEXEC)
    total = rounds + warmup
    pid = fork_pinned()
    if pid == 0:
        try:
            for _ in range(total):
                os.eventfd_read(to_child)
                os.eventfd_write(to_parent, 1)
        finally:
            os._exit(0)
    lat = array.array("Q", bytes(8 * rounds))
    now = time.perf_counter_ns
    put, take = os.eventfd_write, os.eventfd_read
    for i in range(total):
        t0 = now()
        put(to_child, 1)
        take(to_parent)
        if i >= warmup:
            lat[i - warmup] = now() - t0
    _reap(pid)
    return lat


def _spin(rounds: int, warmup: int) -> array.array:
    shm = mmap.mmap(-1, 4096)  # anonymous and MAP_SHARED: both processes see the same page
    words = memoryview(shm).cast("Q")  # ping at word 0, pong at word 8 (another cache line)
    total = rounds + warmup
    pid = fork_pinned()
    if pid == 0:
        try:
            for i in range(1, total + 1):
                while words[0] != i:
                    pass
                words[8] = i
        finally:
            os._exit(0)
    lat = array.array("Q", bytes(8 * rounds))
    now = time.perf_counter_ns
    for i in range(1, total + 1):
        t0 = now()
        words[0] = i
        while words[8] != i:
            pass
        if i > warmup:
            lat[i - warmup - 1] = now() - t0
    _reap(pid)
    return lat


def pin_from_env(which: int) -> None:
    """Pin this process to CPU ``which`` (0 parent, 1 child) of IVSHMEM_BENCH_CPUS="A,B".

    Set by the bench: two cells always run on two different CPUs, and an unpinned pair may
    share one (a wake-up without an IPI: ~1.4 us instead of 4-11 us on the VM measured here).
    """
    cpus = os.environ.get("IVSHMEM_BENCH_CPUS", "").split(",")
    if len(cpus) == 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(cpus[which])})


def fork_pinned() -> int:
    """``os.fork()`` for a two-process round trip: parent and child each on its CPU (see
    :func:`pin_from_env`), the child killed with its parent (it may be spinning)."""
    pin_from_env(0)
    pid = os.fork()
    if pid == 0:
        _die_with_parent()
        pin_from_env(1)
    return pid


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG = SIGKILL: a spinning child must not outlive a killed parent."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("ping-pong child failed")


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in ("eventfd", "spin"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, rounds, warmup, out = argv[0], int(argv[1]), int(argv[2]), argv[3]
    lat = (_eventfd if mode == "eventfd" else _spin)(rounds, warmup)
    with open(out, "wb") as f:
        lat.tofile(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
