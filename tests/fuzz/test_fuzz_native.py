"""libFuzzer (ASan + UBSan) on the compiled blk data path: ``ivshmem_virtio/_native/vqblk.c``.

The harness (``fuzz_vqblk.c``, next to the source) calls the very functions the extension
calls (walk, blk parse, preadv/pwritev, used push, publish) on a fuzzer-written ring in a heap
block of exactly the section's size, with the syscalls replaced by copies that abort when an
iovec leaves the section. Each run: >= 100,000 inputs from the seed corpus
(tests/fuzz/corpus/native_blk, valid reads and writes, direct and indirect, made by
:func:`seeds`), new inputs in a temporary directory. Prints the executions and how many served
a request. A sanitizer report or a broken invariant fails the test with the input saved.
Skipped only when clang or its libFuzzer runtime is missing (.ci/apt-packages installs both).

``python tests/fuzz/test_fuzz_native.py`` rewrites the seed corpus.
"""

from __future__ import annotations

import re
import struct
import sys
from pathlib import Path

import pytest

from . import Record, libfuzzer

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "ivshmem_virtio" / "_native" / "fuzz_vqblk.c"
CORPUS = Path(__file__).resolve().parent / "corpus" / "native_blk"
DICT = HARNESS.with_suffix(".dict")
RUNS = 100_000
MIN_DEEP = 0.05
LINE = re.compile(r"^fuzz_vqblk: (\d+) execs, (\d+) reached 'served'$", re.M)

# the harness's layout (fuzz_vqblk.c): ring areas, tables and headers in the first 0x200 bytes
DESC, AVAIL, USED, ITABLE, HDRS, STATUS, DATA = 0x0, 0x80, 0xA0, 0x100, 0x1C0, 0x200, 0x400
SECTION = 0x2000
NEXT, WRITE, INDIRECT = 1, 2, 4


def _seed(kinds: list[str], *, flags: int = 5, limit: int = 8, start: int = 0,
          at_end: bool = False) -> bytes:
    """Parameters + overlay for a ring of 8 holding one chain per kind (4 descriptors apart);
    ``at_end``: data and status buffers end exactly at the end of the section (one bit flip
    of a length or address away from leaving it)."""
    mem = bytearray(0x200)
    for slot, kind in enumerate(kinds):
        head = 4 * slot % 8
        rtype = 1 if "write" in kind else 0
        hdr, status, data = HDRS + 16 * slot, STATUS + slot, DATA + 0x200 * slot
        if at_end:
            status, data = SECTION - 1 - slot, SECTION - 0x200 * (slot + 1) - 8
        struct.pack_into("<IIQ", mem, hdr, rtype, 0, slot)
        descs = [(hdr, 16, 0), (data, 512, 0 if rtype else WRITE), (status, 1, WRITE)]
        if kind.startswith("indirect"):
            table = ITABLE + 0x30 * slot
            for i, (a, n, f) in enumerate(descs):
                struct.pack_into("<QIHH", mem, table + 16 * i, a, n, f | (NEXT if i < 2 else 0),
                                 i + 1)
            struct.pack_into("<QIHH", mem, DESC + 16 * head, table, 48, INDIRECT, 0)
        else:
            for i, (a, n, f) in enumerate(descs):
                struct.pack_into("<QIHH", mem, DESC + 16 * (head + i), a, n,
                                 f | (NEXT if i < 2 else 0), head + i + 1)
        struct.pack_into("<H", mem, AVAIL + 4 + 2 * ((start + slot) % 8), head)
    struct.pack_into("<H", mem, AVAIL + 2, (start + len(kinds)) & 0xFFFF)
    struct.pack_into("<H", mem, USED + 2, start)
    struct.pack_into("<H", mem, AVAIL + 4 + 16, start)  # used_event
    return bytes([flags, limit, 3]) + bytes(mem)


def seeds() -> dict[str, bytes]:
    return {
        "read": _seed(["read"]),
        "write": _seed(["write"]),
        "read_write": _seed(["read", "write"]),
        "indirect_read": _seed(["indirect read"]),
        "indirect_write_ro": _seed(["indirect write"], flags=3),
        "wrap": _seed(["read", "indirect write"], start=0xFFFF),
        "no_event_idx": _seed(["write", "read"], flags=1, limit=1),
        "read_at_end": _seed(["read"], at_end=True),
        "write_at_end": _seed(["indirect write", "read"], at_end=True),
    }


@pytest.mark.timeout(300)
def test_compiled_walk_and_blk_parse_fuzz_clean(tmp_path: Path,
                                                record_property: Record) -> None:
    libfuzzer(HARNESS, tmp_path, CORPUS, RUNS, LINE, record_property, "served a request",
              MIN_DEEP, f"-dict={DICT}")


if __name__ == "__main__":
    CORPUS.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (CORPUS / name).write_bytes(data)
    print(f"{len(seeds())} seeds in {CORPUS}", file=sys.stderr)
