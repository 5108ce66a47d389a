"""virtio-blk edges the happy path never reaches, driven straight into the device model.

Requests are descriptor chains on a bytearray-backed Region; the image is a recording fake
(so a protection cannot hide behind the fd: an image opened read-write under a read-only model
must still never be written) or a real file where the kernel's answer is the point. Each case
names the status the virtio 1.2 block device section asks for (§5.2.6): IOERR for a device or
driver error, UNSUPP for an unsupported request or an undefined DISCARD/WRITE_ZEROES flag.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ivshmem_virtio.backend.devices.blk import BlkModel, BlkRequest
from ivshmem_virtio.backend.resources.image import BlockImage
from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.procs import run_cli
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.virtqueue.device import Chain

SECTORS = 64
HDR = 0x0
STATUS = 0x100
DATA = 0x1000
UNSET = 0xEE  # a status byte nobody wrote


class FakeImage:
    """Records every operation; ``fail`` makes one kind raise or come back short."""

    def __init__(self, fail: dict[str, object] | None = None) -> None:
        self.calls: list[tuple] = []
        self.fail = fail or {}
        self.read_only = False

    def _maybe_fail(self, op: str, n: int) -> int:
        how = self.fail.get(op)
        if isinstance(how, OSError):
            raise how
        if how == "short":
            return n - 512
        return n

    def readv(self, views: list[memoryview], offset: int) -> int:
        n = sum(len(v) for v in views)
        self.calls.append(("readv", offset, n))
        return self._maybe_fail("readv", n)

    def writev(self, views: list[memoryview], offset: int) -> int:
        n = sum(len(v) for v in views)
        self.calls.append(("writev", offset, b"".join(bytes(v) for v in views)))
        return self._maybe_fail("writev", n)

    def flush(self) -> None:
        self.calls.append(("flush",))
        self._maybe_fail("flush", 0)

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))
        self._maybe_fail("discard", 0)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self.calls.append(("write_zeroes", offset, length, unmap))
        self._maybe_fail("write_zeroes", 0)

    @property
    def writes(self) -> list[tuple]:
        return [c for c in self.calls if c[0] in ("writev", "discard", "write_zeroes")]


def section() -> Region:
    return Region(bytearray(1 << 16), name="section")


def request(mem: Region, rtype: int, sector: int = 0, data: list[tuple[int, int]] | None = None,
            head: int = 0) -> Chain:
    """Header, data segments (device-writable for IN/GET_ID, else readable), status byte."""
    mem.pack(B.OUTHDR, HDR, rtype, 0, sector)
    mem.set_u8(STATUS, UNSET)
    data = data or []
    if rtype in (B.T_IN, B.T_GET_ID):
        return Chain(head, [(HDR, B.OUTHDR_SIZE)], [*data, (STATUS, 1)])
    return Chain(head, [(HDR, B.OUTHDR_SIZE), *data], [(STATUS, 1)])


def serve(model: BlkModel, mem: Region, chain: Chain, image: object) -> int:
    """What the service does with one chain; returns the status byte."""
    done = model.handle(mem, chain, image)  # type: ignore[arg-type]
    if isinstance(done, BlkRequest):
        model.execute(mem, done, image)  # type: ignore[arg-type]
    return mem.u8(STATUS)


def segments(count: int, size: int = 512) -> list[tuple[int, int]]:
    return [(DATA + i * size, size) for i in range(count)]


def dwz(mem: Region, ranges: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """DISCARD/WRITE_ZEROES payload of (sector, count, flags) ranges, as one readable segment."""
    for i, (sector, count, flags) in enumerate(ranges):
        mem.pack(B.DWZ_SEG, DATA + 16 * i, sector, count, flags)
    return [(DATA, 16 * len(ranges))]


# -- seg_max --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rtype", [B.T_IN, B.T_OUT])
def test_more_segments_than_seg_max_is_an_ioerr_and_not_served(rtype):
    """A driver error (more data segments than advertised): IOERR, no image I/O at all."""
    model = BlkModel(SECTORS, seg_max=4, size_max=4096)
    mem = section()
    image = FakeImage()
    assert serve(model, mem, request(mem, rtype, 0, segments(5)), image) == B.S_IOERR
    assert image.calls == []
    assert model.metrics.invalid_request_count == 1


@pytest.mark.parametrize("rtype", [B.T_IN, B.T_OUT])
def test_seg_max_segments_are_served(rtype):
    model = BlkModel(SECTORS, seg_max=4, size_max=4096)
    mem = section()
    image = FakeImage()
    assert serve(model, mem, request(mem, rtype, 8, segments(4)), image) == B.S_OK
    assert [c[:2] for c in image.calls] == [("readv" if rtype == B.T_IN else "writev", 8 * 512)]


def test_seg_max_is_what_the_config_advertises():
    model = BlkModel(SECTORS, seg_max=7, size_max=4096)
    cfg = model.config()
    assert int.from_bytes(cfg[12:16], "little") == 7  # virtio_blk_config.seg_max


# -- read-only ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["fast", "general"])
def test_read_only_model_never_writes_even_through_a_writable_image(layout):
    """The device model's own check: the image behind it is writable here."""
    model = BlkModel(SECTORS, read_only=True)
    mem = section()
    image = FakeImage()
    data = segments(1, 4096) if layout == "fast" else segments(2)
    assert serve(model, mem, request(mem, B.T_OUT, 0, data), image) == B.S_IOERR
    assert image.writes == []


