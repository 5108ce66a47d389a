"""``vhost-user`` suite: the same disk over the two transports, side by side in one run.

One image, served in turns by ``ivshmem-virtio blk --link sim:...`` (a hub, the ivshmem
transport) and by ``ivshmem-virtio blk --vhost-user SOCKET``, each in its own process; the
Python ``BlkClient`` here is the front-end of both (over vhost-user it plays QEMU's part: it
owns the memory and tables it). Measured: 512 B reads at QD1 and 4 KiB random reads at QD32,
the transports interleaved in ``SLICES`` slices so that the VM's changes of speed move both.
Both back-ends run in their default waiting; the front-end waits in adaptive mode on both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ivshmem_virtio.procs import cli

from . import blk
from .core import Context, Measurement, pinned, run_loop, summarize_ns

TRANSPORTS = ("ivshmem", "vhost-user")
SLICES = 3
QD = 32
RAND_BS = 4096


def _start(ctx: Context, transport: str, name: str) -> tuple[str, Any]:
    image = ctx.image()
    if transport == "ivshmem":
        return blk.start_backend(ctx, name, image, rw_size=blk.BIG_RW)
    sock = str(ctx.workdir / f"{name}.vu.sock")
    backend = ctx.child(f"{name}-backend",
                        cli("blk", "--vhost-user", sock, "--image", str(image)))
    backend.wait_for("vhost-user back-end listening", timeout=15.0)
    return f"vhost-user:{sock}", backend


async def _qd32(link: str, seconds: float, blocks: int) -> tuple[int, float, np.ndarray]:
    client = await blk.connect(link, "adaptive")
    try:
        table = (np.random.default_rng(7).integers(0, blocks, 1 << 16) * RAND_BS).tolist()

        def offset_at(i: int) -> int:
            return int(table[i & 0xFFFF])

        await blk._point(client, "read", RAND_BS, QD, min(0.2, seconds / 4), offset_at)
        return await blk._point(client, "read", RAND_BS, QD, seconds, offset_at)
    finally:
        await blk.disconnect(client)


def run_vhost_user(ctx: Context) -> None:
    """QD1 512 B read latency and QD32 4 KiB random read IOPS over ivshmem and vhost-user."""
    n = ctx.pick(2_000, 20_000)
    per = -(-n // SLICES)
    warmup = max(200, per // 20)
    seconds = ctx.pick(0.5, 2.0) / SLICES
    lat: dict[str, list[np.ndarray]] = {t: [] for t in TRANSPORTS}
    iops: dict[str, list[tuple[int, float, np.ndarray]]] = {t: [] for t in TRANSPORTS}
    blocks = ctx.image_size // RAND_BS
    for part in range(1, SLICES + 1):
        for transport in TRANSPORTS:
            with ctx.children_scope():
                link, backend = _start(ctx, transport, f"vu-{transport}-{part}")
                ctx.progress.update(f"vhost-user: {transport} ({part}/{SLICES}): {per} QD1 "
                                    f"reads, then QD{QD} random reads for {seconds:.2f} s")
                with pinned(backend.proc.pid):
                    samples, _resets = run_loop(
                        blk._qd1_reads(link, "adaptive", per, warmup, ctx.image_size),
                        timeout=60 + (per + warmup) * 0.005)
                    lat[transport].append(samples)
                    iops[transport].append(run_loop(_qd32(link, seconds, blocks),
                                                    timeout=60 + 4 * seconds))
    for transport in TRANSPORTS:
        samples = np.concatenate(lat[transport])
        ctx.add(Measurement(
            f"vhost-user.{transport}.qd1", "vhost-user",
            f"blk 512 B read QD1 over {transport} (Python front-end)",
            params={"transport": transport, "requests": len(samples), "slices": SLICES,
                    "warmup": warmup, "bytes": 512, "frontend_mode": "adaptive"},
            latency_us=summarize_ns(samples), samples_ns=samples))
        done = sum(r[0] for r in iops[transport])
        elapsed = sum(r[1] for r in iops[transport])
        all_lat = np.concatenate([r[2] for r in iops[transport]])
        ctx.add(Measurement(
            f"vhost-user.{transport}.qd32", "vhost-user",
            f"blk 4 KiB random read QD{QD} over {transport} (Python front-end)",
            params={"transport": transport, "qd": QD, "bytes": RAND_BS, "slices": SLICES,
                    "seconds": round(elapsed, 2), "api": "readinto"},
            latency_us=summarize_ns(all_lat), ops_per_s=done / elapsed,
            mb_per_s=done * RAND_BS / elapsed / 1e6))
