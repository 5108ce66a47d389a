"""The compiled blk data path (``ivshmem_virtio._native``) against the pure-Python reference.

The same ring, memory and image go through both: ``BlkService.serve`` with the compiled
companion, and the Python path (``DeviceQueue.pop_all`` + ``BlkModel.handle`` + Python
``publish``). Every effect is compared: the return value or the exception and its message, the
whole shared memory (data, status bytes, used ring), the image, the counters, the queue's
indices and the interrupt decision. Chains are drawn as the usual reads and writes and around
every rule of the walk and of the blk fast path (indirect tables, loops, bad next, buffers
outside, header and status lengths, sectors past the end, read-only, other types), and as raw
random ring bytes. Skipped where the extension is not built or IVSHMEM_VIRTIO_PURE is set.

One difference is by design and not compared: in a batch, the Python path walks every chain
before it executes any, the compiled path walks and executes one at a time. On a ring error
the device is reset either way, but the valid chains before the broken one may have run (as
they would have, had the driver made them available a moment earlier); so raw-byte cases are
served one chain per batch, and batched cases use layouts whose data never overlaps the ring.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ivshmem_virtio import _native
from ivshmem_virtio.backend.devices.blk_service import BlkService
from ivshmem_virtio.backend.resources.image import BlockImage
from ivshmem_virtio.errors import DeviceError, MemoryAccessError, RingError
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.virtqueue.device import DeviceQueue

NAT = _native.native()
pytestmark = pytest.mark.skipif(NAT is None, reason=f"blk data path: {_native.data_path()}")

MEM = 0x10000
QSIZE = 8
DESC, AVAIL, USED = 0x0, 0x400, 0x800
ITABLE = 0xC00  # indirect tables, 16 entries each, one per chain slot
HDRS, STATUS, DATA = 0x3000, 0x3800, 0x4000
SECTORS = 64
_IMAGE = os.urandom(SECTORS * 512)
NEXT, WRITE, INDIRECT = R.DESC_F_NEXT, R.DESC_F_WRITE, R.DESC_F_INDIRECT
FAULTS = (RingError, DeviceError, MemoryAccessError)


class Runner:
    """What serve needs of a LinkRunner: the batch size, its time slice (none here) and a
    place for deferred work."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.until_ns = 0
        self.deferred: list[tuple[int, int]] = []

    def defer(self, index: int, head: int, work: Callable[[], int]) -> None:
        self.deferred.append((head, work()))  # run at once: its effects are compared too


class Side:
    """One service, its own copy of the memory and its own image file."""

    def __init__(self, tmp: str, name: str, mem0: bytes, *, read_only: bool,
                 event_idx: bool, indirect: bool) -> None:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(_IMAGE)
        self.image = BlockImage(path)
        self.svc = BlkService(self.image, rw_size=0x8000)  # seg_max 2, size_max 4096
        self.svc.model.read_only = read_only
        self.mem = Region(bytearray(mem0))
        self.vq = DeviceQueue(self.mem, QSIZE, DESC, AVAIL, USED, event_idx=event_idx,
                              indirect=indirect)

    def run(self, compiled: bool, batch: int, rounds: int) -> list[Any]:
        out: list[Any] = []
        for _ in range(rounds):
            runner = Runner(batch)
            try:
                if compiled:
                    n = self.svc.serve(0, self.vq, runner)
                else:
                    n = self.svc._serve_python(0, self.vq, batch, runner)
                out.append(("served", n, runner.deferred, self.vq.publish()))
            except FAULTS as e:
                out.append((type(e).__name__, str(e)))
                break
        return out

    def state(self) -> tuple[Any, ...]:
        vq = self.vq
        return (bytes(self.mem.view(0, MEM)), os.pread(self.image.fd, len(_IMAGE), 0),
                self.svc.model.metrics.as_dict(), vq.last_avail, vq.next_used,
                vq.signalled_used)


def compare(mem0: bytearray, *, batch: int, rounds: int = 3, read_only: bool = False,
            event_idx: bool = True, indirect: bool = True) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        kw = {"read_only": read_only, "event_idx": event_idx, "indirect": indirect}
        ref = Side(tmp, "ref.img", bytes(mem0), **kw)
        new = Side(tmp, "new.img", bytes(mem0), **kw)
        try:
            want = ref.run(False, batch, rounds)
            got = new.run(True, batch, rounds)
            assert new.vq.accel is not None
            assert got == want
            if not any(r[0] != "served" for r in want):
                assert new.state() == ref.state()
            return want
        finally:
            ref.image.close()
            new.image.close()


