"""`ivshmem-virtio serve`: many devices from one config, links that come and go, SIGHUP reload.

The daemon runs as a process against sim hubs (one per link, as one Jailhouse link per device);
the frontends are the Python drivers in this process, joining the hubs as ID 1. A hub stopped and
started again is a guest cell destroyed and re-created. systemd's notification socket is a
datagram socket of the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ivshmem_virtio.backend.config import TYPE_SPIN_US, ConfigError, parse_config
from ivshmem_virtio.backend.device_slot import DeviceSlot
from ivshmem_virtio.backend.serve import ServeDaemon, sd_notify
from ivshmem_virtio.backend.serve_links import resolve_uio
from ivshmem_virtio.errors import LinkError
from ivshmem_virtio.frontend.blk import BlkClient
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.link import SPIN_CAP_US
from ivshmem_virtio.procs import Child, cli, run_cli
from ivshmem_virtio.spec.can import CanFrame

from .conftest import run
from .test_bind import Fn, make_sysfs

MiB = 1 << 20
CAN_HUB = ("--protocols", "0xC024,0x8024", "--vectors", "4")


# -- helpers ----------------------------------------------------------------------------------

def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(v)


def write_config(path: Path, devices: list[dict], **options: object) -> Path:
    lines = [f"{k} = {toml_value(v)}" for k, v in options.items()]
    for d in devices:
        lines.append("\n[[devices]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in d.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Notify:
    """The systemd side of sd_notify: a datagram socket that collects what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, field: str, timeout: float = 15.0) -> list[str]:
        """Every message up to and including the first one holding ``field``."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.messages.append(msg)
            seen.append(msg)
            if field in msg.split("\n"):
                return seen
        raise AssertionError(f"no {field} from the daemon; got {seen}")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


async def await_count(child: Child, text: str, n: int, timeout: float = 20.0) -> None:
    """``Child.wait_for`` without blocking the loop the frontends run on."""
    await asyncio.to_thread(child.wait_for, text, timeout, n)


async def blk_client(sock: str) -> BlkClient:
    client = BlkClient(SimIvshmem(sock, 1), timeout=10.0)
    await client.start(timeout=10.0)
    return client


async def can_driver(sock: str):  # noqa: ANN201 - frontend.can is imported lazily
    from ivshmem_virtio.frontend.can import CanDriver

    drv = CanDriver(SimIvshmem(sock, 1), timeout=10.0)
    await drv.start(timeout=10.0)
    return drv


async def leave(driver) -> None:  # noqa: ANN001
    await driver.close()
    driver.dev.close()


async def capacity(sock: str) -> int:
    """The capacity a fresh frontend on ``sock`` sees (it leaves again)."""
    client = await blk_client(sock)
    try:
        return client.capacity
    finally:
        await leave(client)


class Keepalive:
    """Runs ``op`` back to back and records the longest gap between two successes."""

    def __init__(self, name: str, op: Callable[[int], object], pause: float = 0.0) -> None:
        self.name = name
        self.op = op
        self.pause = pause
        self.ops = 0
        self.errors: list[str] = []
        self.longest_gap = 0.0
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def _loop(self) -> None:
        last = time.monotonic()
        while not self._stopping:
            try:
                await asyncio.wait_for(self.op(self.ops), 10.0)  # type: ignore[arg-type]
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded and asserted on by the test
                self.errors.append(repr(e))
            else:
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - last)
                last = now
                self.ops += 1
            await asyncio.sleep(self.pause)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Let the current operation finish, then end the loop.

        Not Task.cancel(): Python 3.11's wait_for swallows a cancellation that races with the
        completion of the operation it waits on, and the loop would then run forever.
        """
        assert self._task is not None
        self._stopping = True
        await asyncio.wait_for(self._task, 30.0)

    async def progressed(self, timeout: float = 10.0) -> None:
        """Wait for a few more successful operations (the device is being served right now)."""
        target = self.ops + 3
        deadline = time.monotonic() + timeout
        while self.ops < target:
            assert time.monotonic() < deadline, f"{self.name} stalled: {self.errors[-3:]}"
            await asyncio.sleep(0.02)


# -- the whole daemon ---------------------------------------------------------------------------

