"""Image locking: one writer or any number of readers per image, as QEMU's image locking.

A second backend writing the same disk corrupts it silently (two caches, two allocators of the
guest's file system); the OFD lock in ``backend/resources/image.py`` refuses it with one line.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from ivshmem_virtio.backend.resources.image import BlockImage
from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.procs import cli, run_cli

REFUSED = "locked by another process"


@pytest.mark.parametrize(("first_ro", "second_ro"), [(False, False), (False, True),
                                                     (True, False)])
def test_writer_excludes_everyone(image_factory, first_ro, second_ro):
    path = image_factory(1 << 20)
    first = BlockImage(path, read_only=first_ro)
    try:
        with pytest.raises(ConfigError, match=REFUSED) as e:
            BlockImage(path, read_only=second_ro)
        msg = str(e.value)
        assert msg.startswith(f"--image {path}: ") and "\n" not in msg
        assert ("read-only" if second_ro else "read-write") in msg
    finally:
        first.close()
    BlockImage(path, read_only=second_ro).close()  # the lock went with the first fd


def test_readers_share(image_factory):
    path = image_factory(1 << 20)
    readers = [BlockImage(path, read_only=True) for _ in range(3)]
    for r in readers:
        r.close()
    BlockImage(path).close()  # and a writer once they are gone


def test_refused_opener_closes_its_fd(image_factory):
    """The refused open leaves no fd behind (a daemon retrying would leak one per attempt)."""
    path = image_factory(1 << 20)
    first = BlockImage(path)

    def fds_on_the_image() -> int:
        """Our fds open on the image (not all fds: a thread of an earlier test in this process
        may still be closing its own meanwhile)."""
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.path.realpath(f"/proc/self/fd/{fd}") == os.path.realpath(path)
            except OSError:
                pass
        return n

    try:
        assert fds_on_the_image() == 1
        for _ in range(5):
            with pytest.raises(ConfigError):
                BlockImage(path)
        assert fds_on_the_image() == 1
    finally:
        first.close()


def _blk_refused(sock: str, image: str, *extra: str) -> str:
    r = run_cli(["blk", "--link", f"sim:{sock}", "--image", image, *extra], timeout=30)
    err = r.stderr.decode()
    assert r.returncode != 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_second_backend_process_refused(procs, tmp_path, image_factory):
    """A running backend holds its image; a second one on it (rw or ro) stops with one line."""
    sock = str(tmp_path / "blk.sock")
    image = image_factory(1 << 20)
    procs.hub(sock)
    first = procs.blk(sock, image)
    line = _blk_refused(sock, image)
    assert image in line and REFUSED in line and "read-write" in line
    line = _blk_refused(sock, image, "--read-only")
    assert image in line and REFUSED in line and "read-only" in line
    first.kill()  # SIGKILL: the kernel drops the lock with the process's fds
    second = procs.blk(sock, image, name="blk-2")
    assert second.proc.poll() is None


def test_read_only_backends_share_but_keep_writers_out(procs, tmp_path, image_factory):
    image = image_factory(1 << 20)
    socks = [str(tmp_path / f"ro{i}.sock") for i in range(2)]
    for i, sock in enumerate(socks):
        procs.hub(sock)
        procs.blk(sock, image, "--read-only", name=f"ro-{i}")
    line = _blk_refused(socks[0], image)
    assert image in line and REFUSED in line


def test_serve_device_refused_while_a_backend_holds_the_image(procs, tmp_path, image_factory):
    """``serve`` opens its images through the same class: the error names the device field."""
    sock = str(tmp_path / "blk.sock")
    other = str(tmp_path / "other.sock")
    image = image_factory(1 << 20)
    procs.hub(sock)
    procs.blk(sock, image)
    config = tmp_path / "serve.toml"
    config.write_text(f'[[devices]]\nname = "disk"\ntype = "blk"\nlink = "sim:{other}"\n'
                      f'image = "{image}"\n')
    r = subprocess.run(_serve_argv(config, tmp_path), capture_output=True, timeout=30)
    err = r.stderr.decode()
    assert r.returncode != 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ivshmem-virtio: error: devices[0].image: ")
    assert REFUSED in err and image in err, err


def _serve_argv(config, tmp_path) -> list[str]:  # noqa: ANN001
    return cli("serve", "--config", str(config), "--lock-dir", str(tmp_path / "locks"))