@pytest.mark.parametrize("rtype", [B.T_DISCARD, B.T_WRITE_ZEROES])
def test_read_only_model_refuses_discard_and_write_zeroes(rtype):
    model = BlkModel(SECTORS, read_only=True)
    mem = section()
    image = FakeImage()
    assert serve(model, mem, request(mem, rtype, 0, dwz(mem, [(0, 8, 0)])), image) == B.S_IOERR
    assert image.writes == []


def test_read_only_model_over_a_real_writable_file(tmp_path: Path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"keep" * 128 * SECTORS)
    image = BlockImage(str(path))  # opened read-write: only the model stands in the way
    try:
        model = BlkModel(image.sectors, read_only=True)
        mem = section()
        mem.write(DATA, b"x" * 4096)
        for data in (segments(1, 4096), segments(2)):
            assert serve(model, mem, request(mem, B.T_OUT, 0, data), image) == B.S_IOERR
    finally:
        image.close()
    assert path.read_bytes() == b"keep" * 128 * SECTORS


# -- DISCARD / WRITE_ZEROES ranges and flags ------------------------------------------------------
@pytest.mark.parametrize("rtype", [B.T_DISCARD, B.T_WRITE_ZEROES])
@pytest.mark.parametrize(("sector", "count"), [(SECTORS - 1, 2), (SECTORS, 1), (SECTORS + 5, 0),
                                               (2**64 - 1, 1), (0, (1 << 22) + 1)])
def test_discard_write_zeroes_range_past_capacity_is_an_ioerr(rtype, sector, count):
    model = BlkModel(SECTORS)
    mem = section()
    image = FakeImage()
    chain = request(mem, rtype, 0, dwz(mem, [(0, 1, 0), (sector, count, 0)]))
    assert serve(model, mem, chain, image) == B.S_IOERR
    assert image.writes == []  # checked before the first range runs


@pytest.mark.parametrize("rtype", [B.T_DISCARD, B.T_WRITE_ZEROES])
def test_discard_write_zeroes_up_to_the_last_sector(rtype):
    model = BlkModel(SECTORS)
    mem = section()
    image = FakeImage()
    assert serve(model, mem, request(mem, rtype, 0, dwz(mem, [(SECTORS - 2, 2, 0)])),
                 image) == B.S_OK
    assert image.writes[0][1:3] == ((SECTORS - 2) * 512, 1024)


@pytest.mark.parametrize(("rtype", "flags"), [(B.T_WRITE_ZEROES, 2), (B.T_WRITE_ZEROES, 1 << 31),
                                              (B.T_DISCARD, 2), (B.T_DISCARD, B.DWZ_F_UNMAP)])
def test_undefined_flags_are_unsupp(rtype, flags):
    """Unknown flags, and UNMAP on a DISCARD: UNSUPP (§5.2.6.2), nothing done."""
    model = BlkModel(SECTORS)
    mem = section()
    image = FakeImage()
    chain = request(mem, rtype, 0, dwz(mem, [(0, 1, 0), (4, 4, flags)]))
    assert serve(model, mem, chain, image) == B.S_UNSUPP
    assert image.writes == []


