"""virtio 1.x constants shared by every device (virtio spec §2.1 status, §6 reserved features)."""

from __future__ import annotations

# device_status bits (virtio 1.x §2.1)
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80
STATUS_LIVE = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK  # 0xF

# reserved (transport/ring) feature bits (virtio 1.x §6)
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36

# device ids (virtio 1.x §5)
ID_NET = 1
ID_BLOCK = 2
ID_CONSOLE = 3
ID_CAN = 36


def bit(n: int) -> int:
    """The feature mask of bit number ``n``."""
    return 1 << n


TRANSPORT_FEATURES = bit(F_VERSION_1) | bit(F_ACCESS_PLATFORM) | bit(F_ORDER_PLATFORM)
"""What every device of ours offers (virtio-ivshmem.md §3.6): ACCESS_PLATFORM makes Linux bounce
buffers through the shared R/W section, ORDER_PLATFORM gives real SMP barriers."""

REQUIRED_FEATURES = bit(F_VERSION_1) | bit(F_ACCESS_PLATFORM)
"""A driver that does not accept these cannot work over ivshmem (§3.6)."""
