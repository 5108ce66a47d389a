"""The least a virtio-blk request can cost in Python: a bare split ring between two processes.

``python -m ivshmem_virtio.benchmarks.minring spin|eventfd IMAGE ROUNDS WARMUP OUTFILE``: the
parent is a driver,
a forked child a device, sharing one anonymous mapping laid out as a real split ring
(``vring_layout``) plus a header, data and status buffer. Each round trip is what a 512 B
virtio-blk read must do at the least: the driver writes the request header, three descriptors,
the avail entry and avail->idx, then waits; the device reads avail->idx, the entry and the
three descriptors, unpacks the header, ``preadv``\\ s 512 B of IMAGE into the data buffer, writes
the status byte, the used element and used->idx; the driver sees used->idx and copies the data
out (checked against IMAGE after the clock stops). Waiting is a busy poll (``spin``) or one
blocking eventfd per direction (``eventfd``).

What it leaves out is what the product adds: validation of the peer's values, an event loop,
event-idx suppression, request objects, more than one request in flight. So it is a floor for
pure Python, next to the ping-pong floors of the machine: the project's QD1 latency cannot go
below it without native code. Round trips go to OUTFILE as native uint64 nanoseconds.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
import sys
import time

from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ring as R

from .pingpong import _reap, fork_pinned

QSIZE = 256
_HDR = struct.Struct("<IIQ")


def _layout() -> tuple[int, int, int, int, int, int, int]:
    desc, avail, used = R.vring_layout(QSIZE, 4096)
    end = used + R.used_size(QSIZE)
    hdr = (end + 63) & ~63
    data, status = hdr + 64, hdr + 64 + 4096
    return desc, avail, used, hdr, data, status, status + 64


def run(mode: str, image: str, rounds: int, warmup: int) -> array.array:
    desc, avail, used, hdr, data, status, size = _layout()
    mem = mmap.mmap(-1, size)  # anonymous and MAP_SHARED: the child sees the same pages
    mv = memoryview(mem)
    u16, u32, u64 = mv.cast("H"), mv.cast("I"), mv.cast("Q")
    avail_idx, avail_ring = (avail + R.AVAIL_IDX) // 2, (avail + R.AVAIL_RING) // 2
    used_idx, used_ring = (used + R.USED_IDX) // 2, (used + R.USED_RING) // 4
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    sectors = os.fstat(fd).st_size // B.SECTOR_SIZE
    to_dev = os.eventfd(0, os.EFD_CLOEXEC)
    to_drv = os.eventfd(0, os.EFD_CLOEXEC)
    block = mode == "eventfd"
    total = rounds + warmup
    pid = fork_pinned()
    if pid == 0:  # the device
        try:
            unpack, preadv = _HDR.unpack_from, os.preadv
            last = 0
            for _ in range(total):
                if block:
                    os.eventfd_read(to_dev)
                while u16[avail_idx] == last:
                    pass
                head = u16[avail_ring + (last & (QSIZE - 1))]
                chain = []
                i = head
                while True:  # walk the chain, as a device must: it cannot assume its shape
                    d = (desc >> 1) + 8 * i
                    chain.append((u64[(desc >> 3) + 2 * i], u32[(desc >> 2) + 4 * i + 2]))
                    if not u16[d + 6] & R.DESC_F_NEXT:
                        break
                    i = u16[d + 7]
                _, _, sector = unpack(mv, chain[0][0])
                addr, length = chain[1]
                n = preadv(fd, [mv[addr:addr + length]], sector * B.SECTOR_SIZE)
                mv[chain[2][0]] = B.S_OK
                slot = used_ring + 2 * (last & (QSIZE - 1))
                u32[slot], u32[slot + 1] = head, n + 1
                last = (last + 1) & 0xFFFF
                u16[used_idx] = last
                if block:
                    os.eventfd_write(to_drv, 1)
        finally:
            os._exit(0)
    lat = array.array("Q", bytes(8 * rounds))
    out = bytearray(512)
    now, pack = time.perf_counter_ns, _HDR.pack_into
    idx = 0
    try:
        for r in range(total):
            t0 = now()
            sector = (r * 7919) % sectors
            pack(mv, hdr, B.T_IN, 0, sector)
            for i, (addr, length, flags) in enumerate((
                    (hdr, 16, R.DESC_F_NEXT), (data, 512, R.DESC_F_NEXT | R.DESC_F_WRITE),
                    (status, 1, R.DESC_F_WRITE))):
                d = (desc >> 1) + 8 * i
                u64[(desc >> 3) + 2 * i], u32[(desc >> 2) + 4 * i + 2] = addr, length
                u16[d + 6], u16[d + 7] = flags, i + 1
            u16[avail_ring + (idx & (QSIZE - 1))] = 0
            idx = (idx + 1) & 0xFFFF
            u16[avail_idx] = idx
            if block:
                os.eventfd_write(to_dev, 1)
                os.eventfd_read(to_drv)
            while u16[used_idx] != idx:
                pass
            if mv[status] != B.S_OK:
                raise SystemExit("minimal ring: the device answered an error")
            out[:] = mv[data:data + 512]
            if r >= warmup:
                lat[r - warmup] = now() - t0
            if out != os.pread(fd, 512, sector * B.SECTOR_SIZE):  # outside the timed part
                raise SystemExit(f"minimal ring: wrong data for sector {sector}")
    finally:
        _reap(pid)
        os.close(fd)
    return lat


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] not in ("eventfd", "spin"):
        print(__doc__, file=sys.stderr)
        return 2
    lat = run(argv[0], argv[1], int(argv[2]), int(argv[3]))
    with open(argv[4], "wb") as f:
        lat.tofile(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