def test_serve_devices_survive_link_loss_and_reload(procs, tmp_path, image_factory):
    socks = {k: str(tmp_path / f"{k}.sock") for k in "abcd"}
    img_a = image_factory(8 * MiB, name="a.img")
    img_b = image_factory(8 * MiB, name="b.img")
    bus = f"virtual:serve-test-{os.getpid()}"
    dev_a = {"name": "a", "type": "blk", "link": f"sim:{socks['a']}", "image": img_a,
             "serial": "disk-a"}
    dev_b = {"name": "b", "type": "blk", "link": f"sim:{socks['b']}", "image": img_b,
             "serial": "disk-b", "queue_size": 64}
    dev_c = {"name": "c", "type": "can", "link": f"sim:{socks['c']}", "bus": bus,
             "queue_size": 64}
    dev_d = {"name": "d", "type": "can", "link": f"sim:{socks['d']}", "bus": bus,
             "queue_size": 64}
    cfg = write_config(tmp_path / "config.toml", [dev_a, dev_b, dev_c], retry_interval=0.2)
    procs.hub(socks["a"])
    procs.hub(socks["b"])
    procs.hub(socks["c"], *CAN_HUB)
    notify = Notify(tmp_path / "notify")
    try:
        serve = Child("serve", cli("serve", "--config", str(cfg)), tmp_path,
                      env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
        procs.children.append(serve)
        first = notify.wait_for("READY=1")
        assert any("STATUS=serving 3/3 devices" in m for m in first), first
        run(_exercise(procs, serve, notify, socks, cfg, (dev_a, dev_b, dev_c, dev_d)),
            timeout=150)
        serve.signal(signal.SIGTERM)
        assert serve.proc.wait(20) == 0, serve.log()
        notify.wait_for("STOPPING=1")
    finally:
        notify.close()
    log = serve.log()
    assert "Traceback" not in log, log
    assert log.count("link up device=b") == 1, log  # b was never restarted
    assert log.count("link up device=c") == 1, log


async def _exercise(procs, serve: Child, notify: Notify, socks: dict[str, str], cfg: Path,
                    devices: tuple[dict, ...]) -> None:
    dev_a, dev_b, dev_c, dev_d = devices
    a = await blk_client(socks["a"])
    b = await blk_client(socks["b"])
    c = await can_driver(socks["c"])
    assert await a.get_id() == "disk-a" and await b.get_id() == "disk-b"
    payload_a = os.urandom(256 << 10)
    await a.write(1 * MiB, payload_a)
    await a.flush()

    async def blk_op(i: int) -> None:
        data = i.to_bytes(4, "little") * 1024
        off = (i % 64) * 4096
        await b.write(off, data)
        assert await b.read(off, 4096) == data

    async def can_op(i: int) -> None:
        assert await c.send(CanFrame.data_frame(0x100 + i % 0x100, bytes([i & 0xFF]))) == 0

    keep_b = Keepalive("blk b", blk_op)
    keep_c = Keepalive("can c", can_op, pause=0.01)
    keep_b.start()
    keep_c.start()
    try:
        await keep_b.progressed()
        await keep_c.progressed()

        # cell behind link a destroyed: its hub goes away, the daemon waits for it
        await leave(a)
        hub_a = next(ch for ch in procs.children if ch.name == "hub-a")
        hub_a.stop()
        await await_count(serve, "link lost, waiting for it to come back device=a", 1)
        await keep_b.progressed()
        await keep_c.progressed()
        # ... and re-created: same socket, fresh shared memory; the daemon re-attaches
        procs.start("hub-a-again", "hub", "--socket", socks["a"], wait="hub listening")
        await await_count(serve, "link up device=a", 2)
        a = await blk_client(socks["a"])
        assert await a.read(1 * MiB, len(payload_a)) == payload_a  # the image stayed open
        await keep_b.progressed()

        # a broken config on SIGHUP is rejected; everything keeps running on the old one
        good = cfg.read_text()
        cfg.write_text(good.replace('queue_size = 64', 'queue_size = 100', 1))
        serve.signal(signal.SIGHUP)
        await await_count(serve, "reload rejected", 1)
        await asyncio.to_thread(notify.wait_for, "READY=1")
        await keep_b.progressed()

        # a real change: a's serial changes and a second can device (cell) joins the bus
        procs.hub(socks["d"], *CAN_HUB)
        write_config(cfg, [{**dev_a, "serial": "disk-a2"}, dev_b, dev_c, dev_d],
                     retry_interval=0.2)
        serve.signal(signal.SIGHUP)
        msgs = await asyncio.to_thread(notify.wait_for, "READY=1")
        assert "RELOADING=1" in msgs[0].split("\n"), msgs
        assert any(line.startswith("MONOTONIC_USEC=") for line in msgs[0].split("\n"))
        await await_count(serve, "config reloaded", 1)
        log = serve.log()
        assert "changed=['a']" in log and "added=['d']" in log, log
        # the frontend of a saw its backend restart and came back by itself, with the new serial
        await a.connected.wait()
        assert await a.get_id() == "disk-a2"
        assert a.bring_ups >= 2
        d = await can_driver(socks["d"])
        try:
            frame = CanFrame.data_frame(0x321, b"to-d")
            assert await d.send(CanFrame.data_frame(0x123, b"to-c")) == 0
            got = await asyncio.wait_for(_recv_id(c, 0x123), 10)
            assert got.data == b"to-c"
            assert await c.send(frame) == 0
            got = await asyncio.wait_for(_recv_id(d, 0x321), 10)
            assert got.data == b"to-d"
        finally:
            await leave(d)
        await keep_b.progressed()
        await keep_c.progressed()
    finally:
        await keep_b.stop()
        await keep_c.stop()
    # b and c were served throughout: no error, never re-initialised, no long stall
    assert keep_b.errors == [] and keep_c.errors == [], (keep_b.errors, keep_c.errors)
    assert b.bring_ups == 1 and c.bring_ups == 1
    assert keep_b.longest_gap < 3.0 and keep_c.longest_gap < 3.0
    await leave(a)
    await leave(b)
    await leave(c)


async def _recv_id(drv, can_id: int):  # noqa: ANN001, ANN202
    """The next received frame with ``can_id`` (the others are c's own traffic to the bus)."""
    while True:
        rx = await drv.recv()
        if rx.frame.can_id == can_id:
            return rx.frame


CONSOLE_HUB = ("--rw-size", "0x40000")
CONSOLE_PROTOCOLS = "0xC003,0x8003"


def test_serve_console_beside_blk_across_reconnects(procs, tmp_path, image_factory):
    """A console (``socket`` sink) and a disk from one config: a session through the socket
    while the disk serves reads; the cell's driver leaves and comes back, then its link goes
    and comes back (a new runner). The socket's client stays connected throughout, and what it
    typed while no cell was there reaches the next one."""
    disk, con = str(tmp_path / "disk.sock"), str(tmp_path / "con.sock")
    csock = str(tmp_path / "console.sock")
    cfg = write_config(tmp_path / "c.toml", [
        {"name": "disk", "type": "blk", "link": f"sim:{disk}", "image": image_factory(4 * MiB)},
        {"name": "con", "type": "console", "link": f"sim:{con}", "socket": csock,
         "cols": 100, "rows": 30, "queue_size": 64}], retry_interval=0.2)
    procs.hub(disk)
    procs.hub(con, *CONSOLE_HUB, protocols=CONSOLE_PROTOCOLS)
    serve = procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")
    assert oct(os.stat(csock).st_mode & 0o777) == "0o600"
    run(_console_session(procs, serve, disk, con, csock), timeout=150)
    assert serve.stop() == 0
    log = serve.log()
    assert "Traceback" not in log, log
    assert log.count("link up device=con") == 2 and log.count("link up device=disk") == 1, log
    assert not os.path.exists(csock)  # closed on shutdown, not before


async def _console_cell(sock: str):  # noqa: ANN202 - frontend.console is imported lazily
    from ivshmem_virtio.frontend.console import ConsoleDriver

    drv = ConsoleDriver(SimIvshmem(sock, 1), timeout=10.0)
    await drv.start(timeout=10.0)
    return drv


async def _cell_reads(drv, want: bytes) -> bytes:  # noqa: ANN001
    got = b""
    while want not in got:
        got += await asyncio.wait_for(drv.read(), 10)
    return got


async def _console_session(procs, serve: Child, disk: str, con: str, csock: str) -> None:
    b = await blk_client(disk)
    payload = os.urandom(64 << 10)
    await b.write(0, payload)

    async def blk_op(i: int) -> None:
        assert await b.read(0, len(payload)) == payload

    keep = Keepalive("blk disk", blk_op)
    keep.start()
    reader, writer = await asyncio.open_unix_connection(csock)
    cell = await _console_cell(con)
    try:
        await keep.progressed()
        assert cell.size == (100, 30)
        writer.write(b"uname\r")  # typed in the root cell ...
        await writer.drain()
        assert await _cell_reads(cell, b"uname\r") == b"uname\r"  # ... reaches the cell
        await cell.write(b"Linux cell\r\n")  # its answer comes back
        assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 10) == b"Linux cell\r\n"
        await keep.progressed()

        # the cell's driver leaves (the link stays): typing goes on, it waits for the cell
        await leave(cell)
        writer.write(b"while away\r")
        await writer.drain()
        cell = await _console_cell(con)
        assert await _cell_reads(cell, b"while away\r") == b"while away\r"
        await cell.write(b"back\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 10) == b"back\r\n"
        await keep.progressed()

        # the cell is destroyed and re-created: a new runner, the same host side and client
        await leave(cell)
        hub = next(ch for ch in procs.children if ch.name == "hub-con")
        hub.stop()
        await await_count(serve, "link lost, waiting for it to come back device=con", 1)
        writer.write(b"after loss\r")
        await writer.drain()
        procs.start("hub-con-again", "hub", "--socket", con, "--protocols", CONSOLE_PROTOCOLS,
                    *CONSOLE_HUB, wait="hub listening")
        await await_count(serve, "link up device=con", 2)
        cell = await _console_cell(con)
        assert cell.size == (100, 30)
        assert await _cell_reads(cell, b"after loss\r") == b"after loss\r"
        blob = os.urandom(128 << 10)  # bulk output through the new runner, whole and in order
        await cell.write(blob + b"\r\n")
        got = await asyncio.wait_for(reader.readexactly(len(blob) + 2), 20)
        assert got == blob + b"\r\n"
        await keep.progressed()
    finally:
        await keep.stop()
        writer.close()
        await leave(cell)
        await leave(b)
    assert keep.errors == [], keep.errors
    assert b.bring_ups == 1  # the disk never noticed


def test_shutdown_completes_requests_and_flushes(procs, tmp_path, image_factory):
    """SIGTERM while a frontend writes: exit 0, and what was acknowledged is in the image."""
    sock = str(tmp_path / "s.sock")
    img = image_factory(8 * MiB)
    cfg = write_config(tmp_path / "c.toml", [{"type": "blk", "link": f"sim:{sock}",
                                              "image": img}])
    procs.hub(sock)
    serve = procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")

    async def body() -> bytes:
        client = await blk_client(sock)
        data = os.urandom(2 * MiB)
        try:
            await client.write(0, data)
            await client.flush()
        finally:
            await leave(client)
        return data

    data = run(body(), timeout=60)
    serve.signal(signal.SIGTERM)
    assert serve.proc.wait(20) == 0, serve.log()
    assert "stopped" in serve.log()
    with open(img, "rb") as f:
        assert f.read(len(data)) == data


def test_unreachable_links_do_not_stop_the_daemon(procs, tmp_path, image_factory):
    """No hub at start, or the backend ID held by another process: READY anyway, and the daemon
    attaches as soon as the link can be had."""
    late, busy = str(tmp_path / "late.sock"), str(tmp_path / "busy.sock")
    wrong = str(tmp_path / "wrong.sock")
    procs.hub(busy)
    procs.hub(wrong, *CAN_HUB)  # a CAN link named as a disk's: refused, retried, logged once
    other = procs.blk(busy, image_factory(4 * MiB, name="other.img"), name="other-backend")
    cfg = write_config(tmp_path / "c.toml", [
        {"name": "late", "type": "blk", "link": f"sim:{late}",
         "image": image_factory(4 * MiB, name="late.img")},
        {"name": "busy", "type": "blk", "link": f"sim:{busy}",
         "image": image_factory(2 * MiB, name="busy.img")},
        {"name": "wrong", "type": "blk", "link": f"sim:{wrong}",
         "image": image_factory(2 * MiB, name="wrong.img")}], retry_interval=0.1)
    serve = procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")
    log = serve.log()
    assert "link unavailable, retrying device=late" in log, log
    assert "link unavailable, retrying device=busy" in log and "taken" in log, log
    procs.hub(late)
    serve.wait_for("link up device=late", 20.0)
    other.stop()  # the one-off backend leaves: the daemon takes the link over
    serve.wait_for("link up device=busy", 20.0)

    assert run(capacity(late), timeout=30) == 4 * MiB // 512
    assert run(capacity(busy), timeout=30) == 2 * MiB // 512
    log = serve.log()
    assert log.count("link unavailable, retrying device=wrong") == 1, log
    assert "the link's protocol is 0xc024, a blk backend needs 0xc002" in log, log
    assert serve.proc.poll() is None


def test_missing_image_waits_while_the_others_serve(procs, tmp_path, image_factory):
    """One disk that is not there yet keeps no other cell waiting: the daemon is READY, serves
    the other device, says once which image it waits for, and serves it once it appears."""
    late_sock, other_sock = str(tmp_path / "late.sock"), str(tmp_path / "other.sock")
    procs.hub(late_sock)
    procs.hub(other_sock)
    late_img = tmp_path / "late.img"
    cfg = write_config(tmp_path / "c.toml", [
        {"name": "late", "type": "blk", "link": f"sim:{late_sock}", "image": str(late_img)},
        {"name": "other", "type": "blk", "link": f"sim:{other_sock}",
         "image": image_factory(2 * MiB, name="other.img")}], retry_interval=0.1)
    serve = procs.start("serve", "serve", "--config", str(cfg), wait="serve ready")
    serve.wait_for("link up device=other", 20.0)

    assert run(capacity(other_sock), timeout=30) == 2 * MiB // 512
    serve.wait_for("image unavailable, retrying device=late", 20.0)
    assert "link up device=late" not in serve.log()
    with open(late_img, "wb") as f:
        f.truncate(3 * MiB)
    serve.wait_for("link up device=late", 20.0)
    assert run(capacity(late_sock), timeout=30) == 3 * MiB // 512
    assert serve.log().count("image unavailable, retrying device=late") == 1, serve.log()
    assert serve.stop() == 0


def test_second_serve_on_the_same_links_refuses(procs, tmp_path, image_factory):
    """A lock file per link: the second daemon stops at once with one line naming the holder,
    instead of retrying the taken backend ID forever; the first one's lock goes with it."""
    sock = str(tmp_path / "one.sock")
    locks = tmp_path / "locks"
    procs.hub(sock)
    cfg = write_config(tmp_path / "c.toml", [
        {"name": "disk", "type": "blk", "link": f"sim:{sock}", "image": image_factory(MiB)}])
    first = procs.start("serve", "serve", "--config", str(cfg), "--lock-dir", str(locks),
                        wait="serve ready")
    r = run_cli(["serve", "--config", str(cfg), "--lock-dir", str(locks)], timeout=30)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"devices[0].link: sim:{sock} is already served by another process (pid " \
        f"{first.pid}," in err, err
    assert first.proc.poll() is None
    assert first.stop() == 0
    assert list(locks.iterdir()) == []  # released and removed on shutdown


def test_check_validates_without_serving(tmp_path, image_factory):
    cfg = write_config(tmp_path / "c.toml", [{"type": "blk", "link": "uio:auto",
                                              "image": image_factory()}])
    r = run_cli(["serve", "--config", str(cfg), "--check"], timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    assert "OK, 1 device(s)" in r.stdout.decode()


# -- bad configuration: one line naming the field, exit 2, images untouched ------------------

BASE = [{"type": "blk", "link": "sim:/run/x-a.sock", "image": "@good"},
        {"type": "blk", "link": "sim:/run/x-b.sock", "image": "@second", "read_only": True},
        {"type": "can", "link": "sim:/run/x-c.sock", "bus": "virtual:x"}]

BAD = [
    # (global options, device index, field changes, expected text in the error)
    ({}, 0, {"image": "@notdir"}, "devices[0].image: "),  # missing waits; this cannot be
    ({}, 1, {"image": "@good"}, "devices[1].image: "),
    ({}, 0, {"image": "@tiny"}, "devices[0].image: "),
    ({}, 0, {"image": "@dir"}, "devices[0].image: "),
    ({}, 0, {"queue_size": 100}, "devices[0].queue_size: "),
    ({}, 0, {"queue_size": 4}, "devices[0].queue_size: "),
    ({}, 0, {"queue_size": "256"}, "devices[0].queue_size: "),
    ({}, 0, {"serial": "x" * 21}, "devices[0].serial: "),
    ({}, 0, {"read_only": "yes"}, "devices[0].read_only: "),
    ({}, 0, {"type": "net"}, "devices[0].type: "),
    ({}, 0, {"link": "tcp:1.2.3.4"}, "devices[0].link: "),
    ({}, 0, {"link": "sim:"}, "devices[0].link: "),
    ({}, 0, {"link": "uio:pci=00:zz.0"}, "devices[0].link: "),
    ({}, 0, {"link": "uio:protocol=0xC024"}, "devices[0].link: "),
    ({}, 0, {"link": "uio:protocol=banana"}, "devices[0].link: "),
    ({}, 1, {"link": "sim:/run/x-a.sock"}, "devices[1].link: "),
    ({}, 0, {"mode": "turbo"}, "devices[0].mode: "),
    ({}, 0, {"spin_us": -1}, "devices[0].spin_us: "),
    ({}, 0, {"imgae": "x"}, "devices[0].imgae: unknown option"),
    ({}, 2, {"image": "@good"}, "devices[2].image: unknown option"),
    ({}, 0, {"bus": "socketcan:can0"}, "devices[0].bus: unknown option"),
    ({}, 2, {"bus": "can0"}, "devices[2].bus: "),
    ({}, 2, {"bus": "nosuchiface:can0"}, "devices[2].bus: "),
    ({}, 2, {"fd": 1}, "devices[2].fd: "),
    ({}, 2, {"late_tx_ack": "no"}, "devices[2].late_tx_ack: "),
    ({}, 1, {"name": "sim:/run/x-a.sock"}, "devices[1].name: "),  # device 0 default name
    ({}, 0, {"link": None}, "devices[0].link: missing"),
    ({"mode": "fast"}, None, {}, "mode: "),
    ({"log_level": "loud"}, None, {}, "log_level: "),
    ({"log_json": "yes"}, None, {}, "log_json: "),
    ({"retry_interval": 0}, None, {}, "retry_interval: "),
    ({"colour": "blue"}, None, {}, "colour: unknown option"),
    ({"devices": "all"}, None, {}, "devices: "),
]


@pytest.fixture
def images(tmp_path) -> dict[str, str]:
    """The images a bad config names, with an old mtime so that any write would show."""
    paths = {"@good": tmp_path / "good.img", "@second": tmp_path / "second.img",
             "@tiny": tmp_path / "tiny.img", "@notdir": tmp_path / "good.img" / "x",
             "@dir": tmp_path}
    for key in ("@good", "@second"):
        with open(paths[key], "wb") as f:
            f.truncate(4 * MiB)
    paths["@tiny"].write_bytes(b"x" * 100)
    for key in ("@good", "@second", "@tiny"):
        os.utime(paths[key], (1_000_000_000, 1_000_000_000))
    return {k: str(v) for k, v in paths.items()}


def _mtimes(images: dict[str, str]) -> dict[str, int]:
    return {k: os.stat(v).st_mtime_ns for k, v in images.items()
            if k in ("@good", "@second", "@tiny")}


@pytest.mark.parametrize("options, index, change, needle", BAD,
                         ids=[b[3].split(":")[0] + "-" + str(i) for i, b in enumerate(BAD)])
def test_bad_config_value(tmp_path, images, options, index, change, needle):
    devices = [dict(d) for d in BASE]
    if index is not None:
        devices[index].update(change)
        devices[index] = {k: v for k, v in devices[index].items() if v is not None}
    for d in devices:
        if isinstance(d.get("image"), str) and d["image"].startswith("@"):
            d["image"] = images[d["image"]]
    opts = dict(options)
    if "devices" in opts:  # a scalar where the device list should be
        cfg = tmp_path / "c.toml"
        cfg.write_text(f"devices = {toml_value(opts['devices'])}\n")
    else:
        cfg = write_config(tmp_path / "c.toml", devices, **opts)
    before = _mtimes(images)
    r = run_cli(["serve", "--config", str(cfg)], timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ivshmem-virtio: error: ") and needle in err, err
    assert _mtimes(images) == before


@pytest.mark.parametrize("text, needle", [
    ("[[devices]\ntype = 'blk'\n", "not valid TOML"),
    (None, "No such file"),
    (b"\xff\xfe", "not valid UTF-8"),
])
def test_unreadable_config(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    if isinstance(text, str):
        cfg.write_text(text)
    elif isinstance(text, bytes):
        cfg.write_bytes(text)
    r = run_cli(["serve", "--config", str(cfg)], timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert "--config" in err


def test_bus_that_cannot_open_fails_before_any_image(tmp_path, images):
    """Validation passed, but the CAN bus does not exist: exit 2 before any image is opened."""
    devices = [dict(d) for d in BASE]
    devices[2]["bus"] = "socketcan:nosuchcan0"
    for d in devices[:2]:
        d["image"] = images[d["image"]]
    cfg = write_config(tmp_path / "c.toml", devices)
    before = _mtimes(images)
    r = run_cli(["serve", "--config", str(cfg)], timeout=30)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert "devices[2].bus: socketcan:nosuchcan0: cannot open" in err, err
    assert _mtimes(images) == before


# -- pieces, in-process -----------------------------------------------------------------------

def test_sd_notify(tmp_path, monkeypatch):
    n = Notify(tmp_path / "n")
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(n.path))
        assert sd_notify("READY=1", "STATUS=ok")
        assert n.wait_for("READY=1") == ["READY=1\nSTATUS=ok"]
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not sd_notify("READY=1")  # outside systemd: nothing, no error
    finally:
        n.close()


def test_uio_links_resolve_through_sysfs(tmp_path):
    root = make_sysfs(tmp_path / "sys", [
        Fn("0000:01:0c.0", 0xFFC002, driver="uio_ivshmem", uio="uio0", msix=2),
        Fn("0000:01:0e.0", 0xFFC002, driver="uio_ivshmem", uio="uio3", msix=2),
        Fn("0000:01:0d.0", 0xFFC024, driver="uio_ivshmem", uio="uio1", msix=4),
        Fn("0000:01:0f.0", 0xFFC024),
    ])
    def resolve(link: str, dtype: str = "blk") -> str:
        from ivshmem_virtio.backend.config import DeviceConfig, parse_link_spec

        cfg = DeviceConfig("x", dtype, parse_link_spec(link, dtype, "link"), 256, "block", 0)
        return resolve_uio(cfg.link, str(root))

    assert resolve("uio:pci=0000:01:0c.0") == "/dev/uio0"
    assert resolve("uio:pci=01:0E.0") == "/dev/uio3"  # domain optional, case-insensitive
    assert resolve("uio:auto", "can") == "/dev/uio1"  # 01:0f.0 (unbound) does not count
    assert resolve("uio:protocol=0xC024", "can") == "/dev/uio1"
    with pytest.raises(LinkError, match="name one with uio:pci="):
        resolve("uio:auto")  # two blk backends
    with pytest.raises(LinkError, match="ivshmem-virtio bind"):
        resolve("uio:pci=0000:01:0f.0", "can")
    with pytest.raises(LinkError, match="no ivshmem PCI function"):
        resolve("uio:pci=0000:01:1f.0")
    with pytest.raises(LinkError, match="does not exist"):
        resolve("uio:/dev/uio-not-there")


def test_two_auto_links_of_one_type_are_ambiguous(tmp_path, image_factory):
    devices = [{"type": "blk", "link": "uio:auto", "image": image_factory(name="1.img")},
               {"type": "blk", "link": "uio:protocol=0xC002",
                "image": image_factory(name="2.img")}]
    with pytest.raises(ConfigError, match=r"devices\[1\]\.link: .*name the uio device by PCI"):
        parse_config({"devices": devices})


def test_udev_events_reach_the_right_slots(tmp_path):
    """``add`` retries every waiting uio device at once; ``remove`` stops the one it names."""
    from ivshmem_virtio.backend.config import DeviceConfig, parse_link_spec

    def slot(name: str, link: str) -> DeviceSlot:
        cfg = DeviceConfig(name, "blk", parse_link_spec(link, "blk", "link"), 256, "block", 0)
        s = DeviceSlot(cfg, daemon)
        daemon.slots[name] = s
        return s

    daemon = ServeDaemon("c.toml", parse_config({}), sysfs=str(tmp_path))
    u0, u1 = slot("u0", "uio:/dev/uio0"), slot("u1", "uio:pci=0000:01:0d.0")
    sim = slot("s", f"sim:{tmp_path}/x.sock")
    u0.devnode, u1.devnode = "/dev/uio0", "/dev/uio1"
    daemon._uio_event("remove", "/dev/uio1")
    assert u1._lost.is_set() and not u0._lost.is_set() and not sim._lost.is_set()
    daemon._uio_event("add", "/dev/uio7")
    assert u0._wake.is_set() and u1._wake.is_set() and not sim._wake.is_set()


# -- what ships: the sample config and the systemd unit ---------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_sample_config_is_valid(tmp_path):
    """packaging/config.toml parses as it is, once its image paths exist."""
    import tomllib

    data = tomllib.loads((ROOT / "packaging" / "config.toml").read_text())
    for d in data["devices"]:
        if "image" in d:
            path = tmp_path / Path(d["image"]).name
            with open(path, "wb") as f:
                f.truncate(MiB)
            d["image"] = str(path)
    config = parse_config(data)
    assert [d.type for d in config.devices].count("blk") == 2
    assert [d.type for d in config.devices].count("can") == 1
    assert all(d.link.kind == "uio" for d in config.devices)


def test_sample_config_passes_check():
    """A user's first check of the sample on a plain host passes: images that are not there yet
    are noted (the device waits for them), not errors; --file-only checks the file alone."""
    sample = str(ROOT / "packaging" / "config.toml")
    r = run_cli(["serve", "--config", sample, "--check"], timeout=30)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "OK, 3 device(s)" in out, out
    if not os.path.exists("/var/lib/ivshmem-virtio/rootfs.img"):
        assert "note: devices[0].image: /var/lib/ivshmem-virtio/rootfs.img: not there yet; " \
            "the device waits for it" in out, out
    r = run_cli(["serve", "--config", sample, "--check", "--file-only"], timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    assert "images not checked" in r.stdout.decode() and "note:" not in r.stdout.decode()


def test_sample_console_example_is_valid():
    """The commented console example of packaging/config.toml, uncommented, is a good device
    (checked as --file-only does: its socket's directory belongs to the target)."""
    import tomllib

    text = (ROOT / "packaging" / "config.toml").read_text()
    block = text[text.index('# [[devices]]\n# name = "console"'):]
    example = "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))
    data = tomllib.loads(text + "\n" + example + "\n")
    config = parse_config(data, host=False)
    con = config.device("console")
    assert con is not None and con.console is not None
    assert con.console.sink == "socket" and con.protocol == 0xC003


def _system_unit_dir() -> Path | None:
    for d in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (Path(d) / "multi-user.target").exists():
            return Path(d)
    return None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None or _system_unit_dir() is None,
                    reason="systemd-analyze not installed (apt-get install systemd)")
def test_systemd_unit_verifies_after_the_install_step(tmp_path):
    """`systemd-analyze verify` in a root where docs/deploy.md section 4 installed us: the venv's
    command, the unit in /etc/systemd/system; the system's own units copied beside it."""
    root = tmp_path / "root"
    units = _system_unit_dir()
    assert units is not None
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    venv_bin = root / "opt/ivshmem-virtio/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "ivshmem-virtio").write_text("#!/bin/sh\n")
    (venv_bin / "ivshmem-virtio").chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(ROOT / "packaging" / "ivshmem-virtio.service", root / "etc/systemd/system")

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run(["systemd-analyze", "verify", f"--root={root}",
                               "ivshmem-virtio.service"], capture_output=True, timeout=60)

    r = verify()
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    (venv_bin / "ivshmem-virtio").unlink()  # the check can fail: without the install step
    r = verify()
    assert r.returncode != 0 and b"/opt/ivshmem-virtio/bin/ivshmem-virtio" in r.stderr


def test_systemd_unit():
    """Type=notify with readiness from the daemon, restart on failure, reload by SIGHUP."""
    keys: dict[str, list[str]] = {}
    for line in (ROOT / "packaging" / "ivshmem-virtio.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    assert keys["Type"] == ["notify"] and keys["Restart"] == ["on-failure"]
    assert any(v.endswith("kill -HUP $MAINPID") for v in keys["ExecReload"])
    assert any(" serve --config " in v and "--check" not in v for v in keys["ExecStart"])
    assert keys["RestartPreventExitStatus"] == ["2"]


def test_serve_refuses_a_cpu_without_barriers(tmp_path, monkeypatch):
    """A weakly ordered CPU without libatomic: one clear error before any link is touched."""
    import argparse

    from ivshmem_virtio import shm
    from ivshmem_virtio.backend.serve import run_serve

    image = tmp_path / "d.img"
    with open(image, "wb") as f:
        f.truncate(MiB)
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f'[[devices]]\nname = "d"\ntype = "blk"\nlink = "sim:{tmp_path}/x.sock"\n'
                   f'image = "{image}"\n')
    monkeypatch.setattr(shm, "BARRIERS_EXACT", False)
    args = argparse.Namespace(config=str(cfg), check=False, sysfs="/sys")
    with pytest.raises(ConfigError, match="libatomic1"):
        run(run_serve(args, asyncio.Event()))


def test_poll_window_defaults_per_device_type():
    """Unset, each type has its own longest poll window (CAN frames paced every few hundred us
    need a longer one); the file's global spin_us applies to every device, a device's own wins."""
    devs = [{"type": "can", "link": "sim:/run/c.sock", "bus": "virtual:x"},
            {"type": "console", "link": "sim:/run/k.sock", "log_file": "/dev/null"},
            {"type": "can", "link": "sim:/run/d.sock", "bus": "virtual:y", "spin_us": 50}]
    got = [d.spin_us for d in parse_config({"devices": devs}).devices]
    assert got == [TYPE_SPIN_US["can"], SPIN_CAP_US, 50.0]
    got = [d.spin_us for d in parse_config({"spin_us": 0, "devices": devs}).devices]
    assert got == [0.0, 0.0, 50.0]
