"""What the guest does to /dev/vda (a shell plan for tests/guest/init) and what the disk must then
hold (a model the host checks the image against, byte for byte).

The model is a list of pieces [start, end) of the disk, each holding the pattern of one seed
(tests/guest/pattern.py; seed 0 is zeros) or, after a discard, UNKNOWN: virtio leaves the content
of a discarded range to the device, so the host accepts there, sector by sector, either zeros or
what was there before.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .pattern import pattern

UNKNOWN = -1
SECTOR = 512


@dataclass
class Piece:
    start: int
    end: int
    seed: int  # UNKNOWN after a discard
    before: int = 0  # the seed it held before the discard (UNKNOWN pieces)


@dataclass
class DiskModel:
    size: int
    pieces: list[Piece] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.pieces:
            self.pieces = [Piece(0, self.size, 0)]

    def _cut(self, start: int, end: int) -> tuple[list[Piece], list[Piece]]:
        """(pieces outside [start, end), the parts of pieces inside it)."""
        outside, inside = [], []
        for p in self.pieces:
            if p.end <= start or p.start >= end:
                outside.append(p)
                continue
            if p.start < start:
                outside.append(Piece(p.start, start, p.seed, p.before))
            if p.end > end:
                outside.append(Piece(end, p.end, p.seed, p.before))
            inside.append(Piece(max(p.start, start), min(p.end, end), p.seed, p.before))
        return outside, inside

    def write(self, start: int, length: int, seed: int) -> None:
        assert 0 <= start and start + length <= self.size and length > 0
        outside, _ = self._cut(start, start + length)
        self.pieces = sorted([*outside, Piece(start, start + length, seed)],
                             key=lambda p: p.start)

    def discard(self, start: int, length: int) -> None:
        outside, inside = self._cut(start, start + length)
        for p in inside:
            if p.seed != UNKNOWN:
                p.before, p.seed = p.seed, UNKNOWN
        self.pieces = sorted([*outside, *inside], key=lambda p: p.start)

    def segments(self, start: int, length: int) -> list[str]:
        """vdtool chk's SEED:LEN arguments for [start, start + length) ("s" where unknown)."""
        _, inside = self._cut(start, start + length)
        return [f"{'s' if p.seed == UNKNOWN else p.seed}:{p.end - p.start}" for p in inside]

    def mismatches(self, image: bytes, limit: int = 5) -> list[str]:
        """Where ``image`` differs from the model (at most ``limit`` places), none when equal."""
        found: list[str] = []
        if len(image) != self.size:
            return [f"image is {len(image)} bytes, the model {self.size}"]
        for p in self.pieces:
            got = image[p.start:p.end]
            if p.seed != UNKNOWN:
                want = pattern(p.seed, p.start, p.end - p.start)
                if got != want:
                    at = next(i for i in range(len(got)) if got[i] != want[i])
                    found.append(f"byte {p.start + at}: {got[at]:#04x}, want {want[at]:#04x} "
                                 f"(seed {p.seed} over [{p.start}, {p.end}))")
            else:  # each sector (clipped to the piece): all zeros, or what it held before
                old = pattern(p.before, p.start, p.end - p.start)
                cut = p.start
                while cut < p.end:
                    nxt = min(p.end, (cut // SECTOR + 1) * SECTOR)
                    chunk = got[cut - p.start:nxt - p.start]
                    if chunk.count(0) != len(chunk) and chunk != old[cut - p.start:nxt - p.start]:
                        found.append(f"discarded bytes [{cut}, {nxt}) are neither zeros nor "
                                     f"seed {p.before}")
                        break
                    cut = nxt
            if len(found) >= limit:
                break
        return found


@dataclass
class Plan:
    """Shell lines for /plan.sh, the step ids the guest must report ok, and the model."""

    model: DiskModel
    lines: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    _seed: int = 0

    def step(self, *words: object, background: bool = False) -> str:
        sid = f"s{len(self.ids) + 1}"
        self.ids.append(sid)
        self.lines.append(f"op {sid} {' '.join(map(str, words))}{' &' if background else ''}")
        return sid

    def raw(self, line: str) -> None:
        self.lines.append(line)

    def next_seed(self) -> int:
        self._seed += 1
        return self._seed

    def write(self, off: int, length: int, bs: int, mode: str, background: bool = False) -> None:
        seed = self.next_seed()
        self.step("w", seed, off, length, bs, mode, background=background)
        self.model.write(off, length, seed)

    def read(self, off: int, length: int, bs: int, mode: str, background: bool = False) -> None:
        self.step("r", off, length, bs, mode, *self.model.segments(off, length),
                  background=background)

    def script(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def _aligned(rng: random.Random, limit: int, align: int) -> int:
    return rng.randrange(0, limit // align) * align


def read_write_plan(size: int, seed: int) -> Plan:
    """Writes of many sizes, offsets and block sizes, each read back; overlapping rewrites;
    requests in flight together; flushes; discard and both kinds of write-zeroes; then the whole
    disk read back twice (page cache and O_DIRECT)."""
    rng = random.Random(seed)
    plan = Plan(DiskModel(size))
    plan.raw("info")
    # O_DIRECT: sector-aligned, lengths that are and are not multiples of bs, requests the
    # kernel splits (max_sectors_kb), both ends of the disk
    for bs in (512, 4096, 65536, 1 << 20, 4 << 20):
        for _ in range(2):
            length = rng.randrange(1, 3 * bs // SECTOR + 2) * SECTOR
            off = _aligned(rng, size - length, SECTOR)
            plan.write(off, length, bs, "direct")
            plan.read(off, length, rng.choice((4096, 65536, 1 << 20)), "direct")
    plan.write(0, 4096, 4096, "direct")
    plan.write(size - 8192, 8192, 512, "direct")
    plan.read(size - 65536, 65536, 65536, "direct")
    # page cache: any byte offset and length (the kernel reads, modifies and writes sectors)
    for bs in (1, 1000, 4096, 65536):
        length = rng.randrange(1, 40 if bs == 1 else 200_000)
        off = rng.randrange(0, size - length)
        plan.write(off, length, bs, rng.choice(("buffered", "fsync")))
        plan.step("flush")
        plan.read(off & ~(SECTOR - 1), (off + length + SECTOR - 1) // SECTOR * SECTOR
                  - (off & ~(SECTOR - 1)), 4096, "direct")
    # rewrites over what is there: reads must see the newest data of each piece
    for _ in range(4):
        length = rng.randrange(8, 256) * SECTOR
        off = _aligned(rng, size - length, SECTOR)
        plan.write(off, length, 65536, "direct")
        half = length // 2 // SECTOR * SECTOR
        plan.write(off + half // 2, half, 4096, "direct")
        plan.read(max(0, off - 4096), min(size, off + length + 4096) - max(0, off - 4096),
                  1 << 20, "direct")
    # in flight together: disjoint writes, then disjoint reads, 6 processes each
    slot = size // 6
    spans = []
    for k in range(6):
        length = rng.randrange(64, slot // SECTOR // 2) * SECTOR
        spans.append((k * slot + _aligned(rng, slot - length, SECTOR), length))
    for off, length in spans:
        plan.write(off, length, rng.choice((4096, 65536, 1 << 20)), "direct", background=True)
    plan.raw("wait")
    for off, length in spans:
        plan.read(off, length, rng.choice((4096, 131072)), "direct", background=True)
    plan.raw("wait")
    plan.step("flush")
    # discard: the content becomes the device's choice (zeros or as before), then part of it
    # is written again and must read back exactly
    off, length = 4 << 20, 3 << 20
    plan.write(off, length, 1 << 20, "direct")
    plan.step("d", off + 65536, 2 << 20)
    plan.model.discard(off + 65536, 2 << 20)
    plan.read(off, length, 1 << 20, "direct")
    plan.write(off + (1 << 20), 131072, 131072, "direct")
    plan.read(off, length, 65536, "direct")
    # write-zeroes, without unmap (BLKZEROOUT) and with unmap (fallocate PUNCH_HOLE, which the
    # kernel sends only as WRITE_ZEROES, never emulated): zeros must read back
    for step, off, length in (("z", 9 << 20, (1 << 20) + 4096), ("p", 11 << 20, 2 << 20),
                              ("z", (13 << 20) + 512, 3 * SECTOR)):
        plan.write(off - 8192, length + 16384, 65536, "direct")
        plan.step(step, off, length)
        plan.model.write(off, length, 0)
        plan.read(off - 8192, length + 16384, 4096, "direct")
    plan.step("flush")
    plan.read(0, size, 1 << 20, "buffered")
    plan.read(0, size, 4 << 20, "direct")
    plan.step("flush")
    return plan


def restart_plan(size: int, pieces: int = 36) -> Plan:
    """Writes of 512 KiB, each read back, through which the back-end is restarted; then a flush
    and every piece read back again."""
    plan = Plan(DiskModel(size))
    plan.raw("info")
    piece = min(512 << 10, size // pieces // SECTOR * SECTOR)
    for k in range(pieces):
        plan.write(k * piece, piece, 65536, "direct")
        plan.read(k * piece, piece, 131072, "direct")
    plan.step("flush")
    plan.read(0, pieces * piece, 1 << 20, "direct")
    return plan


READ_ONLY_SEED = 77


def read_only_plan(size: int) -> Plan:
    """The disk holds the pattern of READ_ONLY_SEED; the guest sees it read-only, cannot write
    to it, and reads it back whole and in parts."""
    plan = Plan(DiskModel(size, [Piece(0, size, READ_ONLY_SEED)]))
    plan.raw("info")
    plan.step("rofail")
    plan.read(0, size, 1 << 20, "direct")
    plan.read(12345 // SECTOR * SECTOR, 100 * SECTOR, 4096, "direct")
    plan.read(size - 4096, 4096, 512, "direct")
    plan.read(0, size, 65536, "buffered")
    return plan
