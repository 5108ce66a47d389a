"""vhost-user devices in ``serve``'s config (issue 16 item 2): ``link = "vhost-user:SOCKET"``.

The daemon listens on the socket for a VM's front-end (here the project's own Python front-end,
which plays QEMU's part), beside devices on ivshmem links: a disk over each transport, and a CAN
bus shared by a vhost-user port and an ivshmem port of one switch.
"""

from __future__ import annotations

import os

import can
import pytest

from ivshmem_virtio.frontend.cli import connect_blk
from ivshmem_virtio.procs import run_cli

from .can_helpers import CAN_PROTOCOLS, ensure_interfaces
from .conftest import run
from .test_serve import blk_client, leave, write_config

MiB = 1 << 20


def test_disks_over_vhost_user_and_ivshmem_in_one_serve(procs, tmp_path, image_factory):
    vu, sim = str(tmp_path / "vm-disk.sock"), str(tmp_path / "cell-disk.sock")
    procs.hub(sim)
    img_vu, img_sim = image_factory(4 * MiB, name="vm.img"), image_factory(4 * MiB, name="c.img")
    cfg = write_config(tmp_path / "c.toml", [
        {"name": "vm", "type": "blk", "link": f"vhost-user:{vu}", "image": img_vu,
         "serial": "vm-disk"},
        {"name": "cell", "type": "blk", "link": f"sim:{sim}", "image": img_sim}])
    serve = procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")
    serve.wait_for("link up device=vm", 20.0)
    assert oct(os.stat(vu).st_mode & 0o777) == "0o600"
    data = {"vm": os.urandom(64 * 1024), "cell": os.urandom(64 * 1024)}

    async def body() -> None:
        vm = await connect_blk(f"vhost-user:{vu}", 10.0)
        cell = await blk_client(sim)
        try:
            assert vm.capacity == 4 * MiB // 512 and await vm.get_id() == "vm-disk"
            await vm.write(MiB, data["vm"])
            await cell.write(MiB, data["cell"])
            await vm.flush()
            assert await vm.read(MiB, len(data["vm"])) == data["vm"]
            assert await cell.read(MiB, len(data["cell"])) == data["cell"]
        finally:
            await leave(vm)
            await leave(cell)
        vm = await connect_blk(f"vhost-user:{vu}", 10.0)  # the next VM session
        try:
            assert await vm.read(MiB, len(data["vm"])) == data["vm"]
        finally:
            await leave(vm)

    run(body(), timeout=60)
    assert serve.stop() == 0
    assert not os.path.exists(vu)
    for name, img in (("vm", img_vu), ("cell", img_sim)):
        with open(img, "rb") as f:
            f.seek(MiB)
            assert f.read(len(data[name])) == data[name]


def test_can_bus_shared_by_a_vm_and_a_cell(procs, tmp_path):
    ensure_interfaces()
    vu, sim = str(tmp_path / "vm-can.sock"), str(tmp_path / "cell-can.sock")
    procs.hub(sim, "--protocols", CAN_PROTOCOLS, "--vectors", "4")
    cfg = write_config(tmp_path / "c.toml", [
        {"name": "vm-can", "type": "can", "link": f"vhost-user:{vu}", "bus": "virtual:shared",
         "fd": True},
        {"name": "cell-can", "type": "can", "link": f"sim:{sim}", "bus": "virtual:shared",
         "fd": True}])
    serve = procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")
    serve.wait_for("link up device=vm-can", 20.0)
    with can.Bus(interface="ivshmem", channel=f"vhost-user:{vu}", fd=True, timeout=10.0) as vm, \
            can.Bus(interface="ivshmem", channel=f"sim:{sim}", fd=True, timeout=10.0) as cell:
        frames = [can.Message(arbitration_id=0x123, data=b"vm->cell", is_extended_id=False),
                  can.Message(arbitration_id=0x1ABCDE, data=bytes(range(48)),
                              is_extended_id=True, is_fd=True),
                  can.Message(arbitration_id=0x7F, is_remote_frame=True, dlc=3,
                              is_extended_id=False)]
        for msg in frames:
            vm.send(msg)
            got = cell.recv(5.0)
            assert got is not None, msg
            assert (got.arbitration_id, got.is_extended_id, got.is_fd, got.is_remote_frame,
                    bytes(got.data)) == (msg.arbitration_id, msg.is_extended_id, msg.is_fd,
                                         msg.is_remote_frame, bytes(msg.data))
        cell.send(can.Message(arbitration_id=0x321, data=b"cell->vm", is_extended_id=False))
        got = vm.recv(5.0)
        assert got is not None and bytes(got.data) == b"cell->vm"
    assert serve.stop() == 0
    assert not os.path.exists(vu)


@pytest.mark.parametrize("device, needle", [
    ({"type": "console", "link": "vhost-user:@dir/c.sock", "pty": True},
     "devices[0].link: a console is served over ivshmem links only"),
    ({"type": "blk", "link": "vhost-user:@dir/file", "image": "@img"},
     "devices[0].link: @dir/file: exists and is not a socket"),
    ({"type": "blk", "link": "vhost-user:@dir/nodir/x.sock", "image": "@img"},
     "devices[0].link: "),
])
def test_vhost_user_config_errors(tmp_path, image_factory, device, needle):
    img = image_factory(MiB)
    (tmp_path / "file").write_text("not a socket")

    def fill(v: object) -> object:
        return v.replace("@dir", str(tmp_path)).replace("@img", img) \
            if isinstance(v, str) else v

    dev = {k: fill(v) for k, v in device.items()}
    cfg = write_config(tmp_path / "c.toml", [dev])
    r = run_cli(["serve", "--config", str(cfg), "--check"], timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert str(fill(needle)) in err, err


def test_same_socket_for_a_sim_link_and_a_vhost_user_device_refused(tmp_path, image_factory):
    sock = str(tmp_path / "x.sock")
    cfg = write_config(tmp_path / "c.toml", [
        {"name": "a", "type": "blk", "link": f"sim:{sock}", "image": image_factory(MiB)},
        {"name": "b", "type": "blk", "link": f"vhost-user:{sock}",
         "image": image_factory(MiB, name="b.img")}])
    r = run_cli(["serve", "--config", str(cfg), "--check"], timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and "devices[1].link" in err and "the same link" in err, err
