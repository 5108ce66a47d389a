"""The race a hostile frontend can run: it rewrites the ring while the backend walks it.

A peer thread keeps publishing valid blk requests and, between and during the backend's walks,
flips descriptors (address, length, flags, next), avail entries, the avail index and the status
byte's address, all in the same shared bytearray the backend thread reads. The backend (the real
DeviceQueue walk and BlkModel.handle/execute) must never crash, never touch memory outside its
section (canaries on both sides of the window stay intact, and the image is only asked for
in-range I/O), and every chain is either served with a status byte in {OK, IOERR, UNSUPP} or
ends in a ring error, after which the backend resets its queue as the runner would. The thread
switch interval is shortened so the two really interleave inside a walk.
"""

from __future__ import annotations

import random
import struct
import sys
import threading
import time

from ivshmem_virtio.backend.devices.blk import BlkModel, BlkRequest
from ivshmem_virtio.backend.runner import PEER_FAULTS
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.virtqueue.device import DeviceQueue

from .rings import AVAIL, DATA, DESC, EDGE_ADDRS, EDGE_LENS, EDGE_U16, MEM, QSIZE, USED
from .targets import SECTORS, FuzzImage

PAD = 256  # canary bytes on each side of the section
CANARY = bytes((i * 7 + 3) & 0xFF for i in range(PAD))
SECONDS = 2.0  # at least this long, and until both outcomes were seen (at most LIMIT)
LIMIT = 30.0
F_NEXT, F_WRITE = 1, 2
HDR, BUF, STATUS = DATA, DATA + 0x100, DATA + 0x80  # the peer's one request


def _peer(mem: Region, stop: threading.Event, rng: random.Random, counts: dict[str, int]) -> None:
    """A frontend that publishes valid reads and keeps changing them under the backend's feet."""
    idx = 0
    while not stop.is_set():
        mem.pack(B.OUTHDR, HDR, rng.choice((B.T_IN, B.T_IN, B.T_OUT, B.T_FLUSH)), 0,
                 rng.randrange(SECTORS))
        mem.set_u8(STATUS, 0xEE)
        mem.pack(struct.Struct("<QIHH"), DESC, HDR, 16, F_NEXT, 1)
        mem.pack(struct.Struct("<QIHH"), DESC + 16, BUF, 512, F_NEXT | F_WRITE, 2)
        mem.pack(struct.Struct("<QIHH"), DESC + 32, STATUS, 1, F_WRITE, 0)
        mem.set_u16(AVAIL + 4 + 2 * (idx % QSIZE), 0)
        idx = (idx + 1) & 0xFFFF
        mem.set_u16(AVAIL + 2, idx)
        counts["published"] += 1
        for _ in range(rng.randint(0, 3)):
            d = DESC + 16 * rng.randrange(3)
            what = rng.randrange(7)
            if what == 0:
                mem.set_u64(d, rng.choice(EDGE_ADDRS) & (2**64 - 1))
            elif what == 1:
                mem.set_u32(d + 8, rng.choice(EDGE_LENS) & 0xFFFFFFFF)
            elif what == 2:
                mem.set_u16(d + 12, rng.getrandbits(3))
            elif what == 3:
                mem.set_u16(d + 14, rng.choice(EDGE_U16))
            elif what == 4:
                mem.set_u16(AVAIL + 4 + 2 * rng.randrange(QSIZE), rng.choice(EDGE_U16))
            elif what == 5:
                idx = rng.choice((idx, idx + QSIZE + 1, rng.getrandbits(16))) & 0xFFFF
                mem.set_u16(AVAIL + 2, idx)
            else:  # the status byte's descriptor points elsewhere, maybe out of the section
                mem.set_u64(DESC + 32, rng.choice((STATUS, HDR, MEM - 1, MEM, 2**64 - 1)))
            counts["flips"] += 1
            time.sleep(0)


def test_peer_rewriting_the_ring_while_the_backend_walks() -> None:
    raw = bytearray(CANARY + bytes(MEM) + CANARY)
    mem = Region(raw, PAD, MEM, "rw")
    model = BlkModel(SECTORS, size_max=4096, seg_max=8)
    image = FuzzImage()
    counts = {"published": 0, "flips": 0, "served": 0, "ring_errors": 0}
    stop = threading.Event()
    failures: list[BaseException] = []
    peer = threading.Thread(target=_peer, args=(mem, stop, random.Random(13), counts),
                            daemon=True)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        peer.start()
        vq = DeviceQueue(mem, QSIZE, DESC, AVAIL, USED)
        start = time.monotonic()
        m = model.metrics
        while time.monotonic() < start + LIMIT:
            if time.monotonic() > start + SECONDS and counts["served"] >= 200 \
                    and counts["ring_errors"] and m.read_count and m.write_count:
                break
            try:
                for chain in vq.pop_all():
                    for addr, n in chain.readable + chain.writable:
                        assert chain.error is not None or mem.contains(addr, n), chain
                    res = model.handle(mem, chain, image)
                    if isinstance(res, BlkRequest):
                        res = model.execute(mem, res, image)
                    assert 1 <= res <= max(1, chain.writable_len), (res, chain)
                    vq.push(chain.head, res)
                    counts["served"] += 1
                vq.publish()
            except PEER_FAULTS:
                counts["ring_errors"] += 1  # NEEDS_RESET; the driver re-inits: so do we
                vq = DeviceQueue(mem, QSIZE, DESC, AVAIL, USED)
                vq.last_avail = vq.next_used = vq.signalled_used = mem.u16(AVAIL + 2)
            except BaseException as e:  # noqa: BLE001 - reported below with the counts
                failures.append(e)
                break
            time.sleep(0)
    finally:
        stop.set()
        peer.join(5)
        sys.setswitchinterval(old)
    assert not peer.is_alive()
    assert not failures, f"{failures[0]!r} after {counts}"
    assert raw[:PAD] == CANARY and raw[PAD + MEM:] == CANARY, "write outside the section"
    ok = model.metrics.read_count + model.metrics.write_count + model.metrics.flush_count
    print(f"race: {counts}, requests executed OK {ok}")
    assert counts["served"] >= 200 and counts["flips"] > 0, counts
    assert ok > 0 and counts["ring_errors"] > 0, counts  # both outcomes really happened
