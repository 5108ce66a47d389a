"""The blk device's one-buffer fast path (``BlkModel.handle``) against the general path
(``parse`` + ``execute``): for any chain, the same used length, status byte, memory, image and
counters. Chains are drawn around the fast path's edges (header length, status length, data
length 0 / not a sector multiple / past ``max_data``, sectors at and past the end, read-only
disks, a walk error, extra or missing descriptors, unknown types)."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmem_virtio.backend.devices.blk import BlkModel, BlkRequest
from ivshmem_virtio.backend.resources.image import BlockImage
from ivshmem_virtio.errors import DeviceError
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.virtqueue.device import Chain

MEM = 0x8000
SECTORS = 16
HDR, DATA, STATUS = 0x100, 0x1000, 0x200

_IMAGE = os.urandom(SECTORS * 512)


class Side:
    """One device model, its own copy of the memory and of the disk image."""

    def __init__(self, tmp: str, name: str, read_only: bool, mem0: bytes) -> None:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(_IMAGE)
        self.image = BlockImage(path)
        self.mem = Region(bytearray(mem0))
        self.model = BlkModel(SECTORS, read_only=read_only, size_max=4096, seg_max=2)

    def state(self) -> tuple[bytes, bytes, dict[str, int]]:
        return (bytes(self.mem.view(0, MEM)), os.pread(self.image.fd, len(_IMAGE), 0),
                self.model.metrics.as_dict())


def general(side: Side, chain: Chain) -> object:
    """What serve did before the fast path: parse, then answer or execute or defer."""
    req = side.model.parse(side.mem, chain)
    if not isinstance(req, BlkRequest):
        side.mem.set_u8(req[0], req[1])
        return 1
    if req.type in (B.T_IN, B.T_OUT, B.T_GET_ID):
        return side.model.execute(side.mem, req, side.image)
    return ("deferred", req.type, req.sector, req.data, req.data_len, req.status_addr)


def fast(side: Side, chain: Chain) -> object:
    done = side.model.handle(side.mem, chain, side.image)
    if isinstance(done, int):
        return done
    return ("deferred", done.type, done.sector, done.data, done.data_len, done.status_addr)


def outcome(fn, side: Side, chain: Chain) -> object:  # noqa: ANN001 - general or fast
    try:
        return fn(side, chain)
    except DeviceError as e:
        return ("DeviceError", str(e))


MUTATIONS = ["none"] * 6 + ["header 15", "header 17", "header 32", "status 0", "status 2",
                            "no data", "one more", "walk error", "data on the other side"]


@given(rtype=st.sampled_from([B.T_IN] * 3 + [B.T_OUT] * 3 + [B.T_FLUSH, B.T_GET_ID,
                                                             B.T_DISCARD, 99]),
       sector=st.sampled_from([0, 1, SECTORS - 2, SECTORS - 1, SECTORS, 1 << 40]),
       data_len=st.sampled_from([0, 1, 511, 512, 1024, 4096, 8192, 8704, MEM - DATA]),
       read_only=st.booleans(), mutation=st.sampled_from(MUTATIONS))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_path_matches_parse_and_execute(rtype, sector, data_len, read_only, mutation):
    mem0 = bytearray(os.urandom(MEM))
    B.OUTHDR.pack_into(mem0, HDR, rtype, 0, sector)
    hdr_len = int(mutation[7:]) if mutation.startswith("header") else 16
    status_len = int(mutation[7:]) if mutation.startswith("status") else 1
    readable = [(HDR, hdr_len)]
    writable = [(STATUS, status_len)]
    data = [] if mutation == "no data" else [(DATA, data_len)]
    if mutation == "one more":
        data.append((DATA, 512))
    if (rtype == B.T_OUT) != (mutation == "data on the other side"):
        readable += data
    else:
        writable[:0] = data
    error = "buffer outside the shared section" if mutation == "walk error" else None
    with tempfile.TemporaryDirectory() as tmp:
        ref = Side(tmp, "ref.img", read_only, bytes(mem0))
        new = Side(tmp, "new.img", read_only, bytes(mem0))
        try:
            want = outcome(general, ref, Chain(7, list(readable), list(writable), error))
            got = outcome(fast, new, Chain(7, list(readable), list(writable), error))
            assert got == want
            assert new.state() == ref.state()
        finally:
            ref.image.close()
            new.image.close()


def test_the_usual_read_and_write_take_the_fast_path(tmp_path):
    """The three-descriptor read and write never build a request object (and still work)."""
    side = Side(str(tmp_path), "d.img", False, bytes(MEM))
    model = side.model

    def no_parse(mem: Region, chain: Chain) -> None:
        raise AssertionError("general path taken")

    model.parse = no_parse  # type: ignore[method-assign]
    B.OUTHDR.pack_into(side.mem.view(0, MEM), HDR, B.T_IN, 0, 3)
    assert model.handle(side.mem, Chain(1, [(HDR, 16)], [(DATA, 1024), (STATUS, 1)]),
                        side.image) == 1025
    assert side.mem.read(DATA, 1024) == _IMAGE[3 * 512:5 * 512]
    assert side.mem.u8(STATUS) == B.S_OK
    B.OUTHDR.pack_into(side.mem.view(0, MEM), HDR, B.T_OUT, 0, 0)
    assert model.handle(side.mem, Chain(2, [(HDR, 16), (DATA, 512)], [(STATUS, 1)]),
                        side.image) == 1
    assert os.pread(side.image.fd, 512, 0) == _IMAGE[3 * 512:4 * 512]
    m = model.metrics
    assert (m.read_count, m.read_bytes, m.write_count, m.write_bytes) == (1, 1024, 1, 512)
    side.image.close()
