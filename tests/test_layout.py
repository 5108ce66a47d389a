"""Byte-level checks of every shared layout against the spec and the kernel's own headers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.transport.allocator import ChunkAllocator


def test_header_offsets_match_spec_table():
    # virtio-ivshmem.md §3.2, offset by offset
    expected = {
        "revision": (0x00, 4), "size": (0x04, 4), "write_transaction": (0x08, 4),
        "device_features": (0x0C, 4), "device_features_sel": (0x10, 4),
        "driver_features": (0x14, 4), "driver_features_sel": (0x18, 4),
        "queue_sel": (0x1C, 4), "queue_size": (0x20, 2), "queue_device_vector": (0x22, 2),
        "queue_driver_vector": (0x24, 2), "queue_enable": (0x26, 2), "queue_desc": (0x28, 8),
        "queue_driver": (0x30, 8), "queue_device": (0x38, 8), "config_event": (0x40, 1),
        "queue_event": (0x41, 1), "device_status": (0x44, 4), "config_generation": (0x48, 4),
    }
    got = {name: (off, size) for off, (name, size) in H.HEADER_FIELDS.items()}
    assert got == expected
    assert H.HDR_CONFIG == 0x4C
    # fields tile the header without gaps except the 2 reserved bytes at 0x42
    covered = sorted(H.HEADER_FIELDS.items())
    pos = 0
    for off, (_name, size) in covered:
        assert off == pos or (pos == 0x42 and off == 0x44)
        pos = off + size
    assert pos == H.HDR_CONFIG


def test_registers_and_protocols():
    assert (H.REG_ID, H.REG_MAX_PEERS, H.REG_INT_CONTROL, H.REG_DOORBELL, H.REG_STATE) == (
        0, 4, 8, 0xC, 0x10)
    assert H.backend_protocol(2) == 0xC002 and H.frontend_protocol(2) == 0x8002
    assert H.backend_protocol(36) == 0xC024 and H.frontend_protocol(36) == 0x8024
    assert H.virtio_device_id(0xC024) == 36 and H.virtio_device_id(0x8002) == 2
    assert H.doorbell_value(1, 2) == 0x10002


def test_feature_bits():
    assert (V.F_INDIRECT_DESC, V.F_EVENT_IDX, V.F_VERSION_1, V.F_ACCESS_PLATFORM,
            V.F_ORDER_PLATFORM) == (28, 29, 32, 33, 36)
    assert V.TRANSPORT_FEATURES == (1 << 32) | (1 << 33) | (1 << 36)
    assert (B.F_SIZE_MAX, B.F_SEG_MAX, B.F_RO, B.F_BLK_SIZE, B.F_FLUSH, B.F_DISCARD,
            B.F_WRITE_ZEROES) == (1, 2, 5, 6, 9, 13, 14)
    assert (B.T_IN, B.T_OUT, B.T_FLUSH, B.T_GET_ID, B.T_DISCARD, B.T_WRITE_ZEROES) == (
        0, 1, 4, 8, 11, 13)


def test_allocator_geometry_for_0xdf000():
    # §3.7: R/W 0xDF000 -> 256-byte chunks, 3568 chunks, the header in chunk 0
    size = H.header_size(B.CONFIG_SIZE)
    assert size == 176  # 0x4C + 96-byte virtio_blk_config, rounded up to 8
    a = ChunkAllocator(0xDF000, size)
    assert a.chunk == 256 and a.nchunks == 3568 and a.header_chunks == 1
    first = a.alloc(1)
    assert first == 256  # chunk 0 is the header
    # power-of-two chunk counts, naturally aligned
    big = a.alloc(3 * 256)  # 4 chunks -> aligned to 4 chunks
    assert big % (4 * 256) == 0
    a.free(first)
    assert a.alloc(256) == 256


def test_allocator_geometry_for_console_link():
    a = ChunkAllocator(0xF000, 88)  # §3.7 second example
    assert a.chunk == 64 and a.nchunks == 960 and a.header_chunks == 2


def test_ring_placement_like_linux():
    # §3.7: desc at +0, avail at +16N, used at align64(16N + 6 + 2N); N=8 -> 262 bytes
    assert R.vring_layout(8, 64) == (0, 128, 192)
    assert R.vring_size(8, 64) == 262
    n = 256
    assert R.vring_layout(n, 64) == (0, 16 * n, (16 * n + 6 + 2 * n + 63) & ~63)


C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/virtio_ring.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
int main(void) {
    printf("desc %zu %zu %zu %zu %zu\n", sizeof(struct vring_desc),
           offsetof(struct vring_desc, addr), offsetof(struct vring_desc, len),
           offsetof(struct vring_desc, flags), offsetof(struct vring_desc, next));
    printf("avail %zu %zu %zu\n", offsetof(struct vring_avail, flags),
           offsetof(struct vring_avail, idx), offsetof(struct vring_avail, ring));
    printf("used %zu %zu %zu %zu\n", offsetof(struct vring_used, flags),
           offsetof(struct vring_used, idx), offsetof(struct vring_used, ring),
           sizeof(struct vring_used_elem));
    printf("ringsize %u %u\n", vring_size(8, 64), vring_size(256, 64));
    printf("flags %d %d %d %d %d\n", VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
           VRING_DESC_F_INDIRECT, VRING_USED_F_NO_NOTIFY, VRING_AVAIL_F_NO_INTERRUPT);
    printf("features %d %d %d %d %d\n", VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_RING_F_EVENT_IDX,
           VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_ORDER_PLATFORM);
    printf("status %d %d %d %d %d %d\n", VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
           VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
           VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_CONFIG_S_FAILED);
    printf("blkcfg %zu", sizeof(struct virtio_blk_config));
#define F(m) printf(" %s=%zu", #m, offsetof(struct virtio_blk_config, m))
    F(capacity); F(size_max); F(seg_max); F(geometry); F(blk_size); F(physical_block_exp);
    F(alignment_offset); F(min_io_size); F(opt_io_size); F(wce); F(num_queues);
    F(max_discard_sectors); F(max_discard_seg); F(discard_sector_alignment);
    F(max_write_zeroes_sectors); F(max_write_zeroes_seg); F(write_zeroes_may_unmap);
    printf("\n");
    printf("blkreq %zu %zu %zu %zu\n", sizeof(struct virtio_blk_outhdr),
           offsetof(struct virtio_blk_outhdr, type), offsetof(struct virtio_blk_outhdr, ioprio),
           offsetof(struct virtio_blk_outhdr, sector));
    printf("blkdwz %zu\n", sizeof(struct virtio_blk_discard_write_zeroes));
    printf("blkfeat %d %d %d %d %d %d %d\n", VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX,
           VIRTIO_BLK_F_RO, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD,
           VIRTIO_BLK_F_WRITE_ZEROES);
    printf("blktypes %d %d %d %d %d %d %d %d %d\n", VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
           VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
           VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP);
    return 0;
}
"""