# -- a ring built from chain recipes ------------------------------------------------------------
KINDS = ["read", "write", "read", "write", "read 4 KiB", "write 2 sectors", "indirect read",
         "indirect write", "flush", "get id", "unknown type", "header 15", "header 32",
         "status 2", "no data", "extra data", "data outside", "readable after writable",
         "sector past end", "sector at end", "not a sector multiple", "loop", "next too far",
         "nested indirect", "indirect with next", "indirect length 24",
         "indirect length +8", "indirect outside",
         "indirect big", "five descriptors", "huge data"]


def build(kinds: list[str], avail_extra: int = 0, used_event: int = 0) -> bytearray:
    """The memory of a ring whose avail entries are one chain per recipe, 4 descriptors each."""
    mem = bytearray(os.urandom(MEM))
    mem[AVAIL:USED + 8 + 8 * QSIZE] = bytes(USED + 8 + 8 * QSIZE - AVAIL)
    for slot, kind in enumerate(kinds):
        base = slot * 4 % QSIZE if slot * 4 < QSIZE else (slot * 4) % QSIZE
        head = base
        hdr = HDRS + 32 * slot
        status = STATUS + 8 * slot
        data = DATA + 0x1000 * slot
        rtype = {"write": B.T_OUT, "indirect write": B.T_OUT, "write 2 sectors": B.T_OUT,
                 "flush": B.T_FLUSH, "get id": B.T_GET_ID, "unknown type": 99}.get(kind, B.T_IN)
        sector = {"sector past end": SECTORS, "sector at end": SECTORS - 1}.get(kind, slot * 2)
        n = {"read 4 KiB": 4096, "write 2 sectors": 1024, "not a sector multiple": 100,
             "sector at end": 1024, "huge data": 0x2000}.get(kind, 512)
        struct.pack_into("<IIQ", mem, hdr, rtype, 0, sector)
        hdr_len = {"header 15": 15, "header 32": 32}.get(kind, 16)
        descs = [(hdr, hdr_len, 0)]
        if kind == "data outside":
            data = MEM - 256
        if kind != "no data" and kind not in ("flush",):
            out = rtype == B.T_OUT
            descs.append((data, n, 0 if out else WRITE))
        if kind == "extra data":
            descs.append((data + 0x800, 512, WRITE))
        if kind == "five descriptors":
            descs = [(hdr, 16, 0), (data, 512, WRITE), (data + 512, 512, WRITE),
                     (data + 1024, 512, WRITE), (data + 1536, 512, WRITE)]
        descs.append((status, {"status 2": 2}.get(kind, 1), WRITE))
        if kind == "readable after writable":
            descs = [descs[0], (data, 512, WRITE), (data + 512, 512, 0), descs[-1]]
        if kind.startswith("indirect") or kind == "nested indirect":
            table = ITABLE + 0x100 * (slot % 4)
            for i, (a, ln, fl) in enumerate(descs):
                last = i == len(descs) - 1
                R.DESC.pack_into(mem, table + 16 * i, a, ln, fl | (0 if last else NEXT), i + 1)
            tlen = 16 * len(descs)
            if kind == "nested indirect":
                R.DESC.pack_into(mem, table, table, tlen, INDIRECT, 0)
            tflags = INDIRECT | (NEXT if kind == "indirect with next" else 0)
            # +8: whole entries for the complete chain and a stray half entry after it
            tlen = {"indirect length 24": 24, "indirect big": 16 * 20,
                    "indirect length +8": tlen + 8}.get(kind, tlen)
            taddr = MEM - 8 if kind == "indirect outside" else table
            R.DESC.pack_into(mem, DESC + 16 * head, taddr, tlen, tflags, 0)
        else:
            idx = [(head + i) % QSIZE for i in range(len(descs))]
            for i, (a, ln, fl) in enumerate(descs):
                last = i == len(descs) - 1
                nxt = idx[i + 1] if not last else 0
                if kind == "loop" and last:
                    fl, nxt = fl | NEXT, head
                if kind == "next too far" and last:
                    fl, nxt = fl | NEXT, QSIZE
                R.DESC.pack_into(mem, DESC + 16 * idx[i], a, ln, fl | (NEXT if not last else 0),
                                 nxt)
                if kind in ("loop", "next too far") and last:
                    R.DESC.pack_into(mem, DESC + 16 * idx[i], a, ln, fl, nxt)
        struct.pack_into("<H", mem, AVAIL + 4 + 2 * slot, head)
    struct.pack_into("<H", mem, AVAIL + 2, (len(kinds) + avail_extra) & 0xFFFF)
    struct.pack_into("<H", mem, AVAIL + 4 + 2 * QSIZE, used_event)
    return mem


