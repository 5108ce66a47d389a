"""virtio-blk wire format (virtio 1.x §5.2, Linux ``include/uapi/linux/virtio_blk.h``)."""

from __future__ import annotations

import struct

DEVICE_ID = 2
SECTOR_SIZE = 512

# feature bits
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# request types
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

# status byte
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

# struct virtio_blk_outhdr { le32 type; le32 ioprio; le64 sector; }
OUTHDR = struct.Struct("<IIQ")
OUTHDR_SIZE = 16

# struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags; }
DWZ_SEG = struct.Struct("<QII")
DWZ_SEG_SIZE = 16
DWZ_F_UNMAP = 1

# struct virtio_blk_config (packed); field -> (offset, size). Size 96 with the zoned fields of
# current uapi headers; checked against the system header by a test.
CONFIG_FIELDS: dict[str, tuple[int, int]] = {
    "capacity": (0, 8),
    "size_max": (8, 4),
    "seg_max": (12, 4),
    "geometry": (16, 4),
    "blk_size": (20, 4),
    "physical_block_exp": (24, 1),
    "alignment_offset": (25, 1),
    "min_io_size": (26, 2),
    "opt_io_size": (28, 4),
    "wce": (32, 1),
    "num_queues": (34, 2),
    "max_discard_sectors": (36, 4),
    "max_discard_seg": (40, 4),
    "discard_sector_alignment": (44, 4),
    "max_write_zeroes_sectors": (48, 4),
    "max_write_zeroes_seg": (52, 4),
    "write_zeroes_may_unmap": (56, 1),
    "max_secure_erase_sectors": (60, 4),
    "max_secure_erase_seg": (64, 4),
    "secure_erase_sector_alignment": (68, 4),
    "zoned": (72, 24),
}
CONFIG_SIZE = 96


def encode_config(**values: int) -> bytes:
    """A ``virtio_blk_config`` with the given fields set and every other byte zero."""
    buf = bytearray(CONFIG_SIZE)
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
    for name, value in values.items():
        off, size = CONFIG_FIELDS[name]
        struct.pack_into(fmt[size], buf, off, value)
    return bytes(buf)
