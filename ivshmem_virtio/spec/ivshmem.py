"""ivshmem 2.0 device and the virtio-over-ivshmem header (virtio-ivshmem.md §1-§3).

One module per wire format: this one holds the register page, the PCI identity, the state
values and ``struct virtio_ivshmem_header`` exactly as Linux's ``virtio_ivshmem`` front-end
driver lays it out.
"""

from __future__ import annotations

# PCI identity (§1.1)
PCI_VENDOR = 0x110A
PCI_DEVICE = 0x4106
PCI_CLASS_BASE = 0xFF
VENDOR_CAP_ID = 0x09
CAP_STATE_TABLE_SIZE = 0x04
CAP_RW_SIZE = 0x08
CAP_OUTPUT_SIZE = 0x10
CAP_BASE_ADDR = 0x18
CAP_PRIV_CONTROL = 0x03

# register page (BAR0), §1.2: aligned 32-bit accesses only
REG_ID = 0x00
REG_MAX_PEERS = 0x04
REG_INT_CONTROL = 0x08
REG_DOORBELL = 0x0C
REG_STATE = 0x10
REGS_SIZE = 0x1000

# protocols (§3.1)
PROTO_UNDEFINED = 0x0000
PROTO_NET = 0x0001
PROTO_VIRTIO_FRONT = 0x8000
PROTO_VIRTIO_BACK = 0xC000


def frontend_protocol(device_id: int) -> int:
    return PROTO_VIRTIO_FRONT + device_id


def backend_protocol(device_id: int) -> int:
    return PROTO_VIRTIO_BACK + device_id


def is_virtio_backend(protocol: int) -> bool:
    return protocol >= PROTO_VIRTIO_BACK


def is_virtio_frontend(protocol: int) -> bool:
    return PROTO_VIRTIO_FRONT <= protocol < PROTO_VIRTIO_BACK


def virtio_device_id(protocol: int) -> int:
    """The virtio device id a virtio protocol value carries (``class & 0x7FFF`` in Linux, §3.1)."""
    return protocol & 0x3FFF


def doorbell_value(peer: int, vector: int) -> int:
    return ((peer & 0xFFFF) << 16) | (vector & 0xFFFF)


# state values of the virtio protocol (§3.5)
STATE_RESET = 0
STATE_READY = 1

# struct virtio_ivshmem_header (§3.2): offset -> (name, size)
HDR_REVISION = 0x00
HDR_SIZE = 0x04
HDR_WRITE_TRANSACTION = 0x08
HDR_DEVICE_FEATURES = 0x0C
HDR_DEVICE_FEATURES_SEL = 0x10
HDR_DRIVER_FEATURES = 0x14
HDR_DRIVER_FEATURES_SEL = 0x18
HDR_QUEUE_SEL = 0x1C
HDR_QUEUE_SIZE = 0x20
HDR_QUEUE_DEVICE_VECTOR = 0x22
HDR_QUEUE_DRIVER_VECTOR = 0x24
HDR_QUEUE_ENABLE = 0x26
HDR_QUEUE_DESC = 0x28
HDR_QUEUE_DRIVER = 0x30
HDR_QUEUE_DEVICE = 0x38
HDR_CONFIG_EVENT = 0x40
HDR_QUEUE_EVENT = 0x41
HDR_DEVICE_STATUS = 0x44
HDR_CONFIG_GENERATION = 0x48
HDR_CONFIG = 0x4C

HEADER_FIELDS: dict[int, tuple[str, int]] = {
    HDR_REVISION: ("revision", 4),
    HDR_SIZE: ("size", 4),
    HDR_WRITE_TRANSACTION: ("write_transaction", 4),
    HDR_DEVICE_FEATURES: ("device_features", 4),
    HDR_DEVICE_FEATURES_SEL: ("device_features_sel", 4),
    HDR_DRIVER_FEATURES: ("driver_features", 4),
    HDR_DRIVER_FEATURES_SEL: ("driver_features_sel", 4),
    HDR_QUEUE_SEL: ("queue_sel", 4),
    HDR_QUEUE_SIZE: ("queue_size", 2),
    HDR_QUEUE_DEVICE_VECTOR: ("queue_device_vector", 2),
    HDR_QUEUE_DRIVER_VECTOR: ("queue_driver_vector", 2),
    HDR_QUEUE_ENABLE: ("queue_enable", 2),
    HDR_QUEUE_DESC: ("queue_desc", 8),
    HDR_QUEUE_DRIVER: ("queue_driver", 8),
    HDR_QUEUE_DEVICE: ("queue_device", 8),
    HDR_CONFIG_EVENT: ("config_event", 1),
    HDR_QUEUE_EVENT: ("queue_event", 1),
    HDR_DEVICE_STATUS: ("device_status", 4),
    HDR_CONFIG_GENERATION: ("config_generation", 4),
}

REVISION = 1


def header_size(config_size: int) -> int:
    """The ``size`` field: header plus device config, rounded up to 8 (§8.5)."""
    return (HDR_CONFIG + config_size + 7) & ~7


# frontend allocator (§3.7), as Linux's virtio_ivshmem sets it up
SMP_CACHE_BYTES = 64
PAGE_SIZE = 4096
VRING_ALIGN = SMP_CACHE_BYTES


def chunk_size(rw_size: int, page_size: int = PAGE_SIZE) -> int:
    """Allocator chunk: rw/4096 clamped to [64, PAGE_SIZE], rounded up to a power of two."""
    c = max(SMP_CACHE_BYTES, min(page_size, rw_size // 4096))
    return 1 << (c - 1).bit_length()
