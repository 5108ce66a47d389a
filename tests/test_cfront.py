"""The blocking C frontend (benchmarks/blkfront.c) against a real backend process on a hub."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ivshmem_virtio.benchmarks import cfront
from ivshmem_virtio.benchmarks.core import Context, Progress

CC = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc/gcc) on PATH")
IMAGE_BYTES = 1 << 20


@pytest.fixture
def exe(tmp_path: Path) -> Path:
    if cfront.sources() is None:
        pytest.fail(f"rtos_inmate sources missing at {cfront.INMATE} in a source checkout")
    work = tmp_path / "build"
    work.mkdir()
    built = cfront.build(Context(work, True, Progress()))
    assert built is not None and built.exists()
    return built


def _image(tmp_path: Path, name: str, seed: int) -> str:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(seed).bytes(IMAGE_BYTES))
    return str(path)


def _run(exe: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), "-t", "3000", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_reads_and_checks_against_a_backend(procs, tmp_path, exe):
    sock = str(tmp_path / "link.sock")
    image = _image(tmp_path, "disk.img", 1)
    procs.hub(sock)
    procs.blk(sock, image)  # the backend's default mode, as a user starts it
    out = tmp_path / "lat.u64"
    r = _run(exe, sock, image, "300", "20", str(out))
    assert r.returncode == 0, r.stderr
    samples = np.fromfile(out, dtype=np.uint64)
    assert samples.size == 300 and samples.min() > 0
    assert "300 reads" in r.stdout

    # the same device again, checked against an image it does not serve: a one-line error
    other = _image(tmp_path, "other.img", 2)
    r = _run(exe, sock, other, "50", "0", str(tmp_path / "no.u64"))
    assert r.returncode == 5
    assert r.stderr.count("\n") == 1 and "differ from" in r.stderr
    assert not (tmp_path / "no.u64").exists()

    # the device is still usable after that frontend left
    r = _run(exe, sock, image, "50", "0", str(out))
    assert r.returncode == 0, r.stderr

    # spinning on the used ring (-s): every answer checked as well, and it never slept
    r = _run(exe, "-s", sock, image, "300", "20", str(out))
    assert r.returncode == 0, r.stderr
    assert np.fromfile(out, dtype=np.uint64).size == 300
    assert "300 reads" in r.stdout and " 0 sleeps" in r.stdout, r.stdout


def test_no_backend_is_a_one_line_error(procs, tmp_path, exe):
    sock = str(tmp_path / "link.sock")
    image = _image(tmp_path, "disk.img", 1)
    out = str(tmp_path / "lat.u64")
    r = subprocess.run([str(exe), sock, image, "10", "0", out], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "cannot join the hub" in r.stderr
    procs.hub(sock)  # a hub, but nobody serving the device
    r = subprocess.run([str(exe), "-t", "300", sock, image, "10", "0", out], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "no backend" in r.stderr
    assert not Path(out).exists()


def test_builds_without_warnings(tmp_path):
    """-Wall -Wextra -Werror over the program and the inmate sources it links."""
    found = cfront.sources()
    assert found is not None
    files, dirs = found
    r = subprocess.run([CC, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
                        *(f"-I{d}" for d in dirs), "-o", str(tmp_path / "blkfront"),
                        str(Path(cfront.__file__).parent / "blkfront.c"), *map(str, files)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_missing_inmate_sources_are_reported(tmp_path, monkeypatch):
    """Without a source checkout the suite says why, and measures nothing."""
    monkeypatch.setattr(cfront, "INMATE", tmp_path / "rtos_inmate")
    ctx = Context(tmp_path, True, Progress())
    assert cfront.build(ctx) is None
    assert "rtos_inmate" in ctx.unavailable["cfront"]
    cfront.run_cfront(ctx)
    assert not ctx.results