@given(kind=st.sampled_from(KINDS), read_only=st.booleans(), event_idx=st.booleans(),
       indirect=st.booleans(), used_event=st.integers(0, 3))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_one_chain_same_effects(kind, read_only, event_idx, indirect, used_event):
    compare(build([kind], used_event=used_event), batch=1, read_only=read_only,
            event_idx=event_idx, indirect=indirect)


@given(kinds=st.lists(st.sampled_from(KINDS[:10] + ["sector past end", "header 15"]),
                      min_size=1, max_size=2), batch=st.integers(1, 4),
       avail_extra=st.sampled_from([0, 0, 0, QSIZE + 1]))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_batches_same_effects(kinds, batch, avail_extra):
    """Two chains (slots 0 and 1 use descriptors 0-3 and 4-7), in batches of 1 to 4."""
    compare(build(kinds, avail_extra=avail_extra), batch=batch)


@given(ring=st.binary(min_size=16 * QSIZE, max_size=16 * QSIZE),
       heads=st.lists(st.integers(0, QSIZE), min_size=1, max_size=3),
       hdr=st.binary(min_size=32, max_size=32), indirect=st.booleans())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_raw_ring_bytes_same_effects(ring, heads, hdr, indirect):
    """Random descriptor tables (addresses folded into the section half the time)."""
    mem = build([])
    raw = bytearray(ring)
    for i in range(QSIZE):
        addr, ln, fl, nxt = R.DESC.unpack_from(raw, 16 * i)
        if i % 2 == 0:
            addr %= MEM
            ln %= 0x2000
        R.DESC.pack_into(raw, 16 * i, addr, ln, fl & 7, nxt % (QSIZE + 2))
    mem[DESC:DESC + len(raw)] = raw
    for i, h in enumerate(heads):
        struct.pack_into("<H", mem, AVAIL + 4 + 2 * i, h)
    struct.pack_into("<H", mem, AVAIL + 2, len(heads))
    compare(mem, batch=1, rounds=len(heads) + 1, indirect=indirect)


def test_usual_read_and_write_take_the_compiled_path(tmp_path):
    """The usual chains never reach BlkModel.handle, and the results are right."""
    mem = build(["read", "write"])
    side = Side(str(tmp_path), "d.img", bytes(mem), read_only=False, event_idx=True,
                indirect=True)

    def no_python(*_a: object) -> None:
        raise AssertionError("Python path taken")

    side.svc._serve_python = no_python  # type: ignore[method-assign]
    assert side.svc.serve(0, side.vq, Runner(8)) == 2
    assert side.mem.read(DATA, 512) == _IMAGE[:512]
    assert os.pread(side.image.fd, 512, 2 * 512) == side.mem.read(DATA + 0x1000, 512)
    assert side.mem.u8(STATUS) == side.mem.u8(STATUS + 8) == B.S_OK
    m = side.svc.model.metrics
    assert (m.read_count, m.read_bytes, m.write_count, m.write_bytes) == (1, 512, 1, 512)
    assert side.vq.publish() is True
    assert side.mem.u16(USED + 2) == 2
    assert R.USED_ELEM.unpack_from(side.mem.view(USED + 4, 16), 0) == (0, 513)
    assert R.USED_ELEM.unpack_from(side.mem.view(USED + 4, 16), 8) == (4, 1)
    side.image.close()


def test_io_errors_on_both_paths(tmp_path):
    """A read past the end of a shrunk image and a write to a full file get IOERR, counted."""
    for compiled in (False, True):
        mem = build(["read 4 KiB"])
        side = Side(str(tmp_path), f"e{compiled}.img", bytes(mem), read_only=False,
                    event_idx=True, indirect=True)
        os.ftruncate(side.image.fd, 1024)  # the image shrank under the device
        assert side.run(compiled, 1, 1)[0][1] == 1
        assert side.mem.u8(STATUS) == B.S_IOERR
        assert side.svc.model.metrics.io_fails == 1
        side.image.close()


def test_pure_variable_forces_the_python_path(monkeypatch):
    monkeypatch.setenv(_native.PURE_ENV, "1")
    _native.reset_for_tests()
    try:
        assert _native.native() is None
        assert "IVSHMEM_VIRTIO_PURE" in _native.data_path()
    finally:
        monkeypatch.delenv(_native.PURE_ENV)
        _native.reset_for_tests()
    assert _native.data_path() == "compiled"


def test_version_says_which_paths_run():
    """--version names the backend's and the frontend's data path (each built on its own)."""
    from ivshmem_virtio.procs import run_cli

    out = run_cli(["--version"], timeout=30).stdout.decode()
    assert f"blk data path: {_native.data_path()}" in out
    assert f"frontend: {_native.front_path()}" in out
