"""CAN between a vhost-user front-end and an ivshmem front-end through one switch (issue 16).

One ``ivshmem-virtio can`` process serves an ivshmem link (``--link sim:...``) and a vhost-user
socket (``--vhost-user``) on the same CAN switch, its bus a ``sockbus`` the test watches. Two
python-can buses, ``interface="ivshmem"`` on ``channel="vhost-user:SOCKET"`` and on
``channel="sim:SOCKET"``, send each other classic, extended, FD and RTR frames.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import can
import pytest

from ivshmem_virtio.procs import Child, cli

from .can_helpers import (
    CAN_PROTOCOLS,
    RW_SIZE,
    Observer,
    SockBus,
    ensure_interfaces,
    msg,
    plugin_env,
    recv_all,
    same,
)


def _has_can_vhost_user() -> bool:
    out = subprocess.run(cli("can", "--help"), capture_output=True, text=True, timeout=60)
    return "--vhost-user" in out.stdout


@dataclass
class Stack:
    work: Path
    vhost_sock: str
    sim_sock: str
    backend: Child
    children: list[Child]

    @property
    def vhost_channel(self) -> str:
        return f"vhost-user:{self.vhost_sock}"

    @property
    def sim_channel(self) -> str:
        return f"sim:{self.sim_sock}"

    def observer(self) -> Observer:
        return Observer(SockBus(str(self.work / "bus"), faults=False))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not _has_can_vhost_user():
        pytest.skip("ivshmem-virtio can has no --vhost-user (the back-end's part of issue 16)")
    ensure_interfaces()
    work = tmp_path_factory.mktemp("vucan")
    (work / "bus").mkdir()
    sim_sock, vhost_sock = str(work / "l0.sock"), str(work / "vu.sock")
    children: list[Child] = []
    try:
        hub = Child("hub", cli("hub", "--socket", sim_sock, "--protocols", CAN_PROTOCOLS,
                               "--rw-size", hex(RW_SIZE)), work)
        children.append(hub)
        hub.wait_for("hub listening")
        backend = Child("can-backend", cli("can", "--link", f"sim:{sim_sock}", "--vhost-user",
                                           vhost_sock, "--bus", f"sockbus:{work / 'bus'}",
                                           "--fd"), work, env=plugin_env(work))
        children.append(backend)
        backend.wait_for("backend ready", 20)
        backend.wait_for("vhost-user back-end listening", 20)
        yield Stack(work, vhost_sock, sim_sock, backend, children)
        assert backend.stop(10) == 0, backend.log()
    finally:
        for c in reversed(children):
            c.stop(10)
    leftovers = [p.name for p in work.rglob("*") if p.suffix in (".sock", ".sk")]
    assert not leftovers, f"sockets left behind: {leftovers}"


def frames() -> list[can.Message]:
    """Classic (standard and extended ids), FD of every length class, RTR of every DLC."""
    out = [msg(0, b""), msg(0x123, bytes(range(8))), msg(0x7FF, b"\xff"),
           msg(0x555, b"ext", is_extended_id=True), msg(0x1FFFFFFF, b"max-id")]
    out += [msg(0x100 + n, bytes(range(n)), is_fd=True)
            for n in (0, 1, 7, 8, 12, 16, 20, 24, 32, 48, 64)]
    out += [msg(0x18DAF100 + n, bytes(reversed(range(n))), is_fd=True, is_extended_id=True)
            for n in (12, 64)]
    out += [msg(0x200 + d, is_remote_frame=True, dlc=d) for d in range(9)]
    out.append(msg(0x18DAF110, is_remote_frame=True, dlc=3))
    return out


def _open(channel: str) -> can.BusABC:
    return can.Bus(interface="ivshmem", channel=channel, fd=True, timeout=10.0)


def test_frames_cross_both_ways(stack: Stack) -> None:
    vu, sim = _open(stack.vhost_channel), _open(stack.sim_channel)
    observer = stack.observer()
    try:
        assert vu.channel_info.startswith("virtio-can over vhost-user:")
        sent = frames()
        for m in sent:
            vu.send(m)
        got = recv_all(sim, len(sent))
        for g, s in zip(got, sent, strict=True):
            assert same(g, s), f"{g} arrived for {s}"
        assert all(g.is_rx for g in got)
        back = [msg(m.arbitration_id ^ 1, bytes(m.data), is_fd=m.is_fd,
                    is_remote_frame=m.is_remote_frame, dlc=m.dlc,
                    is_extended_id=m.is_extended_id) for m in sent]
        for m in back:
            sim.send(m)
        got = recv_all(vu, len(back))
        for g, s in zip(got, back, strict=True):
            assert same(g, s), f"{g} arrived for {s}"
        # both directions reached the CAN bus behind the switch too, in order
        seen = observer.wait_messages(2 * len(sent))
        assert all(same(g, s) for g, s in zip(seen, sent + back, strict=True))
        assert vu.recv(0.2) is None and sim.recv(0.2) is None  # no echo to a sender
    finally:
        observer.close()
        vu.shutdown()
        sim.shutdown()


def test_order_under_load_and_reconnect(stack: Stack) -> None:
    """500 frames each way in order; then the vhost-user side hangs up and a new bus on the same
    socket (a fresh session: new memory table and rings) carries frames again."""
    sim = _open(stack.sim_channel)
    try:
        vu = _open(stack.vhost_channel)
        try:
            sent = [msg(i & 0x7FF, i.to_bytes(4, "little")) for i in range(500)]
            for m in sent:
                vu.send(m)
            assert [bytes(g.data) for g in recv_all(sim, 500)] == [bytes(s.data) for s in sent]
            for m in sent:
                sim.send(m)
            assert [bytes(g.data) for g in recv_all(vu, 500)] == [bytes(s.data) for s in sent]
        finally:
            vu.shutdown()
        time.sleep(0.1)
        vu = _open(stack.vhost_channel)
        try:
            fd = msg(0x321, bytes(range(64)), is_fd=True)
            vu.send(fd)
            got = sim.recv(10)
            assert got is not None and same(got, fd)
            sim.send(msg(0x322, b"again"))
            got = vu.recv(10)
            assert got is not None and bytes(got.data) == b"again"
        finally:
            vu.shutdown()
    finally:
        sim.shutdown()
    assert stack.backend.log().count("vhost-user front-end connected") >= 2
