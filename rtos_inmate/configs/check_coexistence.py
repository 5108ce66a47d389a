#!/usr/bin/env python3
"""Check that Jailhouse cells can exist side by side: what ``jailhouse config check`` leaves out.

``tools/jailhouse-config-check`` looks at each cell on its own (regions overlapping inside a cell,
the hypervisor, PCI MMCONFIG, the GIC). The hypervisor itself does not notice when two non-root
cells take the same RAM or interrupt, and pairs ivshmem peers by ``bdf`` alone. This script reads
the compiled ``.cell`` files with Jailhouse's own parser (``pyjailhouse``, from the tree given by
``--jailhouse`` or ``$JAILHOUSE_DIR``) and checks, for the root cell plus the non-root cells given:

* CPUs: every non-root CPU belongs to the root, no CPU to two non-root cells, the root keeps one;
* memory: a non-root region without ROOTSHARED (taken from the root at ``cell create``) overlaps no
  region of another non-root cell and no shared-memory section of the root; a ROOTSHARED region
  that is not I/O does not lie in one of the root's RAM regions;
* interrupts: no pin in two non-root cells' irqchips; each INTx INTID of an ivshmem device
  (``32 + vpci_irq_base + (slot & 3)``, no MSI-X: the arm/arm64 rule) belongs to its cell (a
  non-root pin is taken from the root); INTIDs given with ``--hw-irqs`` (real devices) are not
  used for INTx; INTx lines the root's devices share are listed as notes;
* ivshmem links (grouped by bdf, as ``hypervisor/ivshmem.c`` does): one peer per ID, IDs below
  ``shmem_peers``, the same peer count, region count within the cell, the same physical address
  and size of every section in every peer, virtually contiguous sections, ROOTSHARED on every
  non-root peer's sections, state table at least 4 bytes per peer, read-only state tables, and for
  virtio (protocols 0x8000-0xffff) back-end ``0xC000 + id`` on one side, front-end ``0x8000 + id``
  on the other, with the same device ID, and no virtio front-end without its back-end.

Usage: check_coexistence.py [--jailhouse DIR] [--hw-irqs 189,190] ROOT.cell [CELL.cell ...]
Exit status 0 when nothing is wrong (notes are printed but do not fail).
"""
from __future__ import annotations

import argparse
import os
import struct
import sys

PCI_TYPE_IVSHMEM = 0x03
PCI_DEVICE_FORMAT = "<BBHH6IHHBBHHQIBBH"  # struct jailhouse_pci_device, 56 bytes
PROTO_VIRTIO_FRONT = 0x8000
PROTO_VIRTIO_BACK = 0xC000


def load_parser(jailhouse: str | None):
    path = jailhouse or os.environ.get("JAILHOUSE_DIR")
    if not path:
        sys.exit("check_coexistence: give --jailhouse DIR or set JAILHOUSE_DIR (a Jailhouse tree)")
    sys.path.insert(0, os.path.abspath(path))
    try:
        import pyjailhouse.config_parser as config_parser  # noqa: PLC0415
    except ImportError as e:
        sys.exit(f"check_coexistence: no pyjailhouse in {path}: {e}")
    return config_parser


