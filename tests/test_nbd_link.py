"""The NBD route end to end, as separate processes: a real Debian NBD client -> `ivshmem-virtio nbd`
(the frontend cell's export) -> sim link -> virtio-blk backend (`blk`, or `serve`) -> image file.

A multi-MB image with random data around a hole is copied in, checked on the backend's disk, and
copied back out; the checksums must match. The hole makes the clients send WRITE_ZEROES/TRIM, and
the backend image starts filled with 0xA5 so that zeroing has to really happen.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .test_serve import write_config

MiB = 1 << 20
CLIENT_TIMEOUT = 180


def require(binary: str, package: str) -> str:
    """Path of a client binary; fail (not skip) when it is missing, so CI notices."""
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not found: install the Debian package {package} (it is listed "
                    "in .ci/apt-packages; scripts/test installs them)", pytrace=False)
    return path


def client(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr}"


def sha256_file(path: str | Path, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left is None or left > 0:
            chunk = f.read(MiB if left is None else min(MiB, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def make_source(path: Path, size: int) -> None:
    """Random data, a 4 MiB hole in the middle, random data again."""
    third = (size - 4 * MiB) // 2
    with open(path, "wb") as f:
        f.write(os.urandom(third))
        f.seek(third + 4 * MiB)
        f.write(os.urandom(size - third - 4 * MiB))


COPY = {
    "nbdcopy": ("libnbd-bin", lambda exe, src, uri: [exe, "--flush", src, uri],
                lambda exe, uri, dst: [exe, uri, dst]),
    # -n: the export exists, qemu-img must not try to create it
    "qemu-img": ("qemu-utils",
                 lambda exe, src, uri: [exe, "convert", "-n", "-f", "raw", "-O", "raw", src, uri],
                 lambda exe, uri, dst: [exe, "convert", "-f", "raw", "-O", "raw", uri, dst]),
}


@pytest.mark.parametrize("backend", ["blk", "serve"])
@pytest.mark.parametrize("tool", sorted(COPY))
def test_copy_through_nbd_export_and_link(procs, tmp_path, tool, backend):
    package, copy_in, copy_out = COPY[tool]
    exe = require(tool, package)
    size = 24 * MiB
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    make_source(src, size)
    disk = tmp_path / "backend.img"
    disk.write_bytes(b"\xa5" * size)
    link = str(tmp_path / "blk.sock")
    nbd_sock = tmp_path / "disk.nbd"

    procs.hub(link)
    if backend == "blk":
        procs.blk(link, str(disk))
    else:
        cfg = write_config(tmp_path / "serve.toml", [{"type": "blk", "link": f"sim:{link}",
                                                      "image": str(disk)}])
        procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")
    nbd = procs.start("nbd", "nbd", "--link", f"sim:{link}", "--socket", str(nbd_sock),
                      wait="nbd export ready", timeout=30)
    uri = f"nbd+unix:///?socket={nbd_sock}"

    client(copy_in(exe, str(src), uri))
    # what the client wrote went through the link onto the backend's disk
    assert sha256_file(disk) == sha256_file(src), "backend image differs from the source"
    client(copy_out(exe, uri, str(out)))
    assert sha256_file(out) == sha256_file(src), "copy read back differs from the source"
    assert os.path.getsize(out) == size

    assert nbd.stop() == 0, nbd.log()
    assert not nbd_sock.exists(), "the NBD export left its socket behind"
