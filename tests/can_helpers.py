"""Shared pieces of the virtio-can tests: a cross-process test bus, the stacks, the plugin.

* :class:`SockBus`: a python-can interface over UNIX datagram sockets in one directory. Every
  bus on the directory hears every other one, across processes, reliably and in order (the
  kernel blocks a sender instead of dropping), and it has a real ``fileno()``. The backend
  process opens it through ``--bus sockbus:DIR`` like any installed interface, and the test
  process watches and feeds the same bus. Files ``DIR/hold`` and ``DIR/fail`` make the backend's
  ``send`` wait or raise: a bus error on demand, for the bus-off flow.
* :class:`GateBus`: python-can's ``virtual`` bus whose ``send`` can be held or made to fail, for
  the in-process backend.
* :class:`ProcStack` / :func:`inprocess_stack`: hubs + ``ivshmem-virtio can`` as processes, or
  hub threads + the backend on the test's own loop.
* :func:`plugin_env` / :func:`ensure_interfaces`: make the ``can.interface`` entry points
  (``ivshmem`` from pyproject, ``sockbus`` for the tests) visible without installing the project.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import socket
import struct
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import can
from can import BusABC, CanOperationError
from can.interfaces.virtual import VirtualBus

from ivshmem_virtio.backend.devices.can_backend import CanBackend
from ivshmem_virtio.backend.resources.canbus import CanBusBridge
from ivshmem_virtio.backend.runner import LinkRunner
from ivshmem_virtio.frontend.can import CanDriver
from ivshmem_virtio.ivshmem.hub import Geometry, HubThread
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.procs import Child, cli
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec.can import CanFrame

ROOT = Path(__file__).resolve().parent.parent
CAN_PROTOCOLS = (f"{wire.IVSHMEM_PROTOCOL_CAN_BACKEND:#06x},"
                 f"{wire.IVSHMEM_PROTOCOL_CAN_FRONTEND:#06x}")
RW_SIZE = 0x40000
TEST_INTERFACES = {"sockbus": ("tests.can_helpers", "SockBus")}


# --- the python-can entry points ----------------------------------------------------------------
def declared_interfaces() -> dict[str, tuple[str, str]]:
    """The ``can.interface`` entry points pyproject.toml declares."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = data["project"]["entry-points"]["can.interface"]
    return {name: tuple(value.split(":", 1)) for name, value in eps.items()}  # type: ignore[misc]