class Cell:
    """One cell: the parsed header plus what pyjailhouse does not read (CPUs, PCI devices)."""

    def __init__(self, cp, parsed, file: str, root: bool) -> None:
        self.file = file
        self.root = root
        self.name = parsed.name
        self.regions = parsed.memory_regions
        self.vpci_irq_base = parsed.vpci_irq_base
        data = parsed.data
        offs = struct.calcsize(cp.CellConfig._HEADER_FORMAT)
        self.cpus = {i for i in range(parsed.cpu_set_size * 8)
                     if data[offs + i // 8] >> (i % 8) & 1}
        offs += parsed.cpu_set_size
        offs += parsed.num_memory_regions * cp.MemRegion.SIZE
        offs += parsed.num_cache_regions * cp.CacheRegion.SIZE
        self.pins: set[int] = set()
        for chip in parsed.irqchips:
            bitmap = chip.pin_bitmap_lo | chip.pin_bitmap_hi << 64
            self.pins |= {chip.pin_base + i for i in range(128) if bitmap >> i & 1}
        offs += parsed.num_irqchips * cp.Irqchip.SIZE
        offs += parsed.num_pio_regions * cp.PIORegion.SIZE
        self.pci = []
        size = struct.calcsize(PCI_DEVICE_FORMAT)
        for _ in range(parsed.num_pci_devices):
            f = struct.unpack_from(PCI_DEVICE_FORMAT, data, offs)
            self.pci.append({
                "type": f[0], "domain": f[2], "bdf": f[3], "num_msix_vectors": f[14],
                "shmem_regions_start": f[17], "shmem_dev_id": f[18], "shmem_peers": f[19],
                "shmem_protocol": f[20],
            })
            offs += size

    def __str__(self) -> str:
        return f"'{self.name}'"


def bdf_str(bdf: int) -> str:
    return f"{bdf >> 8:02x}:{bdf >> 3 & 0x1f:02x}.{bdf & 7:x}"


def rng(mem) -> str:
    return f"0x{mem.phys_start:x}..0x{mem.phys_start + mem.size:x}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jailhouse", help="Jailhouse source tree (for pyjailhouse)")
    ap.add_argument("--hw-irqs", default="",
                    help="comma-separated INTIDs of real devices that INTx must not use")
    ap.add_argument("root")
    ap.add_argument("cells", nargs="*")
    args = ap.parse_args()
    cp = load_parser(args.jailhouse)
    hw_irqs = {int(x, 0) for x in args.hw_irqs.split(",") if x.strip()}

    errors: list[str] = []
    notes: list[str] = []
    with open(args.root, "rb") as f:
        system = cp.SystemConfig(f.read())
    root = Cell(cp, system.root_cell, args.root, True)
    cells = []
    for path in args.cells:
        with open(path, "rb") as f:
            cells.append(Cell(cp, cp.CellConfig(f.read()), path, False))
    every = [root] + cells
    names = [c.name for c in every]
    if len(set(names)) != len(names):
        errors.append(f"two cells have the same name: {names}")

    # -- CPUs ------------------------------------------------------------------------------------
    taken: dict[int, Cell] = {}
    for c in cells:
        if not c.cpus:
            errors.append(f"{c}: no CPU")
        for cpu in sorted(c.cpus):
            if cpu not in root.cpus:
                errors.append(f"{c}: CPU {cpu} does not belong to the root cell")
            if cpu in taken:
                errors.append(f"CPU {cpu} is in {taken[cpu]} and {c}")
            taken[cpu] = c
    if cells and not root.cpus - set(taken):
        errors.append("the root cell keeps no CPU")

    # -- ivshmem links -----------------------------------------------------------------------------
    links: dict[int, list[tuple[Cell, dict]]] = {}
    root_shmem: list[tuple[object, str]] = []  # the root's sections of every link
    for c in every:
        seen_bdf = set()
        for dev in c.pci:
            if dev["bdf"] in seen_bdf:
                errors.append(f"{c}: two PCI devices at {bdf_str(dev['bdf'])}")
            seen_bdf.add(dev["bdf"])
            if dev["type"] == PCI_TYPE_IVSHMEM:
                links.setdefault(dev["bdf"], []).append((c, dev))

    for bdf, eps in sorted(links.items()):
        where = f"ivshmem link {bdf_str(bdf)}"
        peers = {dev["shmem_peers"] for _, dev in eps}
        if len(peers) != 1:
            errors.append(f"{where}: the peers disagree on shmem_peers: {sorted(peers)}")
        n = max(peers)
        ids: dict[int, Cell] = {}
        sections = None
        for c, dev in eps:
            i = dev["shmem_dev_id"]
            if i >= dev["shmem_peers"]:
                errors.append(f"{where}: {c} has ID {i} of {dev['shmem_peers']} peers")
            if i in ids:
                errors.append(f"{where}: ID {i} is claimed by {ids[i]} and {c} "
                              "(the second 'cell create' fails with EBUSY)")
            ids[i] = c
            first = dev["shmem_regions_start"]
            count = 2 + dev["shmem_peers"]
            if first + count > len(c.regions):
                errors.append(f"{where}: {c} regions {first}..{first + count - 1} "
                              f"but the cell has {len(c.regions)}")
                continue
            regs = c.regions[first:first + count]
            # (address, size) of each section; a zero-size section has no address
            mine = [(r.phys_start if r.size else 0, r.size) for r in regs]
            if sections is None:
                sections = (c, mine)
            elif mine != sections[1]:
                errors.append(f"{where}: {c} maps other sections than {sections[0]}: "
                              f"{[(hex(a), hex(s)) for a, s in mine]} vs "
                              f"{[(hex(a), hex(s)) for a, s in sections[1]]}")
            virt = regs[0].virt_start
            for r in regs:
                if r.size == 0:
                    continue
                if r.virt_start != virt:
                    errors.append(f"{where}: {c}: sections are not contiguous at 0x{virt:x} "
                                  "(the guest finds each one after the previous)")
                virt = r.virt_start + r.size
                if c.root:
                    root_shmem.append((r, where))
                if not c.root and not r.flags & cp.JAILHOUSE_MEM.ROOTSHARED:
                    errors.append(f"{where}: {c}: section {rng(r)} lacks ROOTSHARED "
                                  "('cell create' would take it from the root)")
            if regs[0].size < 4 * dev["shmem_peers"]:
                errors.append(f"{where}: {c}: state table of 0x{regs[0].size:x} bytes for "
                              f"{dev['shmem_peers']} peers")
            if regs[0].flags & cp.JAILHOUSE_MEM.WRITE:
                errors.append(f"{where}: {c}: the state table is writable")
        if len(eps) > n:
            errors.append(f"{where}: {len(eps)} cells for {n} peers")
        protos = {dev["shmem_dev_id"]: dev["shmem_protocol"] for _, dev in eps}
        if any(p >= PROTO_VIRTIO_FRONT for p in protos.values()):
            back = {i: p - PROTO_VIRTIO_BACK for i, p in protos.items() if p >= PROTO_VIRTIO_BACK}
            front = {i: p - PROTO_VIRTIO_FRONT for i, p in protos.items()
                     if PROTO_VIRTIO_FRONT <= p < PROTO_VIRTIO_BACK}
            if n != 2 or len(back) > 1 or len(front) > 1 or \
                    len(set(back.values()) | set(front.values())) != 1:
                have = ", ".join(f"ID {i} 0x{p:04x}" for i, p in sorted(protos.items()))
                errors.append(f"{where}: a virtio link needs 2 peers, one back-end 0xC000+id and "
                              f"one front-end 0x8000+id: {have}")
        if protos and not any(p >= PROTO_VIRTIO_BACK for p in protos.values()) and \
                any(p >= PROTO_VIRTIO_FRONT for p in protos.values()):
            errors.append(f"{where}: a virtio front-end without a back-end in these cells "
                          "(is the root cell's fragment missing?)")
        desc = ", ".join(f"{c} ID {dev['shmem_dev_id']} 0x{dev['shmem_protocol']:04x}"
                         for c, dev in sorted(eps, key=lambda e: e[1]["shmem_dev_id"]))
        notes.append(f"{where}: {desc}")

    # -- memory ------------------------------------------------------------------------------------
    def private(r) -> bool:
        return r.size != 0 and not r.flags & (cp.JAILHOUSE_MEM.ROOTSHARED |
                                              cp.JAILHOUSE_MEM.COMM_REGION)

    for i, a in enumerate(cells):
        for ra in a.regions:
            if not private(ra):
                continue
            for j, b in enumerate(cells):
                for rb in b.regions:
                    if j == i or not rb.size or rb.flags & cp.JAILHOUSE_MEM.COMM_REGION or \
                            not ra.phys_overlaps(rb) or (private(rb) and j < i):
                        continue  # (two private regions: reported once)
                    errors.append(f"{a} region {rng(ra)} (its own) overlaps {b} region {rng(rb)}")
            # (another non-root cell's sections are its regions: checked above)
            for rs, link in root_shmem:
                if ra.phys_overlaps(rs):
                    errors.append(f"{a} region {rng(ra)} (its own) overlaps the root's section "
                                  f"{rng(rs)} of {link}")
            if not any(rr.phys_start <= ra.phys_start and
                       ra.phys_start + ra.size <= rr.phys_start + rr.size for rr in root.regions):
                notes.append(f"{a} region {rng(ra)} is not inside one root region "
                             "(nothing to give back when the cell goes)")

    # a shared region that is RAM of the root: the cell would share memory the root uses
    ram = cp.JAILHOUSE_MEM.READ | cp.JAILHOUSE_MEM.WRITE | cp.JAILHOUSE_MEM.EXECUTE
    for a in cells:
        for ra in a.regions:
            if not ra.size or not ra.flags & cp.JAILHOUSE_MEM.ROOTSHARED or \
                    ra.flags & cp.JAILHOUSE_MEM.IO:
                continue
            for rr in root.regions:
                if rr.flags & ram == ram and not rr.flags & cp.JAILHOUSE_MEM.IO and \
                        ra.phys_overlaps(rr):
                    errors.append(f"{a} region {rng(ra)} (ROOTSHARED) lies in the root's RAM "
                                  f"region {rng(rr)}")

    # -- interrupts --------------------------------------------------------------------------------
    owner: dict[int, Cell] = {}
    for c in cells:
        for pin in sorted(c.pins):
            if pin in owner:
                errors.append(f"INTID {pin} is in the irqchips of {owner[pin]} and {c}")
            owner[pin] = c
            if pin not in root.pins:
                notes.append(f"{c}: INTID {pin} is not in the root's irqchips")
    root_lines: dict[int, list[str]] = {}
    for c in every:
        for dev in c.pci:
            if dev["type"] != PCI_TYPE_IVSHMEM or dev["num_msix_vectors"]:
                continue
            intid = 32 + c.vpci_irq_base + (dev["bdf"] >> 3 & 3)
            what = f"{c} {bdf_str(dev['bdf'])}: INTx INTID {intid}"
            if c.root:
                root_lines.setdefault(intid, []).append(bdf_str(dev["bdf"]))
                if intid not in root.pins:
                    errors.append(f"{what} is not in the root's irqchips")
                elif intid in owner:
                    errors.append(f"{what} is taken by {owner[intid]}")
            elif intid not in c.pins:
                errors.append(f"{what} is not in the cell's irqchips (its doorbells would "
                              f"reach {owner.get(intid, 'the root')})")
            if intid in hw_irqs:
                errors.append(f"{what} is the interrupt of a real device (--hw-irqs)")
            notes.append(what)
    for intid, devs in sorted(root_lines.items()):
        if len(devs) > 1:
            notes.append(f"root INTID {intid} is shared by {', '.join(devs)} "
                         "(fine for uio_ivshmem: IRQF_SHARED)")

    # -- report ------------------------------------------------------------------------------------
    print(f"Cells: {', '.join(f'{c} ({os.path.basename(c.file)})' for c in every)}")
    print("CPUs: " + ", ".join(f"{c} {sorted(c.cpus - set(taken)) if c.root else sorted(c.cpus)}"
                               for c in every))
    for n in notes:
        print(f"  note: {n}")
    for e in errors:
        print(f"  ERROR: {e}")
    print("Coexistence: " + ("OK" if not errors else f"{len(errors)} problem(s)"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
