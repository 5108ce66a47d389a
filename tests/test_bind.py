"""`ivshmem-virtio bind` on a fake sysfs tree: new_id lines, idempotence, clear errors, --list."""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path

import pytest

from ivshmem_virtio.backend import bind as B
from ivshmem_virtio.procs import run_cli


@dataclass
class Fn:
    """One fake PCI function: what `lspci` and sysfs would show for it."""

    pci: str
    klass: int  # the 24-bit class code, e.g. 0xFFC002
    driver: str = ""
    uio: str = ""  # "uio0" -> /sys/class/uio/uio0 points at the function
    msix: int = 0
    rw_size: int = 0xDF000
    vendor: int = 0x110A
    device: int = 0x4106


def make_sysfs(root: Path, functions: list[Fn], *, driver_loaded: bool = True) -> Path:
    """A tree with the parts of /sys that bind and serve read (real sysfs uses the same links)."""
    pci_root = root / "devices" / "pci0000:00"
    devices = root / "bus" / "pci" / "devices"
    drivers = root / "bus" / "pci" / "drivers"
    devices.mkdir(parents=True)
    drivers.mkdir(parents=True)
    if driver_loaded:
        (drivers / B.DRIVER).mkdir()
        (drivers / B.DRIVER / "new_id").write_text("")
    for f in functions:
        d = pci_root / f.pci
        d.mkdir(parents=True)
        (d / "vendor").write_text(f"0x{f.vendor:04x}\n")
        (d / "device").write_text(f"0x{f.device:04x}\n")
        (d / "class").write_text(f"0x{f.klass:06x}\n")
        (devices / f.pci).symlink_to(d)
        if f.driver:
            (drivers / f.driver).mkdir(exist_ok=True)
            (d / "driver").symlink_to(drivers / f.driver)
        if f.msix:
            (d / "msi_irqs").mkdir()
            for i in range(f.msix):
                (d / "msi_irqs" / str(40 + i)).write_text("msix\n")
        if f.uio:
            u = root / "class" / "uio" / f.uio
            u.mkdir(parents=True)
            (u / "name").write_text(f"uio_ivshmem[{f.pci}]\n")
            (u / "device").symlink_to(d)
            for i, (name, size) in enumerate((("registers", 0x1000), ("state_table", 0x1000),
                                              ("rw_section", f.rw_size))):
                m = u / "maps" / f"map{i}"
                m.mkdir(parents=True)
                (m / "name").write_text(name + "\n")
                (m / "size").write_text(f"0x{size:016x}\n")
    return root


def board(root: Path, *, driver_loaded: bool = True) -> Path:
    """A root cell as on qemu-x86: blk bound, can unbound, ivshmem-net, and a non-ivshmem NIC."""
    return make_sysfs(root, [
        Fn("0000:00:02.0", 0x020000, driver="e1000e", vendor=0x8086, device=0x10D3),
        Fn("0000:01:0c.0", 0xFFC002, driver=B.DRIVER if driver_loaded else "",
           uio="uio0" if driver_loaded else "", msix=2),
        Fn("0000:01:0d.0", 0xFFC024),
        Fn("0000:01:0f.0", 0xFF0001, driver="ivshmem-net", msix=2),
    ], driver_loaded=driver_loaded)


def new_ids(root: Path) -> list[str]:
    return (root / "bus/pci/drivers/uio_ivshmem/new_id").read_text().splitlines()


def test_new_id_line_matches_the_documented_echo():
    assert B.new_id_line(0xC002) == "110a 4106 110a 4106 ffc002 ffffff"
    assert B.new_id_line(0xC024) == "110a 4106 110a 4106 ffc024 ffffff"


def test_list_functions(tmp_path):
    fns = {f.pci: f for f in B.list_functions(board(tmp_path))}
    assert set(fns) == {"0000:01:0c.0", "0000:01:0d.0", "0000:01:0f.0"}  # not the e1000e
    blk = fns["0000:01:0c.0"]
    assert (blk.protocol, blk.driver, blk.uio, blk.vectors, blk.rw_size) == (
        0xC002, B.DRIVER, "/dev/uio0", 2, 0xDF000)
    assert fns["0000:01:0d.0"].driver == "" and fns["0000:01:0d.0"].uio == ""
    assert fns["0000:01:0f.0"].driver == "ivshmem-net"


def test_bind_adds_only_what_is_missing(tmp_path):
    root = board(tmp_path)
    report = B.bind([0xC002, 0xC024], root)
    # blk is already served by uio_ivshmem: no second dynamic ID for it
    assert new_ids(root) == ["110a 4106 110a 4106 ffc024 ffffff"]
    assert "already served" in report[0] and "added" in report[1]


def test_bind_defaults_and_eexist_is_fine(tmp_path, monkeypatch):
    root = make_sysfs(tmp_path, [])
    r = run_cli(["bind", "--sysfs", str(root)], timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    # every backend the project serves: blk, console, can
    assert new_ids(root) == [B.new_id_line(0xC002), B.new_id_line(0xC003),
                             B.new_id_line(0xC024)]
    assert "virtio-console backend" in r.stdout.decode()

    def exists(path: Path, text: str) -> None:
        raise FileExistsError(errno.EEXIST, "File exists")

    monkeypatch.setattr(B, "_write_attr", exists)
    report = B.bind([0xC002], root)
    assert "already known" in report[0]


def check_error(args: list[str], status: int, *needles: str) -> str:
    r = run_cli(args, timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == status, (r.returncode, err)
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_module_missing_says_modprobe(tmp_path):
    root = board(tmp_path, driver_loaded=False)
    check_error(["bind", "--sysfs", str(root)], 1, "modprobe uio_ivshmem")


@pytest.mark.parametrize("exc, needle", [
    (PermissionError(errno.EACCES, "Permission denied"), "run as root"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (OSError(errno.EINVAL, "Invalid argument"), "Invalid argument"),
])
def test_write_errors_are_one_clear_line(tmp_path, monkeypatch, exc, needle):
    root = make_sysfs(tmp_path, [])

    def fail(path: Path, text: str) -> None:
        raise exc

    monkeypatch.setattr(B, "_write_attr", fail)
    with pytest.raises(B.BindError) as info:
        B.bind([0xC002], root)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_list_command(tmp_path):
    root = board(tmp_path)
    r = run_cli(["bind", "--list", "--sysfs", str(root)], timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    row = next(line for line in lines if "0000:01:0c.0" in line)
    assert row.split()[:5] == ["/dev/uio0", "0000:01:0c.0", "0xc002", "MSI-X", "2"]
    assert "virtio-blk backend" in row
    unbound = next(line for line in lines if "0000:01:0d.0" in line)
    assert unbound.startswith("-") and "unbound" in unbound and "virtio-can backend" in unbound
    assert not any("0000:00:02.0" in line for line in lines)


def test_list_without_ivshmem(tmp_path):
    root = make_sysfs(tmp_path, [])
    r = run_cli(["bind", "--list", "--sysfs", str(root)], timeout=30)
    assert r.returncode == 0 and "no ivshmem PCI functions" in r.stdout.decode()
