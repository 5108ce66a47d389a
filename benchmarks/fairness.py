"""``fairness``: one disk of a ``serve`` daemon under attack, another measured beside it.

Two disks ``a`` and ``b`` served by one ``ivshmem-virtio serve`` (one event loop, as in a root
cell). A well-behaved frontend reads 512 B at QD1 from ``b`` for a few seconds in four states:
nothing else running; a CPU hog beside it (the control: an attacker costs at least a busy CPU);
a doorbell storm on ``a``; an avail flood on ``a`` (its avail index kept a ring ahead with valid
requests: benchmarks/flood.py). The goals compare ``b``'s reads/s and p99 under attack with the
control, measured in the same run.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from ivshmem_virtio.procs import cli

from .core import Context, Measurement, run_loop, summarize_ns

LOADS = ("none", "cpu-hog", "doorbell", "avail")
HOG = [sys.executable, "-c", "while True: pass"]


async def _reads(link: str, seconds: float) -> np.ndarray:
    from ivshmem_virtio.frontend.blk import BlkClient
    from ivshmem_virtio.ivshmem.sim import SimIvshmem

    dev = SimIvshmem(link.removeprefix("sim:"), 1)
    client = BlkClient(dev, mode="block", timeout=10.0)  # sleeps like Linux's driver
    try:
        await client.start(timeout=10.0)
        lat: list[int] = []
        now = time.perf_counter_ns
        end = now() + int(seconds * 1e9)
        i = 0
        while True:
            t0 = now()
            if t0 >= end:
                break
            await client.read((i * 4096) % (1 << 20), 512)
            lat.append(now() - t0)
            i += 1
        return np.array(lat, dtype=np.uint64)
    finally:
        await client.close()
        dev.close()


def run_fairness(ctx: Context) -> None:
    """b's QD1 reads/s and latency beside nothing, a CPU hog, a doorbell storm and a flood."""
    seconds = ctx.pick(2.0, 5.0)
    work = ctx.workdir
    socks = {n: str(work / f"fair-{n}.sock") for n in "ab"}
    images = {"a": work / "fair-a.img", "b": ctx.image()}  # a: only the flood's sector 0
    with open(images["a"], "wb") as f:
        f.write(bytes(1 << 20))
    cfg = work / "fairness.toml"
    cfg.write_text("".join(
        f'[[devices]]\nname = "{n}"\ntype = "blk"\nlink = "sim:{socks[n]}"\n'
        f'image = "{images[n]}"\n' for n in "ab"))
    with ctx.children_scope():
        for n in "ab":
            ctx.child(f"fair-hub-{n}", cli("hub", "--socket", socks[n])).wait_for(
                "hub listening")
        ctx.child("fair-serve", cli("serve", "--config", str(cfg))).wait_for(
            "serve ready", timeout=20)
        for load in LOADS:
            ctx.progress.update(f"fairness: b for {seconds:.0f} s, load on a: {load}")
            with ctx.children_scope():
                extra: dict[str, Any] = {}
                flood = None
                if load == "cpu-hog":
                    ctx.child("fair-hog", HOG)
                elif load != "none":
                    flood = ctx.child(f"fair-{load}", [
                        sys.executable, "-m", "ivshmem_virtio.benchmarks.flood", socks["a"], load,
                        str(seconds + 5)])
                    flood.wait_for("flooding", timeout=20)
                samples = run_loop(_reads(f"sim:{socks['b']}", seconds), timeout=60 + seconds)
            if flood is not None and "served " in flood.log():
                extra["a_served"] = int(flood.log().rsplit("served ", 1)[1].split()[0])
            ctx.add(Measurement(
                f"fairness.{load}", "fairness",
                f"disk b, 512 B reads QD1, one serve daemon; on disk a: {load}",
                params={"seconds": seconds, "load": load, "frontend_mode": "block"},
                ops_per_s=len(samples) / seconds, latency_us=summarize_ns(samples),
                samples_ns=samples, extra=extra))


