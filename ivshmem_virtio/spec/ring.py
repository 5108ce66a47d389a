"""Split virtqueue layout (virtio 1.x §2.7, Linux ``include/uapi/linux/virtio_ring.h``).

Offsets inside the three areas; everything little endian. A test compiles a C program against the
system's ``linux/virtio_ring.h`` and compares these numbers with the kernel's.
"""

from __future__ import annotations

import struct

# struct vring_desc { le64 addr; le32 len; le16 flags; le16 next; }
DESC = struct.Struct("<QIHH")
DESC_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4

# struct vring_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; }
AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
AVAIL_F_NO_INTERRUPT = 1

# struct vring_used { le16 flags; le16 idx; struct vring_used_elem { le32 id; le32 len; } ring[N];
#                     le16 avail_event; }
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4
USED_ELEM = struct.Struct("<II")
USED_ELEM_SIZE = 8
USED_F_NO_NOTIFY = 1

MAX_QUEUE_SIZE = 32768
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4


def desc_table_size(n: int) -> int:
    return DESC_SIZE * n


def avail_size(n: int) -> int:
    """Bytes of the avail ring; the trailing used_event is always reserved (Linux does)."""
    return 4 + 2 * n + 2


def used_size(n: int) -> int:
    return 4 + USED_ELEM_SIZE * n + 2


def used_event_off(n: int) -> int:
    """Offset of ``used_event`` in the avail ring (written by the driver)."""
    return AVAIL_RING + 2 * n


def avail_event_off(n: int) -> int:
    """Offset of ``avail_event`` in the used ring (written by the device)."""
    return USED_RING + USED_ELEM_SIZE * n


def vring_layout(n: int, align: int) -> tuple[int, int, int]:
    """(desc, avail, used) offsets of one contiguous legacy-style vring (``vring_init``)."""
    avail = desc_table_size(n)
    used = (avail + avail_size(n) + align - 1) & ~(align - 1)
    return 0, avail, used


def vring_size(n: int, align: int) -> int:
    """Linux ``vring_size()``: desc + avail, padded to ``align``, then used."""
    return vring_layout(n, align)[2] + used_size(n)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Linux ``vring_need_event``: did ``[old, new)`` cross the peer's event index?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
