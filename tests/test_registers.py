"""Register access is one aligned 32-bit load or store, on the uio path too."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from ivshmem_virtio.errors import MemoryAccessError
from ivshmem_virtio.ivshmem.uio import UioIvshmem, pci_protocol
from ivshmem_virtio.shm import Registers
from ivshmem_virtio.spec import ivshmem as H


class Recorder:
    """A word store that records every access (index, kind, item width)."""

    def __init__(self, words: int) -> None:
        self.mem = memoryview(bytearray(4 * words)).cast("I")
        self.log: list[tuple[str, int, int]] = []

    def __getitem__(self, i: int) -> int:
        assert isinstance(i, int), "slices are not single loads"
        self.log.append(("load", i, self.mem.itemsize))
        return self.mem[i]

    def __setitem__(self, i: int, v: int) -> None:
        assert isinstance(i, int), "slices are not single stores"
        self.log.append(("store", i, self.mem.itemsize))
        self.mem[i] = v


def fake_uio(tmp_path: Path, rw: int = 0x4000) -> tuple[str, Path]:
    """A sysfs directory and a 'device node' file laid out like uio_ivshmem's maps."""
    page = mmap.PAGESIZE
    sysdir = tmp_path / "uio7"
    for idx, (name, size) in enumerate([("registers", 0x1000), ("state_table", 0x1000),
                                        ("rw_section", rw)]):
        m = sysdir / "maps" / f"map{idx}"
        m.mkdir(parents=True)
        (m / "name").write_text(name + "\n")
        (m / "size").write_text(hex(size) + "\n")
    dev = sysdir / "device"
    dev.mkdir()
    (dev / "vendor").write_text("0x110a\n")
    (dev / "device").write_text("0x4106\n")
    (dev / "class").write_text("0xffc002\n")
    node = tmp_path / "uio7.node"
    with open(node, "wb") as f:
        f.truncate(2 * page + rw)
    with open(node, "r+b") as f:
        regs = mmap.mmap(f.fileno(), page)
        regs[0:4] = (0).to_bytes(4, "little")  # ID 0
        regs[4:8] = (2).to_bytes(4, "little")  # MAX_PEERS 2
        regs.close()
    return str(node), sysdir


def test_uio_device_uses_single_aligned_words(tmp_path):
    node, sysdir = fake_uio(tmp_path)
    dev = UioIvshmem(node, sysdir)
    assert (dev.id, dev.max_peers, dev.protocol, dev.vectors) == (0, 2, 0xC002, 1)
    assert dev.rw.size == 0x4000
    rec = Recorder(1024)
    dev.regs = Registers(rec, 4096)
    dev.set_int_control(True)
    dev.set_state(1)
    dev.doorbell(1, 0)
    dev.set_int_control(False)
    assert rec.log == [("store", H.REG_INT_CONTROL // 4, 4), ("store", H.REG_STATE // 4, 4),
                       ("store", H.REG_DOORBELL // 4, 4), ("store", H.REG_INT_CONTROL // 4, 4)]
    assert rec.mem[H.REG_DOORBELL // 4] == 0x10000
    dev.close()


def test_uio_native_doorbell_is_the_mapped_doorbell_register(tmp_path):
    """Compiled code rings a real link by storing the DOORBELL value into the mapped register
    page (``native_doorbell``): the page, offset and value ``doorbell`` itself stores."""
    node, sysdir = fake_uio(tmp_path)
    dev = UioIvshmem(node, sysdir)
    try:
        fd, page, off, value = dev.native_doorbell(1, 1)
        assert (fd, off, value) == (-1, H.REG_DOORBELL, 0x10001)
        assert page is not None
        dev.doorbell(1, 0)
        assert int.from_bytes(memoryview(page)[off:off + 4], "little") == 0x10000  # type: ignore[arg-type]
    finally:
        dev.close()


def test_register_word_store_touches_exactly_four_bytes(tmp_path):
    buf = mmap.mmap(-1, 4096)
    buf.write(b"\xaa" * 4096)
    regs = Registers.from_buffer(buf)
    regs.write32(0x0C, 0x00010002)
    assert buf[0x0C:0x10] == bytes([2, 0, 1, 0])
    assert buf[0x08:0x0C] == b"\xaa" * 4 and buf[0x10:0x14] == b"\xaa" * 4
    assert regs.read32(0x0C) == 0x00010002
    for bad in (0x0D, 0x0E, 4096, -4):
        with pytest.raises(MemoryAccessError):
            regs.write32(bad, 0)
        with pytest.raises(MemoryAccessError):
            regs.read32(bad)


def test_pci_protocol_from_class(tmp_path):
    _node, sysdir = fake_uio(tmp_path)
    assert pci_protocol(sysdir) == 0xC002
    (sysdir / "device" / "vendor").write_text("0x8086\n")
    assert pci_protocol(sysdir) is None
