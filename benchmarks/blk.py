"""virtio-blk suites: the backend ``ivshmem-virtio blk`` in its own process, BlkClient here.

``blk-latency``: 512 B reads at QD1 in each notification mode (backend and frontend alike).
``blk-seq``: 128 KiB sequential reads and writes, QD 1..32. ``blk-rand``: 4 KiB random reads and
writes, QD 1..32. ``rss``: four devices served by one ``ivshmem-virtio serve`` (and, to compare,
four ``blk`` processes), their resident memory at rest and over many requests. Every suite runs
on its own hub(s) and image in the bench work dir.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ivshmem_virtio.link import SPIN_CAP_US
from ivshmem_virtio.procs import Child, cli

from . import baselines
from .core import Context, Measurement, pinned, pss_kb, rss_kb, run_loop, summarize_ns

MODES = ("block", "poll", "adaptive")
QDS = (1, 2, 4, 8, 16, 32)
DEFAULT_RW = 0xDF000  # the R/W section of a stock Jailhouse virtio-ivshmem link
BIG_RW = 0x1000000  # 16 MiB: room for 32 x 128 KiB in flight in the bounce buffers


# what `ivshmem-virtio blk` runs with when not told (its CLI defaults), for the JSON's params
START_DEFAULTS: dict[str, Any] = {"mode": "adaptive", "spin_us": SPIN_CAP_US}


def start_backend(ctx: Context, name: str, image: Path, *, mode: str | None = None,
                  rw_size: int = DEFAULT_RW, spin_us: float | None = None) -> tuple[str, Child]:
    """Start a hub and a blk backend on it; returns the link name and the backend child.
    ``mode``/``spin_us`` None: the backend's own defaults (no option passed)."""
    sock = str(ctx.workdir / f"{name}.sock")
    hub = ctx.child(f"{name}-hub", cli("hub", "--socket", sock, "--rw-size", hex(rw_size)))
    hub.wait_for("hub listening")
    opts = ([] if mode is None else ["--mode", mode]) \
        + ([] if spin_us is None else ["--spin-us", str(spin_us)])
    backend = ctx.child(f"{name}-backend",
                        cli("blk", "--link", f"sim:{sock}", "--image", str(image), *opts))
    backend.wait_for("backend ready", timeout=15.0)
    return f"sim:{sock}", backend


async def connect(link: str, mode: str) -> Any:  # noqa: ANN401 - frontend.blk.BlkClient
    from ivshmem_virtio.frontend.cli import connect_blk

    return await connect_blk(link, 15.0, mode)


async def disconnect(client: Any) -> None:  # noqa: ANN401
    await client.close()
    client.dev.close()


# -- blk-latency -----------------------------------------------------------------------------------
async def _qd1_reads(link: str, mode: str, n: int, warmup: int,
                     span: int) -> tuple[np.ndarray, int]:
    client = await connect(link, mode)
    try:
        offsets = ((np.arange(n + warmup) * 4096) % span).tolist()
        now = time.perf_counter_ns
        read = client.read
        # warm up for a count and a time: adaptive poll windows learn from the first wake-ups,
        # and the backend's start-up is still in the first of them
        settle = now() + int(WARMUP_SECONDS * 1e9)
        i = 0
        while i < warmup or now() < settle:
            await read(offsets[i % len(offsets)], 512)
            i += 1
        out = np.empty(n, dtype=np.uint64)
        for i, off in enumerate(offsets[warmup:]):
            t0 = now()
            await read(off, 512)
            out[i] = now() - t0
        return out, client.bring_ups - 1
    finally:
        await disconnect(client)


WARMUP_SECONDS = 0.25


# the ping-pong each mode's goal is a ratio to: (language, mode) of benchmarks.pingpong
FLOORS = {"block": baselines.GOAL_FLOORS["eventfd"], "poll": baselines.GOAL_FLOORS["spin"],
          "adaptive": baselines.GOAL_FLOORS["spin"]}


