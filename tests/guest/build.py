"""The guest of the vhost-user-blk test: Debian's kernel and a busybox initramfs, built into
.cache/guest/ of the repository (git-ignored), never into the machine's /boot.

    python -m tests.guest.build            # build (or reuse) and print the paths
    python -m tests.guest.build --force    # rebuild

Needs the Debian packages of .ci/apt-packages (busybox-static, gcc with libc6-dev for the static
helper) and apt-get to reach the archive once: the kernel package (the one linux-image-amd64
depends on, Debian 12's 6.1) is fetched with ``apt-get download`` and unpacked with ``dpkg-deb``;
its vmlinuz and the modules /dev/vda needs (virtio_blk, virtio_pci and what they depend on, read
from each module's .modinfo; whatever the kernel has built in is skipped) are kept, the rest is
deleted. The initramfs (cpio newc) holds busybox, those modules, tests/guest/vdtool (compiled
static here), tests/guest/init and the plan's steps (tests/guest/gt.sh); the test appends a
second archive with its plan (/plan.sh).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".cache" / "guest"
BUSYBOX = Path("/bin/busybox")
ROOT_MODULES = ("virtio_blk", "virtio_pci")
QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"


class GuestUnavailable(RuntimeError):
    """What is missing to build or boot the guest, in one line a person can act on."""


@dataclass(frozen=True)
class Guest:
    kernel: Path
    initrd: Path
    kernel_version: str


# --- cpio (newc) ------------------------------------------------------------------------------

def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 0) -> bytes:
    name_b = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = head + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc archive of (path, mode, data): directories before what they hold."""
    parts = [_cpio_entry(name, mode, data, ino) for ino, (name, mode, data)
             in enumerate(entries, 1)]
    parts.append(_cpio_entry("TRAILER!!!", 0))
    blob = b"".join(parts)
    return blob + b"\0" * (-len(blob) % 512)


DIR, FILE, EXEC, LINK = 0o040755, 0o100644, 0o100755, 0o120777


# --- kernel modules ---------------------------------------------------------------------------

def modinfo(data: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 module's .modinfo section."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[off:off + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def load_order(moddir: Path, roots: tuple[str, ...]) -> list[Path]:
    """The .ko files of ``roots`` and their dependencies, each after what it depends on; the
    modules the kernel has built in (modules.builtin) are left out."""
    builtin = {Path(line).stem.replace("-", "_")
               for line in (moddir / "modules.builtin").read_text().split()}
    files = {p.stem.replace("-", "_"): p for p in (moddir / "kernel").rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in files:
            raise GuestUnavailable(f"kernel module {name} is neither a module nor built in")
        for dep in filter(None, modinfo(files[name].read_bytes()).get("depends", "").split(",")):
            visit(dep)
        order.append(files[name])

    for root in roots:
        visit(root)
    return order


# --- the build --------------------------------------------------------------------------------

def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{argv[0]} not found ({e})") from e
    if done.returncode != 0:
        raise GuestUnavailable(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-800:]}")
    return done.stdout


def kernel_package() -> str:
    """The kernel package Debian's linux-image-amd64 depends on now (linux-image-6.1.0-N-amd64)."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        name = line.split(":", 1)[-1].strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise GuestUnavailable("apt-cache knows no linux-image-amd64 (run apt-get update)")


def fetch_kernel(dest: Path) -> str:
    """vmlinuz and the modules in ``dest``; returns the kernel version."""
    package = kernel_package()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="unpack-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", package], cwd=work)
        deb = next(work.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        (moddir,) = (work / "root" / "lib" / "modules").iterdir()
        version = moddir.name
        order = load_order(moddir, ROOT_MODULES)
        if dest.exists():
            shutil.rmtree(dest)
        (dest / "modules").mkdir(parents=True)
        shutil.copy(work / "root" / "boot" / f"vmlinuz-{version}", dest / "vmlinuz")
        for ko in order:
            shutil.copy(ko, dest / "modules" / ko.name)
        (dest / "modules.order").write_text("".join(f"{ko.name}\n" for ko in order))
        (dest / "version").write_text(version + "\n")
    return version


def _static_busybox() -> bytes:
    if not BUSYBOX.exists():
        raise GuestUnavailable(f"{BUSYBOX} missing: apt-get install busybox-static")
    data = BUSYBOX.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3:  # PT_INTERP
            raise GuestUnavailable(f"{BUSYBOX} is dynamically linked: apt-get install "
                                   "busybox-static")
    return data


def build_vdtool(out: Path) -> None:
    _run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-static", "-o", str(out),
          str(HERE / "vdtool.c")])


def _inputs_digest(kernel_dir: Path) -> str:
    h = hashlib.sha256()
    for p in (HERE / "vdtool.c", HERE / "init", HERE / "gt.sh", Path(__file__),
              kernel_dir / "version"):
        h.update(p.read_bytes())
    h.update(_static_busybox())
    return h.hexdigest()[:16]


def build(force: bool = False, cache: Path = CACHE) -> Guest:
    """The kernel and initramfs, reused from ``cache`` when their inputs have not changed."""
    for tool in (QEMU, QSD):
        if shutil.which(tool) is None:
            raise GuestUnavailable(f"{tool} not found: apt-get install qemu-system-x86 "
                                   "(the packages of .ci/apt-packages)")
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:  # one build at a time (tests run side by side)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(force, cache)


def _build(force: bool, cache: Path) -> Guest:
    kernel_dir = cache / "kernel"
    if force or not (kernel_dir / "version").exists():
        fetch_kernel(kernel_dir)
    version = (kernel_dir / "version").read_text().strip()
    initrd = cache / "initrd.cpio"
    stamp = cache / "initrd.stamp"
    digest = _inputs_digest(kernel_dir)
    if force or not initrd.exists() or not stamp.exists() or stamp.read_text() != digest:
        with tempfile.TemporaryDirectory(dir=cache, prefix="vdtool-") as tmp:
            vdtool = Path(tmp) / "vdtool"
            build_vdtool(vdtool)
            entries: list[tuple[str, int, bytes]] = [
                (d, DIR, b"") for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "lib",
                                        "lib/modules", "usr", "usr/bin", "usr/sbin")]
            entries += [
                ("bin/busybox", EXEC, _static_busybox()),
                ("bin/sh", LINK, b"busybox"),
                ("bin/vdtool", EXEC, vdtool.read_bytes()),
                ("init", EXEC, (HERE / "init").read_bytes()),
                ("lib/gt.sh", FILE, (HERE / "gt.sh").read_bytes()),
                ("modules.order", FILE, (kernel_dir / "modules.order").read_bytes()),
            ]
            entries += [(f"lib/modules/{ko.name}", FILE, ko.read_bytes())
                        for ko in sorted((kernel_dir / "modules").glob("*.ko"))]
        tmp_initrd = initrd.with_suffix(".tmp")
        tmp_initrd.write_bytes(cpio(entries))
        os.replace(tmp_initrd, initrd)
        stamp.write_text(digest)
    return Guest(kernel_dir / "vmlinuz", initrd, version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="fetch and build again")
    args = parser.parse_args(argv)
    try:
        guest = build(force=args.force)
    except GuestUnavailable as e:
        print(f"guest-image: {e}", file=sys.stderr)
        return 1
    print(f"guest-image: kernel {guest.kernel_version}: {guest.kernel}, initramfs {guest.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