def test_layouts_match_the_kernel_headers(tmp_path: Path):
    """The kernel's own definitions are the referee (STYLE.md §6)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed (Debian package gcc)"
    if not Path("/usr/include/linux/virtio_ring.h").exists():
        pytest.fail("kernel headers missing: install the Debian package linux-libc-dev")
    src = tmp_path / "layout.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "layout"
    subprocess.run([cc, "-std=gnu11", "-o", str(exe), str(src)], check=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                         timeout=10).stdout
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines()}
    assert lines["desc"] == ["16", "0", "8", "12", "14"] and R.DESC.size == 16
    assert lines["avail"] == [str(R.AVAIL_FLAGS), str(R.AVAIL_IDX), str(R.AVAIL_RING)]
    assert lines["used"] == [str(R.USED_FLAGS), str(R.USED_IDX), str(R.USED_RING),
                             str(R.USED_ELEM_SIZE)]
    assert lines["ringsize"] == [str(R.vring_size(8, 64)), str(R.vring_size(256, 64))]
    assert lines["flags"] == [str(x) for x in (R.DESC_F_NEXT, R.DESC_F_WRITE,
                                               R.DESC_F_INDIRECT, R.USED_F_NO_NOTIFY,
                                               R.AVAIL_F_NO_INTERRUPT)]
    assert lines["features"] == [str(x) for x in (V.F_INDIRECT_DESC, V.F_EVENT_IDX,
                                                  V.F_VERSION_1, V.F_ACCESS_PLATFORM,
                                                  V.F_ORDER_PLATFORM)]
    assert lines["status"] == [str(x) for x in (V.STATUS_ACKNOWLEDGE, V.STATUS_DRIVER,
                                                V.STATUS_DRIVER_OK, V.STATUS_FEATURES_OK,
                                                V.STATUS_NEEDS_RESET, V.STATUS_FAILED)]
    blkcfg = lines["blkcfg"]
    kernel_size = int(blkcfg[0])
    fields = dict(f.split("=") for f in blkcfg[1:])
    for name, off in fields.items():
        assert B.CONFIG_FIELDS[name][0] == int(off), name
    # older uapi headers end the struct earlier; ours must cover at least the kernel's
    assert kernel_size <= B.CONFIG_SIZE
    assert lines["blkreq"] == ["16", "0", "4", "8"] and B.OUTHDR.size == 16
    assert lines["blkdwz"] == [str(B.DWZ_SEG_SIZE)]
    assert lines["blkfeat"] == [str(x) for x in (B.F_SIZE_MAX, B.F_SEG_MAX, B.F_RO,
                                                 B.F_BLK_SIZE, B.F_FLUSH, B.F_DISCARD,
                                                 B.F_WRITE_ZEROES)]
    assert lines["blktypes"] == [str(x) for x in (B.T_IN, B.T_OUT, B.T_FLUSH, B.T_GET_ID,
                                                  B.T_DISCARD, B.T_WRITE_ZEROES, B.S_OK,
                                                  B.S_IOERR, B.S_UNSUPP)]
