"""virtio-console wire format (VIRTIO 1.2 §5.3, Linux ``include/uapi/linux/virtio_console.h``).

Wire format only: constants, the config layout and the control message. Port 0 uses queues 0
(receiveq, device -> driver) and 1 (transmitq, driver -> device); with MULTIPORT, queues 2/3
are the control receiveq/transmitq and port N > 0 uses queues 2N + 2 and 2N + 3.
"""

from __future__ import annotations

import struct
from typing import Final

# --- Identity -------------------------------------------------------------------------------
VIRTIO_ID_CONSOLE: Final = 3
#: ivshmem protocol of the back end (device side): 0xC000 | device id.
IVSHMEM_PROTOCOL_CONSOLE_BACKEND: Final = 0xC000 | VIRTIO_ID_CONSOLE
#: ivshmem protocol of the front end (driver side): 0x8000 | device id.
IVSHMEM_PROTOCOL_CONSOLE_FRONTEND: Final = 0x8000 | VIRTIO_ID_CONSOLE

# --- Virtqueues (port 0) --------------------------------------------------------------------
RECEIVEQ: Final = 0  # device -> driver: input for the cell
TRANSMITQ: Final = 1  # driver -> device: the cell's output
CONTROL_RECEIVEQ: Final = 2  # MULTIPORT only
CONTROL_TRANSMITQ: Final = 3  # MULTIPORT only
NUM_QUEUES_PORT0: Final = 2


def port_queues(port: int) -> tuple[int, int]:
    """(receiveq, transmitq) of a port: 0/1 for port 0, 2N+2 / 2N+3 after the control pair."""
    return (0, 1) if port == 0 else (2 * port + 2, 2 * port + 3)


# --- Feature bits (bit numbers) -------------------------------------------------------------
VIRTIO_CONSOLE_F_SIZE: Final = 0  # cols/rows in the config are valid
VIRTIO_CONSOLE_F_MULTIPORT: Final = 1  # max_nr_ports valid, control queues exist
VIRTIO_CONSOLE_F_EMERG_WRITE: Final = 2  # the driver may write a character to emerg_wr

F_SIZE: Final = 1 << VIRTIO_CONSOLE_F_SIZE
F_MULTIPORT: Final = 1 << VIRTIO_CONSOLE_F_MULTIPORT
F_EMERG_WRITE: Final = 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
F_ALL: Final = F_SIZE | F_MULTIPORT | F_EMERG_WRITE
DEVICE_FEATURE_MASK: Final = (1 << 24) - 1

# --- Config space ---------------------------------------------------------------------------
#: ``struct virtio_console_config { le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr; }``
#: (packed, 12 bytes: header size 0x4C + 12 = 0x58, already a multiple of 8).
CONFIG: Final = struct.Struct("<HHII")
CONFIG_SIZE: Final = CONFIG.size
assert CONFIG_SIZE == 12
OFF_COLS: Final = 0
OFF_ROWS: Final = 2
OFF_MAX_NR_PORTS: Final = 4
OFF_EMERG_WR: Final = 8


def encode_config(cols: int, rows: int, max_nr_ports: int = 1) -> bytes:
    """The config as the device shows it; emerg_wr reads 0 (it is write-only for the driver)."""
    return CONFIG.pack(cols, rows, max_nr_ports, 0)


def decode_size(config: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(cols, rows) from config bytes."""
    cols, rows, _ports, _emerg = CONFIG.unpack_from(config)
    return cols, rows


# --- Control messages (MULTIPORT) -----------------------------------------------------------
#: ``struct virtio_console_control { le32 id; le16 event; le16 value; }``
CONTROL: Final = struct.Struct("<IHH")
VIRTIO_CONSOLE_BAD_ID: Final = 0xFFFFFFFF
VIRTIO_CONSOLE_DEVICE_READY: Final = 0
VIRTIO_CONSOLE_DEVICE_ADD: Final = 1
VIRTIO_CONSOLE_DEVICE_REMOVE: Final = 2
VIRTIO_CONSOLE_PORT_READY: Final = 3
VIRTIO_CONSOLE_CONSOLE_PORT: Final = 4
VIRTIO_CONSOLE_RESIZE: Final = 5
VIRTIO_CONSOLE_PORT_OPEN: Final = 6
VIRTIO_CONSOLE_PORT_NAME: Final = 7
#: The RESIZE event's payload after the control header: ``le16 rows; le16 cols`` (rows first,
#: unlike the config space; VIRTIO 1.2 §5.3.6.2 and Linux's ``struct { rows; cols; } size``).
RESIZE: Final = struct.Struct("<HH")