def test_write_zeroes_unmap_is_passed_on():
    model = BlkModel(SECTORS)
    mem = section()
    image = FakeImage()
    chain = request(mem, B.T_WRITE_ZEROES, 0, dwz(mem, [(4, 4, B.DWZ_F_UNMAP)]))
    assert serve(model, mem, chain, image) == B.S_OK
    assert image.writes == [("write_zeroes", 2048, 2048, True)]


# -- I/O errors from the image --------------------------------------------------------------------
EIO = OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize("layout", ["fast", "general"])
@pytest.mark.parametrize(("rtype", "op", "how"), [(B.T_IN, "readv", EIO),
                                                  (B.T_IN, "readv", "short"),
                                                  (B.T_OUT, "writev", EIO),
                                                  (B.T_OUT, "writev", "short")])
def test_image_errors_and_short_transfers_are_ioerr(layout, rtype, op, how):
    model = BlkModel(SECTORS)
    mem = section()
    image = FakeImage({op: how})
    data = segments(1, 4096) if layout == "fast" else segments(4, 1024)
    assert serve(model, mem, request(mem, rtype, 0, data), image) == B.S_IOERR
    assert model.metrics.io_fails == 1
    assert model.metrics.read_count == model.metrics.write_count == 0


@pytest.mark.parametrize(("rtype", "op"), [(B.T_FLUSH, "flush"), (B.T_DISCARD, "discard"),
                                           (B.T_WRITE_ZEROES, "write_zeroes")])
def test_image_errors_of_deferred_requests_are_ioerr(rtype, op):
    model = BlkModel(SECTORS)
    mem = section()
    image = FakeImage({op: EIO})
    data = [] if rtype == B.T_FLUSH else dwz(mem, [(0, 8, 0)])
    assert serve(model, mem, request(mem, rtype, 0, data), image) == B.S_IOERR
    assert model.metrics.io_fails == 1


def test_image_that_shrank_under_us_answers_ioerr(tmp_path: Path):
    """A real short read: the file was truncated after the backend sized it."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SECTORS * 512))
    image = BlockImage(str(path))
    try:
        model = BlkModel(image.sectors)
        os.truncate(path, 8 * 512)
        mem = section()
        for data in (segments(1, 4096), segments(2)):
            assert serve(model, mem, request(mem, B.T_IN, 16, data), image) == B.S_IOERR
        assert serve(model, mem, request(mem, B.T_IN, 0, segments(1, 4096)), image) == B.S_OK
    finally:
        image.close()


# -- FLUSH reaches fdatasync, and completes only after it ----------------------------------------
def test_flush_calls_fdatasync_on_the_image_fd_before_the_status(tmp_path: Path, monkeypatch):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(SECTORS * 512))
    image = BlockImage(str(path))
    mem = section()
    seen: list[tuple[int, int]] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        seen.append((fd, mem.u8(STATUS)))  # the status byte as it is during the sync
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        model = BlkModel(image.sectors)
        assert serve(model, mem, request(mem, B.T_FLUSH), image) == B.S_OK
        assert seen == [(image.fd, UNSET)]
        assert model.metrics.flush_count == 1
    finally:
        image.close()


# -- an image shorter than one sector -------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 511])
def test_image_shorter_than_a_sector_is_refused(tmp_path: Path, size):
    path = tmp_path / "tiny.img"
    path.write_bytes(b"\1" * size)
    with pytest.raises(ConfigError, match="smaller than one 512-byte sector") as e:
        BlockImage(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_one_sector_image_is_served(tmp_path: Path):
    path = tmp_path / "one.img"
    path.write_bytes(b"\1" * 700)  # the partial second sector is not part of the disk
    image = BlockImage(str(path))
    try:
        assert image.sectors == 1
        model = BlkModel(image.sectors)
        mem = section()
        assert serve(model, mem, request(mem, B.T_IN, 0, segments(1)), image) == B.S_OK
        assert mem.read(DATA, 512) == b"\1" * 512
        assert serve(model, mem, request(mem, B.T_IN, 1, segments(1)), image) == B.S_IOERR
    finally:
        image.close()


def test_backend_refuses_a_short_image_with_one_line(tmp_path: Path):
    path = tmp_path / "tiny.img"
    path.write_bytes(b"\1" * 100)
    r = run_cli(["blk", "--link", f"sim:{tmp_path / 'none.sock'}", "--image", str(path)],
                timeout=30)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "smaller than one 512-byte sector" \
        in lines[0], err
