"""The sim hub: owns one simulated ivshmem link (sim-link.md), never on the data path.

It creates the memfd and one eventfd per (peer, vector), hands them out over a UNIX stream socket
with QEMU ivshmem-server framing (int64 + optional SCM_RIGHTS fd), and plays the hypervisor's part
when a peer leaves: its state-table entry goes to 0 and vector 0 rings on every remaining peer.
QEMU's own peers (which send nothing) are served the version-0 greeting after 100 ms.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from dataclasses import dataclass, field

import structlog

from ..errors import ConfigError
from ..shm import Region, map_fd, memfd
from .sim import HUB_VERSION, I64

log = structlog.get_logger("ivshmem_virtio.hub")

QEMU_GRACE = 0.1
PAGE = 4096


@dataclass(frozen=True)
class Geometry:
    """One link's layout: ``[state table][R/W][output 0]..[output N-1]`` (Jailhouse's)."""

    max_peers: int = 2
    vectors: int = 2
    state_table_size: int = 0x1000
    rw_size: int = 0xDF000
    output_size: int = 0
    protocols: tuple[int, ...] = (0xC002, 0x8002)

    def validate(self) -> None:
        if not 2 <= self.max_peers <= 12:
            raise ConfigError(f"--max-peers {self.max_peers}: Jailhouse links have 2..12 peers")
        if not 1 <= self.vectors <= 16:
            raise ConfigError(f"--vectors {self.vectors}: must be 1..16 (MSI-X table limit)")
        for name, value in (("--state-table-size", self.state_table_size),
                            ("--rw-size", self.rw_size), ("--output-size", self.output_size)):
            if value < 0 or value % PAGE:
                raise ConfigError(f"{name} {value:#x}: must be a multiple of the 4 KiB page")
            if value > 1 << 32:
                raise ConfigError(f"{name} {value:#x}: larger than 4 GiB")
        if self.state_table_size < 4 * self.max_peers:
            raise ConfigError("--state-table-size: too small for one u32 per peer")
        if len(self.protocols) != self.max_peers:
            raise ConfigError(f"--protocols: need one value per peer ({self.max_peers}), "
                              f"got {len(self.protocols)}")
        for p in self.protocols:
            if not 0 <= p <= 0xFFFF:
                raise ConfigError(f"--protocols: {p:#x} is not a 16-bit value")

    @property
    def layout_size(self) -> int:
        return self.state_table_size + self.rw_size + self.max_peers * self.output_size

    @property
    def memfd_size(self) -> int:
        """QEMU maps the memory as a BAR, so the file is a power of two."""
        return 1 << (self.layout_size - 1).bit_length()


@dataclass
class _Peer:
    id: int
    sock: socket.socket
    eventfds: list[int] = field(default_factory=list)
    qemu: bool = False


class Hub:
    """Serve one link on a UNIX socket until :meth:`close`."""

    def __init__(self, socket_path: str, geometry: Geometry) -> None:
        geometry.validate()
        self.path = socket_path
        self.geo = geometry
        self.peers: dict[int, _Peer] = {}
        self._shm_fd = memfd("ivshmem-sim", geometry.memfd_size)
        self._mm = map_fd(self._shm_fd, geometry.layout_size)
        self.state_table = Region(self._mm, 0, geometry.state_table_size, "state table")
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()

    def _bind(self) -> socket.socket:
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                os.unlink(self.path)  # stale socket of a hub that died
            except OSError as e:
                raise ConfigError(f"--socket {self.path}: {e.strerror}") from e
            else:
                raise ConfigError(f"--socket {self.path}: in use by a running hub")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ConfigError(f"--socket {self.path}: {e.strerror}") from e
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def listen(self) -> None:
        """Bind the socket (a ConfigError here means nothing was served yet)."""
        if self._listener is None:
            self._listener = self._bind()

    async def serve(self) -> None:
        """Accept peers until cancelled."""
        self.listen()
        assert self._listener is not None
        g = self.geo
        log.info("hub listening", socket=self.path, max_peers=g.max_peers, vectors=g.vectors,
                 rw_size=hex(g.rw_size), output_size=hex(g.output_size),
                 protocols=",".join(f"{p:#06x}" for p in g.protocols))
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn, _ = await loop.sock_accept(self._listener)
                conn.setblocking(False)
                task = asyncio.create_task(self._serve_peer(conn))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            self.close()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for peer in list(self.peers.values()):
            self._drop(peer, notify=False)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._shm_fd >= 0:
            os.close(self._shm_fd)
            self._shm_fd = -1

    # -- one peer -----------------------------------------------------------------------------
    async def _serve_peer(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            try:
                data = await asyncio.wait_for(self._recv_exact(conn, 8), QEMU_GRACE)
                requested, qemu = I64.unpack(data)[0], False
            except TimeoutError:
                requested, qemu = -1, True
            peer = self._admit(conn, requested, qemu)
            if peer is None:
                return
            # a registered peer never speaks again: EOF or any byte ends it (QEMU server style)
            await loop.sock_recv(conn, 1)
            self._drop(peer, notify=True)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            for peer in list(self.peers.values()):
                if peer.sock is conn:
                    self._drop(peer, notify=True)
        finally:
            conn.close()

    async def _recv_exact(self, conn: socket.socket, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        buf = b""
        while len(buf) < n:
            chunk = await loop.sock_recv(conn, n - len(buf))
            if not chunk:
                raise asyncio.IncompleteReadError(buf, n)
            buf += chunk
        return buf

    def _send(self, conn: socket.socket, value: int, fd: int | None = None) -> None:
        data = I64.pack(value)
        if fd is None:
            conn.sendall(data)
        else:
            socket.send_fds(conn, [data], [fd])

    def _admit(self, conn: socket.socket, requested: int, qemu: bool) -> _Peer | None:
        g = self.geo
        version = 0 if qemu else HUB_VERSION
        if requested == -1:
            free = [i for i in range(g.max_peers) if i not in self.peers]
            pid = free[0] if free else -errno.EBUSY
        elif not 0 <= requested < g.max_peers:
            pid = -errno.EINVAL
        elif requested in self.peers:
            pid = -errno.EBUSY
        else:
            pid = requested
        self._send(conn, version)
        self._send(conn, pid)
        if pid < 0:
            log.warning("peer refused", requested=requested, error=os.strerror(-pid))
            return None
        peer = _Peer(pid, conn, [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                                 for _ in range(g.vectors)], qemu)
        # tell the others first, so our doorbells to them find their join message queued
        for other in self.peers.values():
            self._send_fds_of(other.sock, peer)
        self.peers[pid] = peer
        self._send(conn, -1, self._shm_fd)
        if not qemu:
            for value in (g.max_peers, g.vectors, g.state_table_size, g.rw_size,
                          g.output_size, g.protocols[pid]):
                self._send(conn, value)
        for other in sorted(self.peers.values(), key=lambda p: p.id == pid):
            self._send_fds_of(conn, other)
        log.info("peer joined", id=pid, qemu=qemu)
        return peer

    def _send_fds_of(self, conn: socket.socket, peer: _Peer) -> None:
        try:
            for fd in peer.eventfds:
                self._send(conn, peer.id, fd)
        except OSError as e:
            log.warning("cannot reach peer", error=str(e))

    def _drop(self, peer: _Peer, notify: bool) -> None:
        if self.peers.get(peer.id) is not peer:
            return
        del self.peers[peer.id]
        self.state_table.set_u32(4 * peer.id, 0)
        if notify:
            for other in self.peers.values():
                try:
                    os.write(other.eventfds[0], (1).to_bytes(8, "little"))
                except BlockingIOError:
                    pass
            for other in self.peers.values():
                try:
                    self._send(other.sock, peer.id)
                except OSError:
                    pass
            log.info("peer left", id=peer.id)
        for fd in peer.eventfds:
            os.close(fd)
        peer.eventfds.clear()


class HubThread:
    """A hub on its own thread and event loop: for in-process tests and tools.

    Peers connect synchronously, so a hub must never share an event loop with them.
    """

    def __init__(self, socket_path: str, geometry: Geometry) -> None:
        import threading

        self.hub = Hub(socket_path, geometry)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ivshmem-hub", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            try:
                self.hub.listen()
            except BaseException as e:
                self._error = e
                self._ready.set()
                return
            self._ready.set()
            await self.hub.serve()

        try:
            asyncio.run(main())
        except BaseException:  # noqa: BLE001 - cancellation at stop
            pass

    def __enter__(self) -> HubThread:
        self._thread.start()
        self._ready.wait(5)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)


async def run_hub(socket_path: str, geometry: Geometry, stop: asyncio.Event) -> int:
    """``ivshmem-virtio hub``: serve until SIGTERM/SIGINT, then remove the socket."""
    hub = Hub(socket_path, geometry)
    try:
        hub.listen()
    except BaseException:
        hub.close()
        raise
    task = asyncio.create_task(hub.serve())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    for t in (task, stopper):
        t.cancel()
    for t in (task, stopper):
        try:
            await t
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass
    hub.close()
    if task in done and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    log.info("hub stopped", socket=socket_path)
    return 0