SLICES = 3  # each mode is measured in this many slices, interleaved with the other modes


def _merge_floors(brackets: list[dict[str, Any]]) -> dict[str, Any]:
    """One bracket for a mode measured in slices: the mean of its slices' floors."""
    return {"id": brackets[0]["id"],
            "before_p50": round(float(np.mean([b["before_p50"] for b in brackets])), 3),
            "after_p50": round(float(np.mean([b["after_p50"] for b in brackets])), 3),
            "attempts": sum(b["attempts"] for b in brackets),
            "stable": all(b["stable"] for b in brackets), "slices": brackets}


def run_latency(ctx: Context) -> None:
    """512 B read round trips at QD1, in block, poll and adaptive mode.

    The modes take turns (block, poll, adaptive, block, ...: ``SLICES`` slices each, a fresh
    backend per slice), so that a VM changing speed by the minute moves all three alike: the
    adaptive goals compare the modes with each other. Each slice is bracketed by a short run
    of its goal's ping-pong floor just before the backend starts and just after it stops
    (``baselines.bracketed``); a mode's floor is the mean of its slices' brackets.
    """
    image = ctx.image()
    n = ctx.pick(3_000, 30_000)
    per = -(-n // SLICES)
    warmup = max(200, per // 20)
    got: dict[str, list[np.ndarray]] = {m: [] for m in MODES}
    floors: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    resets = dict.fromkeys(MODES, 0)
    for part in range(1, SLICES + 1):
        for mode in MODES:

            def measure(mode: str = mode, part: int = part) -> tuple[np.ndarray, int]:
                with ctx.children_scope():
                    link, backend = start_backend(ctx, f"lat-{mode}-{part}", image, mode=mode)
                    ctx.progress.update(f"blk-latency: {mode} ({part}/{SLICES}), {per} reads "
                                        "of 512 B at QD1")
                    with pinned(backend.proc.pid):  # two CPUs, as the floors and two cells
                        return run_loop(_qd1_reads(link, mode, per, warmup, ctx.image_size),
                                        timeout=60 + (per + warmup) * 0.005)

            (samples, r), floor = baselines.bracketed(
                ctx, FLOORS[mode], f"blk-latency {mode} ({part}/{SLICES})", measure)
            got[mode].append(samples)
            floors[mode].append(floor)
            resets[mode] += r
    for mode in MODES:
        if resets[mode]:
            ctx.notes.append(f"blk-latency {mode}: the device went NEEDS_RESET during the run")
        samples = np.concatenate(got[mode])
        ctx.add(Measurement(f"blk-latency.{mode}", "blk-latency",
                            f"blk 512 B read, QD1, {mode} mode",
                            params={"mode": mode, "requests": len(samples), "slices": SLICES,
                                    "warmup": warmup, "warmup_min_s": WARMUP_SECONDS,
                                    "spin_us": START_DEFAULTS["spin_us"],
                                    "rw_size": DEFAULT_RW, "bytes": 512,
                                    "floor": _merge_floors(floors[mode])},
                            latency_us=summarize_ns(samples), samples_ns=samples,
                            extra=_reset_extra(resets[mode])))


IDLE_SECONDS = 10.0


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _busy_then_idle(link: str, reads: int, pid: int) -> tuple[float, float, float]:
    """QD1 reads (the poll windows grow), then nothing for IDLE_SECONDS with the frontend
    still attached: (backend CPU s, our CPU s, wall s) over the idle part."""
    client = await connect(link, "adaptive")
    try:
        for i in range(reads):
            await client.read((i * 4096) % (1 << 20), 512)
        await asyncio.sleep(0.05)  # the last request's poll window runs out
        cpu0, own0, t0 = _cpu_seconds(pid), time.process_time(), time.perf_counter()
        await asyncio.sleep(IDLE_SECONDS)
        return (_cpu_seconds(pid) - cpu0, time.process_time() - own0,
                time.perf_counter() - t0)
    finally:
        await disconnect(client)


def run_idle(ctx: Context) -> None:
    """The adaptive backend's CPU while its frontend is attached but idle: polling must stop."""
    image = ctx.image()
    with ctx.children_scope():
        link, backend = start_backend(ctx, "idle", image)
        ctx.progress.update(f"idle: 2,000 reads, then {IDLE_SECONDS:.0f} s of nothing")
        cpu, own, wall = run_loop(_busy_then_idle(link, 2_000, backend.proc.pid),
                                  timeout=60 + IDLE_SECONDS)
    ctx.add(Measurement("idle.adaptive", "idle",
                        "backend CPU while its frontend is attached and idle (adaptive mode)",
                        params={"seconds": round(wall, 2), "reads_before": 2_000,
                                "mode": START_DEFAULTS["mode"]},
                        extra={"backend_cpu_percent": round(100 * cpu / wall, 3),
                               "frontend_cpu_percent": round(100 * own / wall, 3)}))


# -- blk-seq / blk-rand --------------------------------------------------------------------------
async def _point(client: Any, op: str, bs: int, qd: int, seconds: float,  # noqa: ANN401
                 offset_at: Callable[[int], int]) -> tuple[int, float, np.ndarray]:
    """Keep ``qd`` requests in flight for ``seconds``: (requests, elapsed, latencies in ns).

    Reads land in a buffer per worker (``readinto``), as the ``preadv`` and fio baselines do.
    """
    data = np.random.default_rng(qd).bytes(bs)
    lat: list[int] = []
    counter = [0]
    now = time.perf_counter_ns
    stop_at = now() + int(seconds * 1e9)

    async def worker() -> None:
        buf = bytearray(bs)
        while True:
            t0 = now()
            if t0 >= stop_at:
                return
            i = counter[0]
            counter[0] = i + 1
            if op == "read":
                await client.readinto(offset_at(i), buf)
            else:
                await client.write(offset_at(i), data)
            lat.append(now() - t0)

    t_start = now()
    await asyncio.gather(*[worker() for _ in range(qd)])
    return len(lat), (now() - t_start) / 1e9, np.array(lat, dtype=np.uint64)


async def _many_point(client: Any, bs: int, depth: int, seconds: float,  # noqa: ANN401
                      offset_at: Callable[[int], int]) -> tuple[int, float]:
    """``readinto_many`` keeping ``depth`` reads in flight for ``seconds``: (reads, elapsed).
    The batched API reports throughput only (its caller sees completions in groups)."""
    bufs = [bytearray(bs) for _ in range(depth)]
    now = time.perf_counter_ns
    stop_at = now() + int(seconds * 1e9)
    count = [0]

    def reads() -> Iterator[tuple[int, bytearray]]:
        i = 0
        while now() < stop_at:
            yield offset_at(i), bufs[i % depth]
            i += 1
        count[0] = i

    t_start = now()
    await client.readinto_many(reads(), depth)
    return count[0], (now() - t_start) / 1e9


async def _zerocopy_point(client: Any, bs: int, seconds: float,  # noqa: ANN401
                          offset_at: Callable[[int], int]) -> tuple[int, float, np.ndarray]:
    """QD1 reads through ``read_zerocopy``, each view released at once (the caller uses the
    data in place): (reads, elapsed, latencies in ns), as ``_point`` at QD1."""
    lat: list[int] = []
    now = time.perf_counter_ns
    stop_at = now() + int(seconds * 1e9)
    i = 0
    t_start = now()
    while True:
        t0 = now()
        if t0 >= stop_at:
            break
        (await client.read_zerocopy(offset_at(i), bs)).release()
        lat.append(now() - t0)
        i += 1
    return len(lat), (now() - t_start) / 1e9, np.array(lat, dtype=np.uint64)


async def _sweep(ctx: Context, link: str, suite: str, bs: int, random: bool,
                 seconds: float) -> list[Measurement]:
    client = await connect(link, "adaptive")
    out = []
    try:
        blocks = ctx.image_size // bs
        if random:
            table = (np.random.default_rng(3).integers(0, blocks, 1 << 16) * bs).tolist()

            def offset_at(i: int) -> int:
                return table[i & 0xFFFF]
        else:
            def offset_at(i: int) -> int:
                return (i % blocks) * bs

        for op in ("read", "write"):
            for qd in QDS:
                ctx.progress.update(f"{suite}: {op} {bs >> 10} KiB QD{qd}")
                await _point(client, op, bs, qd, min(0.2, seconds / 4), offset_at)  # warm-up
                resets = 0
                for _attempt in range(2):  # one retry when the device reset under the load
                    ups = client.bring_ups
                    n, elapsed, lat = await _point(client, op, bs, qd, seconds, offset_at)
                    if client.bring_ups == ups:
                        break
                    resets += client.bring_ups - ups
                    ctx.notes.append(f"{suite} {op} QD{qd}: the device went NEEDS_RESET and "
                                     f"was brought up again during the measurement"
                                     f"{'; measured again' if _attempt == 0 else ''}")
                else:
                    resets = -resets  # still reset on the retry: the point is not valid
                out.append(Measurement(
                    f"{suite}.{op}.qd{qd}", suite,
                    f"blk {bs >> 10} KiB {'random' if random else 'sequential'} {op}, QD{qd}",
                    params={"op": op, "qd": qd, "bytes": bs, "seconds": round(elapsed, 2),
                            "mode": "adaptive", "rw_size": BIG_RW,
                            "api": "readinto" if op == "read" else "write",
                            "pattern": "random" if random else "sequential"},
                    latency_us=summarize_ns(lat), ops_per_s=n / elapsed,
                    mb_per_s=n * bs / elapsed / 1e6, samples_ns=lat if qd == 1 else None,
                    extra=_reset_extra(resets)))
        ctx.progress.update(f"{suite}: read {bs >> 10} KiB QD1, read_zerocopy")
        await _zerocopy_point(client, bs, min(0.2, seconds / 4), offset_at)  # warm-up
        ups = client.bring_ups
        n, elapsed, lat = await _zerocopy_point(client, bs, seconds, offset_at)
        out.append(Measurement(
            f"{suite}.read.qd1.zerocopy", suite,
            f"blk {bs >> 10} KiB {'random' if random else 'sequential'} read, QD1, "
            f"read_zerocopy",
            params={"op": "read", "qd": 1, "bytes": bs, "seconds": round(elapsed, 2),
                    "mode": "adaptive", "rw_size": BIG_RW, "api": "read_zerocopy",
                    "pattern": "random" if random else "sequential"},
            latency_us=summarize_ns(lat), ops_per_s=n / elapsed,
            mb_per_s=n * bs / elapsed / 1e6, samples_ns=lat,
            extra=_reset_extra(-(client.bring_ups - ups))))
        qd = QDS[-1]
        ctx.progress.update(f"{suite}: read {bs >> 10} KiB QD{qd}, readinto_many")
        await _many_point(client, bs, qd, min(0.2, seconds / 4), offset_at)  # warm-up
        ups = client.bring_ups
        n, elapsed = await _many_point(client, bs, qd, seconds, offset_at)
        out.append(Measurement(
            f"{suite}.read.qd{qd}.many", suite,
            f"blk {bs >> 10} KiB {'random' if random else 'sequential'} read, QD{qd}, "
            f"readinto_many",
            params={"op": "read", "qd": qd, "bytes": bs, "seconds": round(elapsed, 2),
                    "mode": "adaptive", "rw_size": BIG_RW, "api": "readinto_many",
                    "pattern": "random" if random else "sequential"},
            ops_per_s=n / elapsed, mb_per_s=n * bs / elapsed / 1e6,
            extra=_reset_extra(-(client.bring_ups - ups))))
    finally:
        await disconnect(client)
    return out


def _reset_extra(resets: int) -> dict[str, Any]:
    """``device_resets`` marks an invalid point; ``retried_after_reset`` a valid retry."""
    if resets < 0:
        return {"device_resets": -resets}
    return {"retried_after_reset": resets} if resets else {}


def _run_sweep(ctx: Context, suite: str, bs: int, random: bool) -> None:
    image = ctx.image()
    seconds = ctx.pick(0.5, 2.0)
    with ctx.children_scope():
        link, _ = start_backend(ctx, suite, image, mode="adaptive", rw_size=BIG_RW)
        deadline = 90 + 2 * len(QDS) * 2 * (seconds + 0.2) * 2  # + one retry per point
        for m in run_loop(_sweep(ctx, link, suite, bs, random, seconds), timeout=deadline):
            ctx.add(m)


def run_seq(ctx: Context) -> None:
    """128 KiB sequential read and write throughput against queue depth."""
    _run_sweep(ctx, "blk-seq", 128 << 10, False)


def run_rand(ctx: Context) -> None:
    """4 KiB random read and write IOPS against queue depth."""
    _run_sweep(ctx, "blk-rand", 4 << 10, True)


# -- rss ----------------------------------------------------------------------------------------
DEVICES = 4
RSS_IMAGE = 64 << 20


async def _rss_load(ctx: Context, label: str, links: list[str], pids: list[int], total: int,
                    time_cap: float) -> dict[str, Any]:
    """4 KiB random reads and writes spread over the devices, sampling the backends' RSS."""
    clients = [await connect(link, "adaptive") for link in links]
    try:
        at_rest = [rss_kb(p) for p in pids]
        qd = 8
        table = (np.random.default_rng(4).integers(0, RSS_IMAGE // 4096, 1 << 16)
                 * 4096).tolist()
        data = bytes(4096)
        done = [0]
        warm = min(total // 10, 20_000)
        samples: list[tuple[int, list[int]]] = []
        every = max(1000, total // 50)
        stop_at = time.monotonic() + time_cap
        t0 = time.monotonic()

        async def worker(client: Any, k: int) -> None:  # noqa: ANN401
            i = k
            while done[0] < total and time.monotonic() < stop_at:
                off = table[i & 0xFFFF]
                i += 7
                if i & 1:
                    await client.write(off, data)
                else:
                    await client.read(off, 4096)
                done[0] += 1
                if done[0] % every == 0:
                    samples.append((done[0], [rss_kb(p) for p in pids]))
                    rate = done[0] / (time.monotonic() - t0)
                    ctx.progress.update(f"rss ({label}): {done[0]}/{total} requests, "
                                        f"{rate:,.0f}/s, RSS "
                                        f"{[s >> 10 for s in samples[-1][1]]} MiB")

        await asyncio.gather(*[worker(c, k) for k, c in enumerate(clients) for _ in range(qd)])
        elapsed = time.monotonic() - t0
        end = [rss_kb(p) for p in pids]
        pss = [pss_kb(p) for p in pids]
        resets = [c.bring_ups - 1 for c in clients]
    finally:
        for c in clients:
            await disconnect(c)
    after_warm = next((s for n, s in samples if n >= warm), samples[0][1] if samples else end)
    return {"at_rest_kb": at_rest, "after_warmup_kb": after_warm, "end_kb": end, "pss_kb": pss,
            "requests": done[0], "seconds": elapsed, "device_resets": resets,
            "qd_per_device": qd, "warmup": warm,
            "samples": [{"requests": n, "rss_kb": s} for n, s in samples]}


def _rss_measurement(ctx: Context, mid: str, title: str, r: dict[str, Any], processes: int,
                     total: int, time_cap: float) -> None:
    growth = [e - w for e, w in zip(r["end_kb"], r["after_warmup_kb"])]
    ctx.add(Measurement(
        mid, "rss", title,
        params={"devices": DEVICES, "processes": processes, "requests_goal": total,
                "requests": r["requests"], "time_cap_s": time_cap, "rw_size": DEFAULT_RW,
                "load": "4 KiB random, half reads half writes", "qd_per_device": r["qd_per_device"],
                "warmup_requests": r["warmup"]},
        ops_per_s=r["requests"] / r["seconds"],
        extra={"rss_at_rest_kb": r["at_rest_kb"], "rss_after_warmup_kb": r["after_warmup_kb"],
               "rss_end_kb": r["end_kb"], "pss_end_kb": r["pss_kb"],
               "rss_total_mb": round(sum(r["end_kb"]) / 1024, 1),
               "pss_total_mb": round(sum(r["pss_kb"]) / 1024, 1),
               "rss_max_process_mb": round(max(r["end_kb"]) / 1024, 1),
               "rss_growth_kb": growth, "device_resets": r["device_resets"],
               "rss_samples": r["samples"]}))
    if any(r["device_resets"]):
        ctx.notes.append(f"{mid}: devices went NEEDS_RESET and were brought up again during the "
                         f"load ({r['device_resets']} per device); see the backend logs")


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def run_rss(ctx: Context) -> None:
    """Backend RSS serving four devices, at rest and over many requests.

    The target is the root-cell daemon ``ivshmem-virtio serve`` with four blk devices in one
    process; four ``ivshmem-virtio blk`` processes are measured too, for comparison.
    """
    total = ctx.pick(40_000, 1_000_000)
    time_cap = ctx.pick(30.0, 240.0)
    images = []
    for k in range(DEVICES):
        path = ctx.workdir / f"rss{k}.img"
        with open(path, "wb") as f:
            f.truncate(RSS_IMAGE)
        images.append(path)
    with ctx.children_scope():
        socks = [str(ctx.workdir / f"rss-serve{k}.sock") for k in range(DEVICES)]
        for k, sock in enumerate(socks):
            hub = ctx.child(f"rss-serve-hub{k}", cli("hub", "--socket", sock))
            hub.wait_for("hub listening")
        cfg = ctx.workdir / "serve.toml"
        lines = ['mode = "adaptive"']
        for k, sock in enumerate(socks):
            dev = {"name": f"disk{k}", "type": "blk", "link": f"sim:{sock}",
                   "image": str(images[k])}
            lines += ["", "[[devices]]", *(f"{key} = {_toml(v)}" for key, v in dev.items())]
        cfg.write_text("\n".join(lines) + "\n")
        ctx.progress.update(f"rss: ivshmem-virtio serve with {DEVICES} blk devices")
        serve = ctx.child("rss-serve", cli("serve", "--config", str(cfg)))
        deadline = time.monotonic() + 20
        while serve.log().count("backend ready") < DEVICES:
            if serve.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve not ready:\n{serve.log()}")
            time.sleep(0.02)
        r = run_loop(_rss_load(ctx, "serve", [f"sim:{s}" for s in socks], [serve.pid], total,
                               time_cap), timeout=time_cap + 120)
    _rss_measurement(ctx, "rss.serve", f"ivshmem-virtio serve RSS, {DEVICES} blk devices, "
                     "1 process", r, 1, total, time_cap)

    small = ctx.pick(10_000, 40_000)
    with ctx.children_scope():
        links, pids = [], []
        for k in range(DEVICES):
            ctx.progress.update(f"rss: starting ivshmem-virtio blk {k + 1}/{DEVICES}")
            link, backend = start_backend(ctx, f"rss{k}", images[k], mode="adaptive")
            links.append(link)
            pids.append(backend.pid)
        r = run_loop(_rss_load(ctx, "blk x4", links, pids, small, 30.0), timeout=150)
    _rss_measurement(ctx, "rss.blk-processes", f"ivshmem-virtio blk RSS, {DEVICES} devices, "
                     f"{DEVICES} processes", r, DEVICES, small, 30.0)
