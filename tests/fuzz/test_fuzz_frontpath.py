"""libFuzzer (ASan + UBSan) on the compiled driver-side queue: ``ivshmem_virtio/_native/vqdrv.c``.

The harness (``fuzz_vqdrv.c``, next to the source) adds blk requests with the very functions
the extension calls (placement, add, kick decision), lets the input write anything over the
section after the descriptor table (the avail ring, the used ring, status bytes and data), then
reaps: used index check, used element check, chain back to the free list, blk status check.
After each round the driver's private state must still partition the descriptors and no
completion may report more bytes than its buffer holds. >= 100,000 inputs per run from seeds
(:func:`seeds`: honest completions of reads, writes and flushes, kept in
tests/fuzz/corpus/native_drv). Skipped only when clang or its libFuzzer runtime is missing.

``python tests/fuzz/test_fuzz_frontpath.py`` rewrites the seed corpus.
"""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import pytest

from . import Record, libfuzzer

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "ivshmem_virtio" / "_native" / "fuzz_vqdrv.c"
CORPUS = Path(__file__).resolve().parent / "corpus" / "native_drv"
RUNS = 100_000
MIN_DEEP = 0.02
LINE = re.compile(r"^fuzz_vqdrv: (\d+) execs, (\d+) reached 'completed'$", re.M)

# the harness's layout (fuzz_vqdrv.c): the input is laid from AVAIL on
AVAIL, USED, BOUNCE, BUF = 0x80, 0xA0, 0x100, 0xC0


def _seed(flags: int, kinds: list[int], lens: list[int]) -> bytes:
    """An honest device's answer to ``kinds`` (0 read, 1 write, 2 flush, in the harness's
    order): heads as the free list hands them out, status OK, the given used lengths."""
    overlay = bytearray(0x220)  # up to the third status byte (inside -max_len)
    head = 0
    for i, (kind, length) in enumerate(zip(kinds, lens, strict=True)):
        struct.pack_into("<II", overlay, USED - AVAIL + 4 + 8 * i, head, length)
        overlay[BOUNCE + BUF * i + 16 - AVAIL] = 0
        head += 2 if kind == 2 else 3
    struct.pack_into("<H", overlay, USED - AVAIL + 2, len(kinds))
    return bytes([flags, len(kinds) - 1]) + bytes(overlay)


def seeds() -> dict[str, bytes]:
    return {
        "read": _seed(1, [0], [65]),
        "read_write_flush": _seed(1, [0, 1, 2], [65, 1, 1]),
        "no_event_idx_short_read": _seed(0, [0, 1], [3, 1]),
        "suppressed_two_rounds": _seed(1 | 2 | 4, [0, 1, 2], [65, 1, 1]),
    }


@pytest.mark.timeout(300)
def test_compiled_driver_queue_fuzz_clean(tmp_path: Path, record_property: Record) -> None:
    libfuzzer(HARNESS, tmp_path, CORPUS, RUNS, LINE, record_property, "took a completion",
              MIN_DEEP)


if __name__ == "__main__":
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (CORPUS / name).write_bytes(data)
    print(f"{len(seeds())} seeds in {CORPUS}", file=sys.stderr)
