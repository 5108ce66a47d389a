"""Generate the C inmate's shared-layout header from the Python wire definitions.

``python -m ivshmem_virtio.spec.cgen > rtos_inmate/include/shared_layout.h``

The Python modules of :mod:`ivshmem_virtio.spec` are the one source of truth for every layout two
cells share (STYLE.md point 6): the split ring, the ivshmem register page, the virtio-over-ivshmem
header and the virtio-can frames. This module turns them into ``#define`` constants and C structs
(with ``_Static_assert`` on every offset), so the C code cannot drift from the Python code without
``tests/inmate/test_layout_gen.py`` failing. Every name is read with ``getattr``: a renamed Python
constant breaks the generator loudly instead of silently dropping a line.

Everything is emitted with an ``IVV_`` prefix so the header can sit next to Linux's own
``linux/virtio_*.h`` in one translation unit (the layout test compiles both).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from types import ModuleType

from . import can, console, ivshmem, ring, virtio

# (module, python name, C name, how to print); "hex" or "dec"
_CONSTANTS: list[tuple[str, ModuleType, list[tuple[str, str, str]]]] = [
    ("Split virtqueue (virtio 1.x 2.7, spec/ring.py)", ring, [
        ("DESC_SIZE", "IVV_RING_DESC_SIZE", "dec"),
        ("DESC_F_NEXT", "IVV_RING_DESC_F_NEXT", "hex"),
        ("DESC_F_WRITE", "IVV_RING_DESC_F_WRITE", "hex"),
        ("DESC_F_INDIRECT", "IVV_RING_DESC_F_INDIRECT", "hex"),
        ("AVAIL_FLAGS", "IVV_RING_AVAIL_FLAGS", "dec"),
        ("AVAIL_IDX", "IVV_RING_AVAIL_IDX", "dec"),
        ("AVAIL_RING", "IVV_RING_AVAIL_RING", "dec"),
        ("AVAIL_F_NO_INTERRUPT", "IVV_RING_AVAIL_F_NO_INTERRUPT", "hex"),
        ("USED_FLAGS", "IVV_RING_USED_FLAGS", "dec"),
        ("USED_IDX", "IVV_RING_USED_IDX", "dec"),
        ("USED_RING", "IVV_RING_USED_RING", "dec"),
        ("USED_ELEM_SIZE", "IVV_RING_USED_ELEM_SIZE", "dec"),
        ("USED_F_NO_NOTIFY", "IVV_RING_USED_F_NO_NOTIFY", "hex"),
        ("MAX_QUEUE_SIZE", "IVV_RING_MAX_QUEUE_SIZE", "dec"),
        ("DESC_ALIGN", "IVV_RING_DESC_ALIGN", "dec"),
        ("AVAIL_ALIGN", "IVV_RING_AVAIL_ALIGN", "dec"),
        ("USED_ALIGN", "IVV_RING_USED_ALIGN", "dec"),
    ]),
    ("ivshmem 2.0 device and virtio-over-ivshmem header (virtio-ivshmem.md 1-3, spec/ivshmem.py)",
     ivshmem, [
         ("PCI_VENDOR", "IVV_PCI_VENDOR", "hex"),
         ("PCI_DEVICE", "IVV_PCI_DEVICE", "hex"),
         ("PCI_CLASS_BASE", "IVV_PCI_CLASS_BASE", "hex"),
         ("VENDOR_CAP_ID", "IVV_VENDOR_CAP_ID", "hex"),
         ("CAP_PRIV_CONTROL", "IVV_CAP_PRIV_CONTROL", "hex"),
         ("CAP_STATE_TABLE_SIZE", "IVV_CAP_STATE_TABLE_SIZE", "hex"),
         ("CAP_RW_SIZE", "IVV_CAP_RW_SIZE", "hex"),
         ("CAP_OUTPUT_SIZE", "IVV_CAP_OUTPUT_SIZE", "hex"),
         ("CAP_BASE_ADDR", "IVV_CAP_BASE_ADDR", "hex"),
         ("REG_ID", "IVV_REG_ID", "hex"),
         ("REG_MAX_PEERS", "IVV_REG_MAX_PEERS", "hex"),
         ("REG_INT_CONTROL", "IVV_REG_INT_CONTROL", "hex"),
         ("REG_DOORBELL", "IVV_REG_DOORBELL", "hex"),
         ("REG_STATE", "IVV_REG_STATE", "hex"),
         ("REGS_SIZE", "IVV_REGS_SIZE", "hex"),
         ("PROTO_UNDEFINED", "IVV_PROTO_UNDEFINED", "hex"),
         ("PROTO_NET", "IVV_PROTO_NET", "hex"),
         ("PROTO_VIRTIO_FRONT", "IVV_PROTO_VIRTIO_FRONT", "hex"),
         ("PROTO_VIRTIO_BACK", "IVV_PROTO_VIRTIO_BACK", "hex"),
         ("STATE_RESET", "IVV_STATE_RESET", "dec"),
         ("STATE_READY", "IVV_STATE_READY", "dec"),
         *[(n, "IVV_" + n, "hex") for n in sorted(
             (n for n in vars(ivshmem) if n.startswith("HDR_")),
             key=lambda n: (getattr(ivshmem, n), n))],
         ("REVISION", "IVV_REVISION", "dec"),
         ("SMP_CACHE_BYTES", "IVV_SMP_CACHE_BYTES", "dec"),
         ("PAGE_SIZE", "IVV_PAGE_SIZE", "dec"),
         ("VRING_ALIGN", "IVV_VRING_ALIGN", "dec"),
     ]),
    ("virtio 1.x status bits, feature bit numbers, device ids (spec/virtio.py)", virtio, [
        ("STATUS_ACKNOWLEDGE", "IVV_STATUS_ACKNOWLEDGE", "hex"),
        ("STATUS_DRIVER", "IVV_STATUS_DRIVER", "hex"),
        ("STATUS_DRIVER_OK", "IVV_STATUS_DRIVER_OK", "hex"),
        ("STATUS_FEATURES_OK", "IVV_STATUS_FEATURES_OK", "hex"),
        ("STATUS_NEEDS_RESET", "IVV_STATUS_NEEDS_RESET", "hex"),
        ("STATUS_FAILED", "IVV_STATUS_FAILED", "hex"),
        ("STATUS_LIVE", "IVV_STATUS_LIVE", "hex"),
        ("F_INDIRECT_DESC", "IVV_F_INDIRECT_DESC", "dec"),
        ("F_EVENT_IDX", "IVV_F_EVENT_IDX", "dec"),
        ("F_VERSION_1", "IVV_F_VERSION_1", "dec"),
        ("F_ACCESS_PLATFORM", "IVV_F_ACCESS_PLATFORM", "dec"),
        ("F_RING_PACKED", "IVV_F_RING_PACKED", "dec"),
        ("F_IN_ORDER", "IVV_F_IN_ORDER", "dec"),
        ("F_ORDER_PLATFORM", "IVV_F_ORDER_PLATFORM", "dec"),
        ("ID_NET", "IVV_ID_NET", "dec"),
        ("ID_BLOCK", "IVV_ID_BLOCK", "dec"),
        ("ID_CONSOLE", "IVV_ID_CONSOLE", "dec"),
        ("ID_CAN", "IVV_ID_CAN", "dec"),
    ]),
    ("virtio-can (OASIS virtio 1.4, can.md 1, spec/can.py)", can, [
        ("VIRTIO_ID_CAN", "IVV_CAN_DEVICE_ID", "dec"),
        ("IVSHMEM_PROTOCOL_CAN_BACKEND", "IVV_CAN_PROTOCOL_BACKEND", "hex"),
        ("IVSHMEM_PROTOCOL_CAN_FRONTEND", "IVV_CAN_PROTOCOL_FRONTEND", "hex"),
        ("TXQ", "IVV_CAN_TXQ", "dec"),
        ("RXQ", "IVV_CAN_RXQ", "dec"),
        ("CONTROLQ", "IVV_CAN_CONTROLQ", "dec"),
        ("NUM_QUEUES", "IVV_CAN_NUM_QUEUES", "dec"),
        ("VIRTIO_CAN_F_CAN_CLASSIC", "IVV_CAN_F_CAN_CLASSIC", "dec"),
        ("VIRTIO_CAN_F_CAN_FD", "IVV_CAN_F_CAN_FD", "dec"),
        ("VIRTIO_CAN_F_RTR_FRAMES", "IVV_CAN_F_RTR_FRAMES", "dec"),
        ("VIRTIO_CAN_F_LATE_TX_ACK", "IVV_CAN_F_LATE_TX_ACK", "dec"),
        ("VIRTIO_CAN_F_IVV_BUSOFF_REPORT", "IVV_CAN_F_IVV_BUSOFF_REPORT", "dec"),
        ("DEVICE_FEATURE_MASK", "IVV_CAN_DEVICE_FEATURE_MASK", "hex"),
        ("VIRTIO_CAN_TX", "IVV_CAN_MSG_TX", "hex"),
        ("VIRTIO_CAN_RX", "IVV_CAN_MSG_RX", "hex"),
        ("VIRTIO_CAN_SET_CTRL_MODE_START", "IVV_CAN_SET_CTRL_MODE_START", "hex"),
        ("VIRTIO_CAN_SET_CTRL_MODE_STOP", "IVV_CAN_SET_CTRL_MODE_STOP", "hex"),
        ("VIRTIO_CAN_IVV_BUSOFF_REPORT", "IVV_CAN_IVV_BUSOFF_REPORT", "hex"),
        ("VIRTIO_CAN_F_IVV_ERROR_STATE", "IVV_CAN_F_IVV_ERROR_STATE", "dec"),
        ("VIRTIO_CAN_IVV_ERROR_REPORT", "IVV_CAN_IVV_ERROR_REPORT", "hex"),
        ("VIRTIO_CAN_FLAGS_IVV_ERROR", "IVV_CAN_FLAGS_IVV_ERROR", "hex"),
        ("VIRTIO_CAN_S_IVV_ERROR_WARNING", "IVV_CAN_S_IVV_ERROR_WARNING", "hex"),
        ("VIRTIO_CAN_S_IVV_ERROR_PASSIVE", "IVV_CAN_S_IVV_ERROR_PASSIVE", "hex"),
        ("ERROR_REPORT_SIZE", "IVV_CAN_ERROR_REPORT_SIZE", "dec"),
        ("CAN_STATE_ERROR_ACTIVE", "IVV_CAN_STATE_ERROR_ACTIVE", "dec"),
        ("CAN_STATE_ERROR_WARNING", "IVV_CAN_STATE_ERROR_WARNING", "dec"),
        ("CAN_STATE_ERROR_PASSIVE", "IVV_CAN_STATE_ERROR_PASSIVE", "dec"),
        ("CAN_ERR_CRTL_RX_OVERFLOW", "IVV_CAN_ERR_CRTL_RX_OVERFLOW", "hex"),
        ("CAN_ERR_CRTL_RX_WARNING", "IVV_CAN_ERR_CRTL_RX_WARNING", "hex"),
        ("CAN_ERR_CRTL_TX_WARNING", "IVV_CAN_ERR_CRTL_TX_WARNING", "hex"),
        ("CAN_ERR_CRTL_RX_PASSIVE", "IVV_CAN_ERR_CRTL_RX_PASSIVE", "hex"),
        ("CAN_ERR_CRTL_TX_PASSIVE", "IVV_CAN_ERR_CRTL_TX_PASSIVE", "hex"),
        ("CAN_ERR_CRTL_ACTIVE", "IVV_CAN_ERR_CRTL_ACTIVE", "hex"),
        ("VIRTIO_CAN_FLAGS_EXTENDED", "IVV_CAN_FLAGS_EXTENDED", "hex"),
        ("VIRTIO_CAN_FLAGS_FD", "IVV_CAN_FLAGS_FD", "hex"),
        ("VIRTIO_CAN_FLAGS_RTR", "IVV_CAN_FLAGS_RTR", "hex"),
        ("VIRTIO_CAN_FLAGS_KNOWN", "IVV_CAN_FLAGS_KNOWN", "hex"),
        ("VIRTIO_CAN_RESULT_OK", "IVV_CAN_RESULT_OK", "dec"),
        ("VIRTIO_CAN_RESULT_NOT_OK", "IVV_CAN_RESULT_NOT_OK", "dec"),
        ("RESULT_SIZE", "IVV_CAN_RESULT_SIZE", "dec"),
        ("VIRTIO_CAN_S_CTRL_BUSOFF", "IVV_CAN_S_CTRL_BUSOFF", "hex"),
        ("CONFIG_SIZE", "IVV_CAN_CONFIG_SIZE", "dec"),
        ("FRAME_HEADER_SIZE", "IVV_CAN_FRAME_HEADER_SIZE", "dec"),
        ("CAN_SFF_MASK", "IVV_CAN_SFF_MASK", "hex"),
        ("CAN_EFF_MASK", "IVV_CAN_EFF_MASK", "hex"),
        ("CAN_CLASSIC_MAX_LEN", "IVV_CAN_CLASSIC_MAX_LEN", "dec"),
        ("CAN_FD_MAX_LEN", "IVV_CAN_FD_MAX_LEN", "dec"),
        ("RX_BUFFER_SIZE_CLASSIC", "IVV_CAN_RX_BUFFER_SIZE_CLASSIC", "dec"),
        ("RX_BUFFER_SIZE_FD", "IVV_CAN_RX_BUFFER_SIZE_FD", "dec"),
    ]),
    ("virtio-console port 0 (VIRTIO 1.2 5.3, spec/console.py)", console, [
        ("VIRTIO_ID_CONSOLE", "IVV_CONSOLE_DEVICE_ID", "dec"),
        ("IVSHMEM_PROTOCOL_CONSOLE_BACKEND", "IVV_CONSOLE_PROTOCOL_BACKEND", "hex"),
        ("IVSHMEM_PROTOCOL_CONSOLE_FRONTEND", "IVV_CONSOLE_PROTOCOL_FRONTEND", "hex"),
        ("RECEIVEQ", "IVV_CONSOLE_RECEIVEQ", "dec"),
        ("TRANSMITQ", "IVV_CONSOLE_TRANSMITQ", "dec"),
        ("NUM_QUEUES_PORT0", "IVV_CONSOLE_NUM_QUEUES_PORT0", "dec"),
        ("VIRTIO_CONSOLE_F_SIZE", "IVV_CONSOLE_F_SIZE", "dec"),
        ("VIRTIO_CONSOLE_F_MULTIPORT", "IVV_CONSOLE_F_MULTIPORT", "dec"),
        ("VIRTIO_CONSOLE_F_EMERG_WRITE", "IVV_CONSOLE_F_EMERG_WRITE", "dec"),
        ("CONFIG_SIZE", "IVV_CONSOLE_CONFIG_SIZE", "dec"),
        ("OFF_COLS", "IVV_CONSOLE_OFF_COLS", "dec"),
        ("OFF_ROWS", "IVV_CONSOLE_OFF_ROWS", "dec"),
        ("OFF_MAX_NR_PORTS", "IVV_CONSOLE_OFF_MAX_NR_PORTS", "dec"),
        ("OFF_EMERG_WR", "IVV_CONSOLE_OFF_EMERG_WR", "dec"),
    ]),
]

_CTYPES = {"Q": ("uint64_t", 8), "I": ("uint32_t", 4), "H": ("uint16_t", 2),
           "B": ("uint8_t", 1)}


@dataclass(frozen=True)
class Field:
    name: str
    ctype: str
    offset: int
    size: int
    count: int = 1  # array length; 0 = flexible array member (last field only)
    gap: bool = False  # reserved bytes the generator inserted between named fields

    @property
    def decl(self) -> str:
        if self.count == 1:
            return f"{self.ctype} {self.name};"
        return f"{self.ctype} {self.name}[{self.count or ''}];"


@dataclass(frozen=True)
class StructDef:
    name: str
    doc: str
    fields: tuple[Field, ...]
    size: int | None  # sizeof() the C struct must have; None when it ends in a flexible array


def _from_struct(fmt: struct.Struct, names: list[str]) -> list[Field]:
    """Fields of a packed little-endian ``struct.Struct`` (natural C alignment must agree)."""
    codes = fmt.format.lstrip("<")
    if len(codes) != len(names) or fmt.format[0] != "<":
        raise ValueError(f"{fmt.format!r} does not match the names {names}")
    fields, off = [], 0
    for code, name in zip(codes, names, strict=True):
        ctype, size = _CTYPES[code]
        if off % size:
            raise ValueError(f"{name} at {off} is not naturally aligned: the C struct would differ")
        fields.append(Field(name, ctype, off, size))
        off += size
    if off != fmt.size:
        raise ValueError(f"{fmt.format!r}: fields cover {off} of {fmt.size} bytes")
    return fields


def _header_fields() -> list[Field]:
    """The virtio-ivshmem header from HEADER_FIELDS, gaps as reserved bytes, then config[]."""
    sizes = {1: "uint8_t", 2: "uint16_t", 4: "uint32_t", 8: "uint64_t"}
    fields, off = [], 0
    for offset, (name, size) in sorted(ivshmem.HEADER_FIELDS.items()):
        if offset < off:
            raise ValueError(f"header field {name} overlaps its predecessor")
        if offset > off:
            fields.append(Field(f"reserved_{off:02x}", "uint8_t", off, 1, offset - off, True))
        if offset % size:
            raise ValueError(f"header field {name} at {offset:#x} is not naturally aligned")
        fields.append(Field(name, sizes[size], offset, size))
        off = offset + size
    if off > ivshmem.HDR_CONFIG:
        raise ValueError("header fields run into the device config")
    if off < ivshmem.HDR_CONFIG:
        fields.append(Field(f"reserved_{off:02x}", "uint8_t", off, 1, ivshmem.HDR_CONFIG - off,
                            True))
    fields.append(Field("config", "uint8_t", ivshmem.HDR_CONFIG, 1, 0))
    return fields


def structs() -> list[StructDef]:
    desc = _from_struct(ring.DESC, ["addr", "len", "flags", "next"])
    used_elem = _from_struct(ring.USED_ELEM, ["id", "len"])
    can_hdr = _from_struct(can.FRAME_HEADER, ["msg_type", "length", "reserved_classic_dlc",
                                              "padding", "reserved_xl_priority", "flags",
                                              "can_id"])
    can_cfg = _from_struct(can.CONFIG, ["status"])
    can_ctl = _from_struct(can.CONTROL_REQUEST, ["msg_type"])
    can_err = _from_struct(can.ERROR_REPORT, ["msg_type", "state", "crtl", "txerr", "rxerr",
                                              "rx_overflows"])
    regs = [Field(name, "uint32_t", off, 4) for name, off in (
        ("id", ivshmem.REG_ID), ("max_peers", ivshmem.REG_MAX_PEERS),
        ("int_control", ivshmem.REG_INT_CONTROL), ("doorbell", ivshmem.REG_DOORBELL),
        ("state", ivshmem.REG_STATE))]
    return [
        StructDef("ivv_vring_desc", "one descriptor of the split ring", tuple(desc),
                  ring.DESC_SIZE),
        StructDef("ivv_vring_avail", "driver area: flags, idx, ring[N] (then used_event)", (
            Field("flags", "uint16_t", ring.AVAIL_FLAGS, 2),
            Field("idx", "uint16_t", ring.AVAIL_IDX, 2),
            Field("ring", "uint16_t", ring.AVAIL_RING, 2, 0)), None),
        StructDef("ivv_vring_used_elem", "one used-ring entry", tuple(used_elem),
                  ring.USED_ELEM_SIZE),
        StructDef("ivv_vring_used", "device area: flags, idx, ring[N] (then avail_event)", (
            Field("flags", "uint16_t", ring.USED_FLAGS, 2),
            Field("idx", "uint16_t", ring.USED_IDX, 2),
            Field("ring", "struct ivv_vring_used_elem", ring.USED_RING, ring.USED_ELEM_SIZE, 0)),
            None),
        StructDef("ivv_ivshmem_regs", "ivshmem 2.0 register page (BAR0), 32-bit accesses only",
                  tuple(regs), 4 * len(regs)),
        StructDef("ivv_virtio_ivshmem_header", "virtio-over-ivshmem header at R/W offset 0",
                  tuple(_header_fields()), None),
        StructDef("ivv_virtio_can_frame", "virtio-can TX/RX frame: 16-byte header + sdu[length]",
                  (*can_hdr, Field("sdu", "uint8_t", can.FRAME_HEADER_SIZE, 1, 0)), None),
        StructDef("ivv_virtio_can_config", "virtio-can device config", tuple(can_cfg),
                  can.CONFIG_SIZE),
        StructDef("ivv_virtio_can_control", "virtio-can control request (a u8 result follows "
                  "in its own writable buffer)", tuple(can_ctl), can.CONTROL_REQUEST.size),
        StructDef("ivv_virtio_can_error_report", "virtio-can error report (project extension, "
                  "F_IVV_ERROR_STATE; a u8 result follows in its own writable buffer)",
                  tuple(can_err), can.ERROR_REPORT_SIZE),
    ]


def _value(v: int, how: str) -> str:
    if how == "hex":
        return f"0x{v:X}u"
    return f"{v}u"


def render() -> str:
    out = [
        "/* SPDX-License-Identifier: MIT */",
        "/*",
        " * shared_layout.h - GENERATED by `python -m ivshmem_virtio.spec.cgen`; do not edit.",
        " *",
        " * Every layout two cells share, from the Python definitions in",
        " * ivshmem_virtio/spec/ (the one source of truth).  tests/inmate/test_layout_gen.py",
        " * checks that this file equals the generator's output and compiles a program",
        " * comparing offsetof/sizeof with the Python numbers.  All values little endian.",
        " */",
        "#ifndef RTOS_INMATE_SHARED_LAYOUT_H",
        "#define RTOS_INMATE_SHARED_LAYOUT_H",
        "",
        "#include <stddef.h>",
        "#include <stdint.h>",
        "",
        "_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,",
        '\t       "the shared layouts are little endian; this build is not");',
    ]
    for title, module, items in _CONSTANTS:
        out += ["", f"/* {title} */"]
        width = max(len(c) for _, c, _ in items) + 1
        for py, cname, how in items:
            value = getattr(module, py)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{module.__name__}.{py} is not a non-negative int")
            out.append(f"#define {cname.ljust(width)}{_value(int(value), how)}")
    for s in structs():
        out += ["", f"/* {s.doc} */", f"struct {s.name} {{"]
        out += [f"\t{f.decl}" for f in s.fields]
        out.append("};")
        for f in s.fields:
            if f.gap:
                continue
            out.append(f"_Static_assert(offsetof(struct {s.name}, {f.name}) == {f.offset}, "
                       f'"{s.name}.{f.name}");')
        if s.size is not None:
            out.append(f'_Static_assert(sizeof(struct {s.name}) == {s.size}, "{s.name} size");')
    out += ["", "#endif /* RTOS_INMATE_SHARED_LAYOUT_H */", ""]
    return "\n".join(out)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
