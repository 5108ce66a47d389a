"""``doorbell``: ring/answer round trips between two SimIvshmem peers in separate processes.

The bench process joins a sim hub as ID 0 and rings vector 1 of an echo peer (ID 1, a child
process) that rings back. Two variants: ``raw`` waits with ``poll(2)`` on the eventfd and reads
it, the floor of the sim link; ``irqwaiter`` waits through :class:`IrqWaiter` in block mode under
uvloop on both sides, the wake-up path the runners use.
``python -m ivshmem_virtio.benchmarks.doorbell --socket S --variant V`` is the echo peer.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time

import numpy as np

from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.procs import cli

from .core import Context, Measurement, run_loop, summarize_ns

VECTOR = 1
VARIANTS = ("raw", "irqwaiter")


def _vector_fd(dev: SimIvshmem) -> int:
    return dev.interrupt_fds()[VECTOR]


def _raw_wait(poller: select.poll, fd: int, timeout_ms: int | None = None) -> None:
    while True:
        if not poller.poll(timeout_ms) and timeout_ms is not None:
            raise TimeoutError("the echo peer did not ring back")
        try:
            os.read(fd, 8)
            return
        except BlockingIOError:
            continue


def echo_raw(dev: SimIvshmem) -> None:
    fd = _vector_fd(dev)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    peer = dev.peer_id
    print("echo ready", flush=True)
    while True:
        _raw_wait(poller, fd)
        dev.doorbell(peer, VECTOR)


async def echo_waiter(dev: SimIvshmem) -> None:
    from ivshmem_virtio.link import IrqWaiter

    waiter = IrqWaiter(dev, mode="block")
    peer = dev.peer_id
    print("echo ready", flush=True)
    while True:
        await waiter.wait(_never)
        dev.doorbell(peer, VECTOR)


def _never() -> bool:
    return False


def _ping_raw(dev: SimIvshmem, rounds: int) -> np.ndarray:
    fd = _vector_fd(dev)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    now = time.perf_counter_ns
    out = np.empty(rounds, dtype=np.uint64)
    for i in range(rounds):
        t0 = now()
        dev.doorbell(1, VECTOR)
        _raw_wait(poller, fd, 5000)
        out[i] = now() - t0
    return out


async def _ping_waiter(dev: SimIvshmem, rounds: int) -> np.ndarray:
    from ivshmem_virtio.link import IrqWaiter

    waiter = IrqWaiter(dev, mode="block")
    now = time.perf_counter_ns
    out = np.empty(rounds, dtype=np.uint64)
    try:
        for i in range(rounds):
            t0 = now()
            dev.doorbell(1, VECTOR)
            await waiter.wait(_never, timeout=5.0)
            out[i] = now() - t0
            if out[i] >= 5_000_000_000:
                raise TimeoutError("the echo peer did not ring back")
    finally:
        waiter.close()
    return out


def run_doorbell(ctx: Context) -> None:
    """Round trips over the sim link, raw and through IrqWaiter."""
    rounds = ctx.pick(2_000, 50_000)
    warmup = max(100, rounds // 20)
    sock = str(ctx.workdir / "doorbell.sock")
    for variant in VARIANTS:
        with ctx.children_scope():
            hub = ctx.child("doorbell-hub", cli("hub", "--socket", sock))
            hub.wait_for("hub listening")
            dev = SimIvshmem(sock, requested_id=0)
            try:
                dev.set_int_control(True)
                echo = ctx.child(f"doorbell-echo-{variant}",
                                 [sys.executable, "-m", "ivshmem_virtio.benchmarks.doorbell",
                                  "--socket", sock,
                                  "--variant", variant])
                echo.wait_for("echo ready")
                ctx.progress.update(f"doorbell: {variant}, {rounds} round trips")
                if variant == "raw":
                    samples = _ping_raw(dev, rounds + warmup)[warmup:]
                else:
                    samples = run_loop(_ping_waiter(dev, rounds + warmup),
                                       timeout=60 + rounds * 0.01)[warmup:]
            finally:
                dev.close()
        title = ("doorbell round trip, sim link, poll(2)+read" if variant == "raw" else
                 "doorbell round trip, sim link, IrqWaiter block mode (uvloop)")
        ctx.add(Measurement(f"doorbell.{variant}", "doorbell", title,
                            params={"rounds": rounds, "warmup": warmup, "vector": VECTOR,
                                    "processes": 2},
                            latency_us=summarize_ns(samples), samples_ns=samples))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ivshmem_virtio.benchmarks.doorbell")
    p.add_argument("--socket", required=True)
    p.add_argument("--variant", choices=VARIANTS, default="raw")
    args = p.parse_args(argv)
    dev = SimIvshmem(args.socket, requested_id=1)
    dev.set_int_control(True)
    if args.variant == "raw":
        echo_raw(dev)
    else:
        run_loop(echo_waiter(dev), timeout=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