def plugin_env(work: Path) -> dict[str, str]:
    """Environment for a child process that sees our entry points as if the project were installed.

    A minimal ``*.dist-info`` with ``entry_points.txt`` on PYTHONPATH is all importlib.metadata
    needs; an installed project simply provides the same entries again.
    """
    dist = work / "ep" / "ivshmem_virtio_test_entry_points-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ivshmem-virtio-test-entry-points"
                                   "\nVersion: 0\n")
    entries = {**declared_interfaces(), **TEST_INTERFACES}
    (dist / "entry_points.txt").write_text(
        "[can.interface]\n" + "".join(f"{k} = {m}:{c}\n" for k, (m, c) in entries.items()))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(work / "ep"), env.get("PYTHONPATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def ensure_interfaces() -> None:
    """Register our interfaces in this process if the entry points are not installed.

    python-can reads the entry points once, at import; a test process that imported it before
    seeing them gets the same table entries patched in.
    """
    import can.interfaces
    import can.util

    entries = {**declared_interfaces(), **TEST_INTERFACES}
    missing = {k: v for k, v in entries.items() if k not in can.interfaces.BACKENDS}
    if not missing:
        return
    can.interfaces.BACKENDS.update(missing)
    valid = frozenset(can.interfaces.BACKENDS)
    for mod in (can, can.interfaces, can.util):
        mod.VALID_INTERFACES = valid  # type: ignore[attr-defined]


# --- a cross-process bus for the tests -----------------------------------------------------------
_MSG = struct.Struct("<IBB")  # arbitration id, flags, dlc; then the data bytes
_EXT, _RTR, _FD, _ERR = 1, 2, 4, 8
_counter = itertools.count()


class SockBus(BusABC):
    """Test interface ``sockbus``: every bus on directory ``channel`` hears every other one."""

    def __init__(self, channel: str, can_filters: Any = None, *, faults: bool = True,
                 **kwargs: Any) -> None:
        self.dir = Path(str(channel))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.faults = faults
        self.path = self.dir / f"{os.getpid()}-{next(_counter)}.sk"
        # two sockets: the receiver stays non-blocking (select for timeouts) while a sender in
        # another thread blocks on a full peer, which is what makes the bus lossless
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.channel_info = f"sockbus {self.dir}"
        self._can_protocol = can.CanProtocol.CAN_FD
        super().__init__(channel=channel, can_filters=can_filters, **kwargs)

    def _peers(self) -> list[str]:
        return [str(self.dir / n) for n in os.listdir(self.dir)
                if n.endswith(".sk") and n != self.path.name]

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        if self.faults:
            while (self.dir / "hold").exists() and not (self.dir / "fail").exists():
                time.sleep(0.002)
            if (self.dir / "fail").exists():
                raise CanOperationError("injected bus error")
        flags = ((_EXT if msg.is_extended_id else 0) | (_RTR if msg.is_remote_frame else 0)
                 | (_FD if msg.is_fd else 0) | (_ERR if msg.is_error_frame else 0))
        packet = _MSG.pack(msg.arbitration_id, flags, msg.dlc) + bytes(msg.data or b"")
        for peer in self._peers():
            with contextlib.suppress(FileNotFoundError, ConnectionRefusedError):
                self.tx.sendto(packet, peer)  # blocks while the peer's queue is full

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if timeout != 0:
            select.select([self.sock], [], [], timeout)
        try:
            packet = self.sock.recv(_MSG.size + 64)
        except BlockingIOError:
            return None, False
        can_id, flags, dlc = _MSG.unpack_from(packet)
        msg = can.Message(timestamp=time.time(), arbitration_id=can_id,
                          is_extended_id=bool(flags & _EXT), is_remote_frame=bool(flags & _RTR),
                          is_fd=bool(flags & _FD), is_error_frame=bool(flags & _ERR), dlc=dlc,
                          data=packet[_MSG.size:], channel=str(self.dir))
        return msg, False

    def fileno(self) -> int:
        return self.sock.fileno()

    def shutdown(self) -> None:
        super().shutdown()
        self.sock.close()
        self.tx.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Observer:
    """A bus drained by a thread into a list, so a blocking sender never waits on the test."""

    def __init__(self, bus: BusABC) -> None:
        self.bus = bus
        self.msgs: list[can.Message] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            msg = self.bus.recv(0.05)
            if msg is not None:
                with self._cond:
                    self.msgs.append(msg)
                    self._cond.notify_all()

    def frames(self) -> list[CanFrame]:
        with self._cond:
            return [wire.frame_from_message(m) for m in self.msgs]

    def wait_messages(self, n: int, timeout: float = 20.0) -> list[can.Message]:
        """The first ``n`` (or more) messages seen, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.msgs) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"bus saw {len(self.msgs)} of {n} frames")
                self._cond.wait(left)
            return list(self.msgs)

    def wait_count(self, n: int, timeout: float = 20.0) -> list[CanFrame]:
        return [wire.frame_from_message(m) for m in self.wait_messages(n, timeout)]

    async def await_count(self, n: int, timeout: float = 20.0) -> list[CanFrame]:
        return await asyncio.get_running_loop().run_in_executor(None, self.wait_count, n,
                                                                timeout)

    def send(self, frame: CanFrame) -> None:
        self.bus.send(wire.frame_to_message(frame, is_rx=False))

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.bus.shutdown()


class GateBus(VirtualBus):
    """``virtual`` with a hand on ``send``: ``gate`` cleared holds it, ``fail`` makes it raise."""

    def __init__(self, channel: str, **kwargs: Any) -> None:
        super().__init__(channel=channel, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.sending = threading.Event()  # set while a send waits at the gate

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.sending.set()
        self.gate.wait(30)
        self.sending.clear()
        if self.fail:
            raise CanOperationError("injected bus error")
        super().send(msg, timeout)


# --- stacks --------------------------------------------------------------------------------------
@dataclass
class ProcStack:
    """Hubs and one ``ivshmem-virtio can`` backend, as processes; ended by pid."""

    work: Path
    nlinks: int
    backend_args: tuple[str, ...] = ("--fd",)
    children: list[Child] = field(default_factory=list)
    socks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bus_dir = self.work / "bus"
        self.bus_dir.mkdir(exist_ok=True)
        self.env = plugin_env(self.work)

    @property
    def links(self) -> list[str]:
        return [f"sim:{s}" for s in self.socks]

    def start(self) -> ProcStack:
        hubs = []
        for i in range(self.nlinks):
            sock = str(self.work / f"l{i}.sock")
            self.socks.append(sock)
            hub = Child(f"hub{i}", cli("hub", "--socket", sock, "--protocols", CAN_PROTOCOLS,
                                       "--rw-size", hex(RW_SIZE)), self.work)
            self.children.append(hub)
            hubs.append(hub)
        for hub in hubs:
            hub.wait_for("hub listening")
        link_args = [a for link in self.links for a in ("--link", link)]
        self.backend = Child("can-backend", cli("can", *link_args, "--bus",
                                                f"sockbus:{self.bus_dir}", *self.backend_args),
                             self.work, env=self.env)
        self.children.append(self.backend)
        self.wait_ready(self.nlinks)
        return self

    def wait_ready(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.backend.log().count("backend ready") < n:
            if self.backend.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"backend not ready:\n{self.backend.log()}")
            time.sleep(0.02)

    def observer(self) -> Observer:
        return Observer(SockBus(str(self.bus_dir), faults=False))

    def fault(self, name: str, on: bool) -> None:
        path = self.bus_dir / name
        if on:
            path.touch()
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def stop(self) -> dict[str, int]:
        codes = {c.name: c.stop(10) for c in reversed(self.children)}
        leftovers = [p.name for p in self.work.iterdir() if p.suffix == ".sock"]
        leftovers += [p.name for p in self.bus_dir.iterdir() if p.suffix == ".sk"]
        assert not leftovers, f"sockets left behind: {leftovers}"
        return codes


@contextlib.contextmanager
def proc_stack(work: Path, nlinks: int, *backend_args: str) -> Iterator[ProcStack]:
    stack = ProcStack(work, nlinks, tuple(backend_args) or ("--fd",))
    try:
        yield stack.start()
    finally:
        codes = stack.stop()
        assert codes.get("can-backend") == 0, stack.backend.log()


async def frontend(link: str, **kw: Any) -> CanDriver:
    """A started CanDriver on ``link`` (``sim:SOCKET``)."""
    kw.setdefault("mode", "block")
    kw.setdefault("timeout", 10.0)
    drv = CanDriver(SimIvshmem(link.removeprefix("sim:"), 1), **kw)
    try:
        await drv.start(10.0)
    except BaseException:
        await close_frontend(drv)
        raise
    return drv


async def close_frontend(drv: CanDriver) -> None:
    await drv.close()
    drv.dev.close()


@contextlib.asynccontextmanager
async def frontends(*specs: tuple[str, dict[str, Any]]) -> AsyncIterator[list[CanDriver]]:
    drivers: list[CanDriver] = []
    try:
        for link, kw in specs:
            drivers.append(await frontend(link, **kw))
        yield drivers
    finally:
        for d in drivers:
            await close_frontend(d)


@dataclass
class InProc:
    backend: CanBackend
    runners: list[LinkRunner]
    links: list[str]
    bus: BusABC


@contextlib.asynccontextmanager
async def inprocess_stack(work: Path, nlinks: int, bus: BusABC, *,
                          features: int = wire.F_ALL) -> AsyncIterator[InProc]:
    """Hub threads + the backend's runners on this loop, bridged to ``bus``."""
    geo = Geometry(vectors=2, rw_size=RW_SIZE, protocols=(wire.IVSHMEM_PROTOCOL_CAN_BACKEND,
                                                          wire.IVSHMEM_PROTOCOL_CAN_FRONTEND))
    socks = [str(work / f"t{i}.sock") for i in range(nlinks)]
    with contextlib.ExitStack() as stack:
        for s in socks:
            stack.enter_context(HubThread(s, geo))
        backend = CanBackend(CanBusBridge(bus), features=features)
        devs, runners, tasks = [], [], []
        try:
            for s in socks:
                dev = SimIvshmem(s, 0)
                devs.append(dev)
                svc = backend.add_link(f"sim:{s}")
                runner = LinkRunner(dev, svc, mode="block", workers=1)
                svc.bind(runner)
                runners.append(runner)
                tasks.append(asyncio.create_task(runner.run()))
            backend.start()
            yield InProc(backend, runners, [f"sim:{s}" for s in socks], bus)
        finally:
            for r in runners:
                r.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            backend.close()
            for d in devs:
                d.close()


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


async def recv_n(drv: CanDriver, n: int, timeout: float = 20.0) -> list[CanFrame]:
    return [(await asyncio.wait_for(drv.recv(), timeout)).frame for _ in range(n)]


async def assert_silent(drv: CanDriver, wait: float = 0.1) -> None:
    """Nothing queued for ``drv`` (after letting in-flight deliveries land)."""
    await asyncio.sleep(wait)
    assert drv.rx.empty(), f"unexpected frame {drv.rx.get_nowait()}"


# -- python-can messages ---------------------------------------------------------------------
def msg(can_id: int, data: bytes = b"", **kw: object) -> can.Message:
    kw.setdefault("is_extended_id", can_id > 0x7FF)
    return can.Message(arbitration_id=can_id, data=data, **kw)


def same(a: can.Message, b: can.Message) -> bool:
    return (a.arbitration_id, a.is_extended_id, a.is_remote_frame, a.is_fd, a.dlc,
            bytes(a.data)) == (b.arbitration_id, b.is_extended_id, b.is_remote_frame, b.is_fd,
                               b.dlc, bytes(b.data))


def recv_all(bus: BusABC, n: int, timeout: float = 10.0) -> list[can.Message]:
    """``n`` frames from ``bus``, each within ``timeout``: a missing one fails the test."""
    out = []
    for _ in range(n):
        m = bus.recv(timeout)
        assert m is not None, f"only {len(out)} of {n} frames arrived"
        out.append(m)
    return out
