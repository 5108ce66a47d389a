"""``cfront``: the backend as a Linux guest's driver would use it, from an independent frontend.

``blkfront.c`` is a blocking virtio-blk frontend in C built from the RTOS inmate's transport and
split ring (``rtos_inmate/core``, a source checkout only): 512 B reads at QD1, each one kicking
the backend and sleeping on the link's interrupt eventfd, as Linux's ``virtio_blk`` over
``virtio_ivshmem`` does. None of the project's Python frontend is on this path, so it measures the
backend's waiting policy as a foreign driver meets it. Its p50 is a ratio to the C eventfd
ping-pong of the same moment (a bracket, ``baselines.bracketed``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from . import baselines, blk
from .core import Context, Measurement, pinned, summarize_ns, two_cpus

INMATE = baselines.HERE.parent / "rtos_inmate"
# the transport, ring and hub peer blkfront.c links, and their header directories
SOURCES = ("core/virtio_ivshmem.c", "core/virtqueue.c", "core/util.c", "hal/hosted/simlink.c")
INCLUDES = ("include", "core", "hal/hosted")


def sources(root: Path | None = None) -> tuple[list[Path], list[Path]] | None:
    """(C files, include dirs) of the inmate that blkfront.c needs; None when any is missing."""
    root = INMATE if root is None else root
    files = [root / s for s in SOURCES]
    dirs = [root / d for d in INCLUDES]
    return (files, dirs) if all(p.is_file() for p in files) and all(
        d.is_dir() for d in dirs) else None


def build(ctx: Context) -> Path | None:
    """Compile blkfront into the work dir; None (and the reason in ctx.unavailable) if it can't."""
    found = sources()
    if found is None:
        ctx.unavailable["cfront"] = (f"the RTOS inmate's C sources are not at {INMATE} "
                                     "(they ship with a source checkout, not in the wheel)")
        return None
    exe = baselines.compile_c(ctx, "blkfront", *found)
    if exe is None:
        ctx.unavailable["cfront"] = "no C compiler (cc/gcc) on PATH"
    return exe


def _counters(log: Path) -> dict[str, Any]:
    """The program's closing line: how often it slept, was interrupted and kicked (warm-up
    included): kicks far below the requests mean the backend was polling when they came."""
    try:
        m = re.search(r"(\d+) sleeps, (\d+) queue interrupts, (\d+) kicks", log.read_text())
    except OSError:
        return {}
    if m is None:
        return {}
    return {"frontend_sleeps": int(m[1]), "queue_interrupts": int(m[2]), "kicks": int(m[3])}


def run_cfront(ctx: Context) -> None:
    """512 B reads at QD1 from blkfront against `ivshmem-virtio blk` in its default mode: the
    blocking driver (Linux's way), then the same program spinning on the used ring (-s), which
    leaves the backend's share of a round trip as the only cost beyond a C ring: the floor any
    frontend of ours can reach against this backend."""
    exe = build(ctx)
    if exe is None:
        return
    image = ctx.image()
    n = ctx.pick(3_000, 30_000)
    warmup = max(200, n // 20)  # and at least blk.WARMUP_SECONDS, as the QD1 suite
    warmup_ms = int(blk.WARMUP_SECONDS * 1000)
    cpus = two_cpus()
    for mid, spin, floor_of, title in (
            ("cfront", False, "eventfd", "blocking C frontend"),
            ("cfront-spin", True, "spin", "spinning C frontend")):

        def measure(mid: str = mid, spin: bool = spin, title: str = title) -> Any:  # noqa: ANN401
            with ctx.children_scope():
                link, backend = blk.start_backend(ctx, mid, image)
                ctx.progress.update(f"cfront: {n} reads of 512 B at QD1 from the {title}")
                # this process and so the program on cpus[0], the backend on cpus[1], as two cells
                with pinned(backend.proc.pid):
                    pin = ["-c", str(cpus[0])] if cpus else []
                    return baselines._samples(ctx, mid, [
                        str(exe), *pin, *(["-s"] if spin else []), "-w", str(warmup_ms),
                        "-t", "5000", link.removeprefix("sim:"), str(image), str(n),
                        str(warmup)])

        samples, floor = baselines.bracketed(ctx, baselines.GOAL_FLOORS[floor_of],
                                             f"blk-latency {mid}", measure)
        ctx.add(Measurement(
            f"blk-latency.{mid}", "cfront", f"blk 512 B read, QD1, {title}, default mode",
            params={"requests": n, "warmup": warmup, "warmup_min_s": blk.WARMUP_SECONDS,
                    "bytes": 512, "backend_mode": blk.START_DEFAULTS["mode"],
                    "spin_us": blk.START_DEFAULTS["spin_us"], "rw_size": blk.DEFAULT_RW,
                    "frontend": "spins on the used ring" if spin else "sleeps on its eventfd",
                    "floor": floor},
            latency_us=summarize_ns(samples), samples_ns=samples,
            extra=_counters(ctx.workdir / f"{mid}.log")))
