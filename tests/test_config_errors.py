"""Bad configuration: a one-line error and exit status 2, and no image opened for writing."""

from __future__ import annotations

import os
import socket

import pytest

from ivshmem_virtio.procs import run_cli


def check_exit2(args: list[str], needle: str) -> None:
    r = run_cli(args, timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_missing_image(procs, tmp_path):
    sock = str(tmp_path / "a.sock")
    procs.hub(sock)
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", str(tmp_path / "nope.img")],
                "--image")


@pytest.mark.parametrize("link", ["tcp:1.2.3.4", "sim:", "nonsense", "uio:"])
def test_unknown_link(tmp_path, image_factory, link):
    check_exit2(["blk", "--link", link, "--image", image_factory()], "--link")


def test_link_without_hub(tmp_path, image_factory):
    check_exit2(["blk", "--link", f"sim:{tmp_path}/none.sock", "--image", image_factory()],
                "--link")


def test_missing_uio_device(tmp_path, image_factory):
    check_exit2(["blk", "--link", "uio:/dev/uio-does-not-exist", "--image", image_factory()],
                "--link")


def test_backend_id_taken(procs, tmp_path, image_factory):
    sock = str(tmp_path / "b.sock")
    procs.hub(sock)
    procs.blk(sock, image_factory())
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", image_factory(name="2.img")],
                "taken")


def test_wrong_protocol_on_link(procs, tmp_path, image_factory):
    sock = str(tmp_path / "c.sock")
    procs.hub(sock, protocols="0xC024,0x8024")
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", image_factory()], "protocol")


def test_hub_socket_in_use(procs, tmp_path):
    sock = str(tmp_path / "d.sock")
    procs.hub(sock)
    check_exit2(["hub", "--socket", sock], "in use")
    assert os.path.exists(sock)  # the running hub keeps its socket


def test_hub_stale_socket_is_replaced(procs, tmp_path):
    sock = str(tmp_path / "e.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock)
    s.close()  # a socket file nobody listens on
    procs.hub(sock)


@pytest.mark.parametrize("args,needle", [
    (["--max-peers", "1"], "--max-peers"),
    (["--vectors", "0"], "--vectors"),
    (["--vectors", "99"], "--vectors"),
    (["--rw-size", "0x1234"], "--rw-size"),
    (["--state-table-size", "0"], "--state-table-size"),
    (["--protocols", "0xC002"], "--protocols"),
    (["--protocols", "0xC002,0x18002"], "--protocols"),
    (["--rw-size", "lots"], "lots"),
])
def test_hub_impossible_geometry(tmp_path, args, needle):
    check_exit2(["hub", "--socket", str(tmp_path / "f.sock"), *args], needle)
    assert not os.path.exists(tmp_path / "f.sock")


@pytest.mark.parametrize("args,needle", [
    (["--queue-size", "100"], "--queue-size"),
    (["--queue-size", "4"], "--queue-size"),
    (["--serial", "x" * 21], "--serial"),
    (["--mode", "turbo"], "--mode"),
])
def test_blk_impossible_options(tmp_path, image_factory, args, needle):
    image = image_factory(data=b"untouched")
    before = os.stat(image).st_mtime_ns
    check_exit2(["blk", "--link", f"sim:{tmp_path}/x.sock", "--image", image, *args], needle)
    assert os.stat(image).st_mtime_ns == before


def test_tiny_image(procs, tmp_path):
    sock = str(tmp_path / "g.sock")
    procs.hub(sock)
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", str(tiny)], "sector")


def test_rw_section_too_small(procs, tmp_path, image_factory):
    sock = str(tmp_path / "h.sock")
    procs.hub(sock, "--rw-size", "0x1000")
    check_exit2(["blk", "--link", f"sim:{sock}", "--image", image_factory()], "two pages")
