"""A real ivshmem 2.0 device through Linux ``uio_ivshmem`` (virtio-ivshmem.md §2).

Maps, in order, each at ``k * PAGE_SIZE`` of /dev/uioN: registers, the state table (read-only),
the R/W section (when it has a size), then the input and output sections. Interrupts: a blocking
4-byte ``read()`` returns the event count; the driver runs one-shot mode, so INT_CONTROL is
re-armed after every read. Devices are found with pyudev by PCI IDs and protocol (the class code).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from ..errors import LinkError
from ..shm import Region, Registers, map_fd
from ..spec import ivshmem as H
from .base import IvshmemDevice

SYSFS_UIO = Path("/sys/class/uio")


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 0)


def uio_maps(sysfs_dir: Path) -> dict[str, tuple[int, int]]:
    """``name -> (index, size)`` of every map a uio device exposes."""
    maps = {}
    base = sysfs_dir / "maps"
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        idx = int(entry.name.removeprefix("map"))
        name_file = entry / "name"
        name = name_file.read_text().strip() if name_file.exists() else entry.name
        maps[name] = (idx, _read_hex(entry / "size"))
    return maps


def pci_protocol(sysfs_dir: Path) -> int | None:
    """The ivshmem protocol of a uio device's PCI function, or None if it is not ivshmem."""
    dev = sysfs_dir / "device"
    try:
        vendor = _read_hex(dev / "vendor")
        device = _read_hex(dev / "device")
        klass = _read_hex(dev / "class")
    except (OSError, ValueError):
        return None
    if vendor != H.PCI_VENDOR or device != H.PCI_DEVICE or klass >> 16 != H.PCI_CLASS_BASE:
        return None
    return klass & 0xFFFF


def list_ivshmem_uio() -> list[tuple[str, str, int]]:
    """``(/dev/uioN, pci address, protocol)`` of every uio_ivshmem device (pyudev)."""
    import pyudev

    out = []
    ctx = pyudev.Context()
    for d in ctx.list_devices(subsystem="uio"):
        sysdir = Path(d.sys_path)
        name = (sysdir / "name").read_text().strip() if (sysdir / "name").exists() else ""
        proto = pci_protocol(sysdir)
        if proto is None and not name.startswith("uio_ivshmem"):
            continue
        parent = d.find_parent("pci")
        addr = parent.sys_name if parent is not None else name
        out.append((d.device_node or f"/dev/{d.sys_name}", addr, proto if proto is not None
                    else -1))
    return sorted(out)


def find_uio(protocol: int | None) -> str:
    """The single uio_ivshmem device carrying ``protocol`` (``uio:auto``)."""
    found = [dev for dev, _addr, proto in list_ivshmem_uio()
             if protocol is None or proto == protocol]
    if not found:
        want = f" with protocol {protocol:#06x}" if protocol is not None else ""
        raise LinkError(f"no uio_ivshmem device{want}; is the ivshmem device bound to "
                        "uio_ivshmem (see `ivshmem-virtio bind`)?")
    if len(found) > 1:
        raise LinkError(f"several uio_ivshmem devices match: {', '.join(found)}; name one")
    return found[0]


class UioIvshmem(IvshmemDevice):
    """A Jailhouse ivshmem device bound to uio_ivshmem."""

    def __init__(self, devnode: str, sysfs_dir: str | Path | None = None) -> None:
        self.name = f"uio:{devnode}"
        sysdir = Path(sysfs_dir) if sysfs_dir else SYSFS_UIO / Path(devnode).name
        try:
            maps = uio_maps(sysdir)
            self.fd = os.open(devnode, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise LinkError(f"{devnode}: {e.strerror}") from e
        page = mmap.PAGESIZE
        try:
            ridx, rsize = maps.get("registers", (0, H.REGS_SIZE))
            self._regs_mm = map_fd(self.fd, max(rsize, page), ridx * page)
            self.regs = Registers.from_buffer(self._regs_mm)
            sidx, ssize = maps.get("state_table", (1, page))
            self._state_mm = map_fd(self.fd, ssize, sidx * page, writable=False)
            self.state_table = Region(self._state_mm, 0, ssize, "state table")
            if "rw_section" not in maps:
                raise LinkError(f"{devnode}: the link has no R/W section; virtio needs one")
            widx, wsize = maps["rw_section"]
            self._rw_mm = map_fd(self.fd, wsize, widx * page)
            self.rw = Region(self._rw_mm, 0, wsize, "R/W section")
        except OSError as e:
            os.close(self.fd)
            raise LinkError(f"{devnode}: cannot map: {e.strerror}") from e
        self.id = self.regs.read32(H.REG_ID)
        self.max_peers = self.regs.read32(H.REG_MAX_PEERS)
        # MSI-X vectors show up as entries of msi_irqs; without them the link is INTx: 1 vector
        msi = sysdir / "device" / "msi_irqs"
        self.vectors = max(1, len(list(msi.iterdir()))) if msi.is_dir() else 1
        proto = pci_protocol(sysdir)
        self.protocol = proto if proto is not None else 0

    def set_state(self, value: int) -> None:
        self.regs.write32(H.REG_STATE, value)

    def doorbell(self, peer: int, vector: int) -> None:
        self.regs.write32(H.REG_DOORBELL, H.doorbell_value(peer, vector))

    def native_doorbell(self, peer: int, vector: int) -> tuple[int, object | None, int, int]:
        """The DOORBELL register in the mapped register page (an MMIO store, as here)."""
        return -1, self._regs_mm, H.REG_DOORBELL, H.doorbell_value(peer, vector)

    def set_int_control(self, enabled: bool) -> None:
        self.regs.write32(H.REG_INT_CONTROL, 1 if enabled else 0)

    def interrupt_fds(self) -> list[int]:
        return [self.fd]

    def ack_interrupts(self) -> int:
        try:
            data = os.read(self.fd, 4)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return 0
            raise
        # one-shot mode: the hypervisor cleared INT_CONTROL on delivery; re-arm right away
        self.regs.write32(H.REG_INT_CONTROL, 1)
        return 1 if len(data) == 4 else 0

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)  # the driver writes STATE = 0 on release
            self.fd = -1
            self.fd_epoch += 1
