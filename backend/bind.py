"""``ivshmem-virtio bind``: make ``uio_ivshmem`` claim the virtio backend protocols, and list links.

uio_ivshmem's own ID table matches only protocol 0 (class 0xFF0000), so the root cell's virtio
backend devices (class 0xFFC0NN) stay unbound until a dynamic ID is added (virtio-ivshmem.md §2):
``echo "110a 4106 110a 4106 ffc002 ffffff" > /sys/bus/pci/drivers/uio_ivshmem/new_id``. The
kernel then probes every matching unbound function at once.

Everything takes the sysfs root as a parameter, so tests run against a fake tree.
"""

from __future__ import annotations

import argparse
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ivshmem_virtio.errors import IvshmemVirtioError
from ivshmem_virtio.spec import ivshmem as H

DRIVER = "uio_ivshmem"
#: The backend protocols this project serves: 0xC000 + virtio device ID.
BACKEND_PROTOCOLS = {0xC002: "virtio-blk backend", 0xC003: "virtio-console backend",
                     0xC024: "virtio-can backend"}


class BindError(IvshmemVirtioError):
    """The driver is missing, or sysfs refused us: the operator must act (exit status 1)."""


def new_id_line(protocol: int) -> str:
    """The ``new_id`` fields: vendor device subvendor subdevice class class_mask."""
    return (f"{H.PCI_VENDOR:04x} {H.PCI_DEVICE:04x} {H.PCI_VENDOR:04x} {H.PCI_DEVICE:04x} "
            f"{H.PCI_CLASS_BASE:02x}{protocol:04x} ffffff")


def describe(protocol: int) -> str:
    if protocol in BACKEND_PROTOCOLS:
        return BACKEND_PROTOCOLS[protocol]
    if H.is_virtio_backend(protocol):
        return f"virtio backend, device {H.virtio_device_id(protocol)}"
    if H.is_virtio_frontend(protocol):
        return f"virtio frontend, device {H.virtio_device_id(protocol)}"
    return {H.PROTO_UNDEFINED: "undefined (ivshmem demo)", H.PROTO_NET: "ivshmem-net"}.get(
        protocol, "custom")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _hex(path: Path) -> int | None:
    try:
        return int(_read(path), 16)
    except ValueError:
        return None


@dataclass(frozen=True)
class IvshmemFunction:
    """One ivshmem 2.0 PCI function and what serves it."""

    pci: str
    protocol: int
    driver: str  # "" when unbound
    uio: str  # "/dev/uioN" when uio_ivshmem serves it, else ""
    vectors: int  # MSI-X vectors in use, 0 for INTx (or not enabled yet)
    rw_size: int  # size of the uio rw_section map, 0 if unknown


def _uio_nodes(root: Path) -> dict[str, tuple[str, int]]:
    """PCI address -> (/dev/uioN, R/W section size) for every uio device with a PCI parent."""
    out: dict[str, tuple[str, int]] = {}
    base = root / "class" / "uio"
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        dev = entry / "device"
        try:
            pci = os.path.basename(os.path.realpath(dev))
        except OSError:
            continue
        rw = 0
        maps = entry / "maps"
        for m in sorted(maps.iterdir()) if maps.is_dir() else []:
            if _read(m / "name") == "rw_section":
                try:
                    rw = int(_read(m / "size"), 0)
                except ValueError:
                    rw = 0
        out[pci] = (f"/dev/{entry.name}", rw)
    return out


def list_functions(sysfs: str | Path = "/sys") -> list[IvshmemFunction]:
    """Every ivshmem 2.0 PCI function in ``sysfs``, with its driver and uio node (if any)."""
    root = Path(sysfs)
    devices = root / "bus" / "pci" / "devices"
    uio = _uio_nodes(root)
    found = []
    for entry in sorted(devices.iterdir()) if devices.is_dir() else []:
        if _hex(entry / "vendor") != H.PCI_VENDOR or _hex(entry / "device") != H.PCI_DEVICE:
            continue
        klass = _hex(entry / "class")
        if klass is None or klass >> 16 != H.PCI_CLASS_BASE:
            continue
        drv = entry / "driver"
        driver = os.path.basename(os.path.realpath(drv)) if drv.exists() else ""
        msi = entry / "msi_irqs"
        vectors = len(list(msi.iterdir())) if msi.is_dir() else 0
        node, rw = uio.get(entry.name, ("", 0))
        found.append(IvshmemFunction(entry.name, klass & 0xFFFF, driver, node, vectors, rw))
    return found


def driver_dir(sysfs: str | Path) -> Path:
    path = Path(sysfs) / "bus" / "pci" / "drivers" / DRIVER
    if not path.is_dir():
        raise BindError(f"{path} does not exist: the {DRIVER} module is not loaded "
                        f"(run `modprobe {DRIVER}`; it comes with Jailhouse's kernel patches)")
    return path


def _write_attr(path: Path, text: str) -> None:
    """One write(2) of ``text`` to a sysfs attribute (a test replaces this to inject errors)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def bind(protocols: list[int], sysfs: str | Path = "/sys") -> list[str]:
    """Add the dynamic IDs for ``protocols``; idempotent. Returns one report line per protocol."""
    drv = driver_dir(sysfs)
    served = {f.protocol for f in list_functions(sysfs) if f.driver == DRIVER}
    report = []
    for proto in protocols:
        if proto in served:
            report.append(f"{proto:#06x} ({describe(proto)}): already served by {DRIVER}")
            continue
        line = new_id_line(proto)
        try:
            _write_attr(drv / "new_id", line + "\n")
        except FileExistsError:
            report.append(f"{proto:#06x} ({describe(proto)}): ID already known to {DRIVER}")
            continue
        except PermissionError:
            raise BindError(f"permission denied writing {drv / 'new_id'}: run as root "
                            "(e.g. sudo ivshmem-virtio bind)") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise BindError(f"{drv / 'new_id'}: sysfs is read-only here (a container?); "
                                "run on the root cell's host") from None
            raise BindError(f"writing {line!r} to {drv / 'new_id'}: {e.strerror}") from None
        report.append(f"{proto:#06x} ({describe(proto)}): added \"{line}\"")
    return report


def format_table(functions: list[IvshmemFunction]) -> list[str]:
    lines = [f"{'DEVICE':<12} {'PCI':<14} {'PROTOCOL':<8} {'IRQ':<9} {'R/W':<9} "
             "DRIVER / ROLE"]
    for f in functions:
        # msi_irqs exists only while a driver has the vectors: unbound says nothing about INTx
        irq = f"MSI-X {f.vectors}" if f.vectors else ("INTx" if f.driver else "-")
        rw = hex(f.rw_size) if f.rw_size else "-"
        lines.append(f"{f.uio or '-':<12} {f.pci:<14} {f.protocol:#06x}   {irq:<9} {rw:<9} "
                     f"{f.driver or 'unbound'} / {describe(f.protocol)}")
    return lines


def run_bind(args: argparse.Namespace) -> int:
    """The ``bind`` subcommand: add IDs (default), or ``--list`` what serves which link."""
    if args.list:
        functions = list_functions(args.sysfs)
        if not functions:
            print(f"no ivshmem PCI functions under {args.sysfs} (is the hypervisor enabled?)")
            return 0
        print("\n".join(format_table(functions)))
        return 0
    protocols = args.protocol or sorted(BACKEND_PROTOCOLS)
    for line in bind(protocols, args.sysfs):
        print(line)
    return 0
