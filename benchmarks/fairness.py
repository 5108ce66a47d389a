"""``fairness``: one disk of a ``serve`` daemon under attack, another measured beside it.

Two disks ``a`` and ``b`` served by one ``ivshmem-virtio serve`` (one event loop, as in a root
cell). A well-behaved frontend reads 512 B at QD1 from ``b`` for a few seconds in four states:
nothing else running; a CPU hog beside it (the control: an attacker costs at least a busy CPU);
a doorbell storm on ``a``; an avail flood on ``a`` (its avail index kept a ring ahead with valid
requests: benchmarks/flood.py). The goals compare ``b``'s reads/s and p99 under attack with the
control, measured in the same run. Then two other arrangements, reported beside the goals: the
cells' CPUs (the daemon alone on one CPU, the load and b's driver on the other: a cell cannot take
the root cell's CPU on Jailhouse), and each disk served by a daemon of its own (the best that
serving each device in its own thread could do).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np

from ivshmem_virtio.procs import cli

from .core import Context, Measurement, run_loop, summarize_ns, two_cpus

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
    """b's QD1 reads/s and latency beside nothing, a CPU hog, a doorbell storm and a flood;
    then the same in the cells' CPU arrangement and with b served by a daemon of its own."""
    seconds = ctx.pick(2.0, 5.0)
    work = ctx.workdir
    socks = {n: str(work / f"fair-{n}.sock") for n in "ab"}
    images = {"a": work / "fair-a.img", "b": ctx.image()}  # a: only the flood's sector 0
    with open(images["a"], "wb") as f:
        f.write(bytes(1 << 20))

    def config(name: str, disks: str) -> str:
        cfg = work / f"fairness-{name}.toml"
        cfg.write_text("".join(
            f'[[devices]]\nname = "{n}"\ntype = "blk"\nlink = "sim:{socks[n]}"\n'
            f'image = "{images[n]}"\n' for n in disks))
        return str(cfg)

    with ctx.children_scope():
        for n in "ab":
            ctx.child(f"fair-hub-{n}", cli("hub", "--socket", socks[n])).wait_for(
                "hub listening")
        with ctx.children_scope():
            serve = ctx.child("fair-serve", cli("serve", "--config", config("ab", "ab")))
            serve.wait_for("serve ready", timeout=20)
            _loads(ctx, "", LOADS, socks, seconds)
            cpus = two_cpus()
            if cpus is not None:
                # the cells' arrangement: the root cell's daemon alone on its CPU; the attacker
                # (or the hog) and b's driver on the other, where they cannot take the
                # daemon's CPU (on Jailhouse a cell never runs on the root cell's CPUs)
                saved = os.sched_getaffinity(serve.pid)
                os.sched_setaffinity(serve.pid, {cpus[0]})
                try:
                    _loads(ctx, "cells.", LOADS[1:], socks, seconds, cpus[1])
                finally:
                    os.sched_setaffinity(serve.pid, saved)
        # b served by a daemon of its own: what serving each device in its own thread or
        # process (vhost's model) could reach at best, measured beside the shared daemon
        with ctx.children_scope():
            for n in "ab":
                ctx.child(f"fair-serve-{n}", cli("serve", "--config", config(n, n))).wait_for(
                    "serve ready", timeout=20)
            _loads(ctx, "separate.", ("cpu-hog", "avail"), socks, seconds)


def _loads(ctx: Context, tag: str, loads: tuple[str, ...], socks: dict[str, str],
           seconds: float, cpu: int | None = None) -> None:
    """Measure b under each load on a; ``cpu``: the load and b's reader run on that CPU."""
    where = {"": "one serve daemon, CPUs shared",
             "cells.": "one serve daemon alone on a CPU, the load and b's driver on the other",
             "separate.": "a serve daemon per disk, CPUs shared"}[tag]
    for load in loads:
        ctx.progress.update(f"fairness: b for {seconds:.0f} s, load on a: {load}"
                            + (f" ({tag[:-1]})" if tag else ""))
        with ctx.children_scope():
            extra: dict[str, Any] = {}
            flood = None
            if load == "cpu-hog":
                hog = ctx.child("fair-hog", HOG)
                if cpu is not None:
                    os.sched_setaffinity(hog.pid, {cpu})
            elif load != "none":
                flood = ctx.child(f"fair-{load}", [
                    sys.executable, "-m", "ivshmem_virtio.benchmarks.flood", socks["a"], load,
                    str(seconds + 5)])
                if cpu is not None:
                    os.sched_setaffinity(flood.pid, {cpu})
                flood.wait_for("flooding", timeout=20)
            saved = os.sched_getaffinity(0)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            try:
                samples = run_loop(_reads(f"sim:{socks['b']}", seconds), timeout=60 + seconds)
            finally:
                os.sched_setaffinity(0, saved)
        if flood is not None and "served " in flood.log():
            extra["a_served"] = int(flood.log().rsplit("served ", 1)[1].split()[0])
        ctx.add(Measurement(
            f"fairness.{tag}{load}", "fairness",
            f"disk b, 512 B reads QD1, {where}; on disk a: {load}",
            params={"seconds": seconds, "load": load, "frontend_mode": "block",
                    "arrangement": tag[:-1] or "shared"},
            ops_per_s=len(samples) / seconds, latency_us=summarize_ns(samples),
            samples_ns=samples, extra=extra))
