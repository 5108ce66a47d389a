"""No lost wake-up under the adaptive waiting policy (ivshmem_virtio/link.py PollWindow).

Every pairing of frontend and backend modes, with a CPU hog beside them (so poll windows get
preempted, dropped and held): lone requests (reaped in place), bursts (interrupt task or its fd
callback), and pauses shorter and longer than the 200 us cap (windows grow, shrink, hit 0). A
lost wake-up hangs a request, which the per-batch deadline turns into a failure. The blocking C
frontend (benchmarks/blkfront.c, sleeping like Linux's driver) meets the backend in every mode.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivshmem_virtio.procs import Child

from .blk_helpers import proc_stack
from .conftest import run

MiB = 1 << 20
PAIRS = [("block", "block"), ("poll", "poll"), ("adaptive", "adaptive"),
         ("adaptive", "block"), ("block", "adaptive"), ("poll", "adaptive")]


@pytest.fixture
def hog(tmp_path: Path) -> Iterator[Child]:
    """A process that wants a CPU all the time, ended by pid."""
    child = Child("hog", [sys.executable, "-c", "while True: pass"], tmp_path)
    try:
        yield child
    finally:
        child.stop(5)


@pytest.mark.parametrize(("mode", "backend_mode"), PAIRS)
def test_blk_requests_all_complete_beside_a_cpu_hog(procs, tmp_path, image_factory, hog, mode,
                                                     backend_mode):
    image = image_factory(MiB)
    with open(image, "rb") as f:
        disk = f.read()
    rng = random.Random(hash((mode, backend_mode)) & 0xFFFF)

    async def body():
        async with proc_stack(procs, str(tmp_path / "w.sock"), image, mode=mode,
                              backend_mode=backend_mode, spin_us=200.0) as s:
            c = s.client

            async def one(off: int) -> None:
                assert await c.read(off, 512) == disk[off:off + 512]

            for _ in range(700):
                offs = [512 * rng.randrange(2048) for _ in range(rng.choice((1, 1, 1, 2, 8)))]
                await asyncio.wait_for(asyncio.gather(*[one(o) for o in offs]), 10)
                if rng.random() < 0.08:
                    await asyncio.sleep(rng.choice((0.00005, 0.0005, 0.002, 0.01)))
            assert c.completed >= 700

    run(body(), timeout=120)


@pytest.mark.parametrize("backend_mode", ["block", "poll", "adaptive"])
def test_blocking_c_frontend_beside_a_cpu_hog(procs, tmp_path, image_factory, hog,
                                              backend_mode):
    """Sleeping on its eventfd for every completion: a backend that polls and then forgets to
    turn notifications back on (or skips the interrupt) leaves it asleep until its timeout."""
    import subprocess

    from ivshmem_virtio.benchmarks import cfront
    from ivshmem_virtio.benchmarks.core import Context, Progress

    if cfront.sources() is None:
        pytest.skip("no inmate sources")
    work = tmp_path / "build"
    work.mkdir()
    exe = cfront.build(Context(work, True, Progress()))
    if exe is None:
        pytest.skip("no C compiler")
    sock = str(tmp_path / "c.sock")
    image = image_factory(MiB)
    procs.hub(sock)
    procs.blk(sock, image, "--mode", backend_mode)
    r = subprocess.run([str(exe), "-t", "5000", sock, image, "3000", "0",
                        str(tmp_path / "lat.u64")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
