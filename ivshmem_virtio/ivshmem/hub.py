"""The sim hub: owns one simulated ivshmem link (sim-link.md), never on the data path.

It creates the memfd and one eventfd per (peer, vector), hands them out over a UNIX stream socket
with QEMU ivshmem-server framing (int64 + optional SCM_RIGHTS fd), and plays the hypervisor's part
when a peer leaves: its state-table entry goes to 0 and vector 0 rings on every remaining peer.

Access: the socket appears 0600 (0660 with a group) without ever being more open, and every
connection is checked with SO_PEERCRED against :class:`Access` before it gets anything. QEMU's
own peers (which send nothing) are served the version-0 greeting after 100 ms, but only on the
IDs the operator set aside for them; elsewhere a peer that stays silent is dropped, so a stray
connection cannot occupy the backend's ID. Join/leave/refusal lines are rate-limited per key.
"""

from __future__ import annotations

import asyncio
import errno
import grp
import os
import pwd
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from ..errors import ConfigError
from ..shm import Region, map_fd, memfd
from .sim import HUB_VERSION, I64

log = structlog.get_logger("ivshmem_virtio.hub")

QEMU_GRACE = 0.1  # sim-link.md: a peer silent this long is a QEMU peer (where allowed)
HELLO_TIMEOUT = 2.0  # a native peer sends its ID at once; a silent one is dropped after this
PAGE = 4096
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Access:
    """Who may join a hub: the socket's mode and the SO_PEERCRED check of every connection.

    The owner (the hub's own uid unless told otherwise) and root are always admitted. With a
    ``group`` the socket is 0660 and owned by that group, and the group's members are admitted;
    ``allow_uids`` admits further users by uid (the socket mode must then let them connect).
    """

    owner_uid: int = field(default_factory=os.geteuid)
    group: int | None = None
    allow_uids: frozenset[int] = frozenset()

    @property
    def mode(self) -> int:
        return 0o660 if self.group is not None else 0o600

    def admits(self, uid: int, gid: int) -> bool:
        if uid in (0, self.owner_uid) or uid in self.allow_uids:
            return True
        if self.group is None:
            return False
        if gid == self.group:
            return True
        try:  # supplementary membership: SO_PEERCRED carries only the primary gid
            user = pwd.getpwuid(uid)
            return user.pw_gid == self.group or user.pw_name in grp.getgrgid(self.group).gr_mem
        except KeyError:
            return False


def group_id(name: str) -> int:
    """gid of a group given by name or number (``--group``), or a ConfigError."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError(f"--group {name}: no such group") from None


def user_id(name: str) -> int:
    """uid of a user given by name or number (``--allow-uid``), or a ConfigError."""
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ConfigError(f"--allow-uid {name}: no such user") from None


class LogLimiter:
    """Fixed-window rate limit per key for log lines a peer can trigger (Firecracker's rule).

    A peer reconnecting in a loop must not flood the log: per key, ``burst`` lines per
    ``window`` seconds pass; the rest are counted and the count rides on the next line let
    through (``suppressed=N``).
    """

    def __init__(self, burst: int = 5, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self._clock = clock
        self._state: dict[object, list[float]] = {}  # key -> [window start, lines, suppressed]

    def allow(self, key: object) -> int | None:
        """None: drop this line; else the number of lines dropped for key since the last one."""
        now = self._clock()
        st = self._state.get(key)
        if st is None or now - st[0] >= self.window:
            st = self._state[key] = [now, 0, st[2] if st else 0]  # keys: a few per peer ID
        if st[1] >= self.burst:
            st[2] += 1
            return None
        st[1] += 1
        dropped, st[2] = int(st[2]), 0
        return dropped


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


def bind_unix(path: str, mode: int = 0o600, gid: int | None = None,
              what: str = "server") -> socket.socket:
    """A listening UNIX socket at path with exactly ``mode``, never more open in between.

    A socket file left by a process that died is replaced; a live one is a ConfigError. The
    socket is bound in a fresh 0700 directory beside path, gets its mode and group there and is
    then hard-linked into place: nobody else can enter that directory, and link() (unlike
    rename()) fails rather than replace a path that another process bound meanwhile. The
    umask plays no part, and no process-wide state (umask, cwd) is touched, so it is
    thread-safe.
    """
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale socket of a process that died
        except OSError as e:
            raise ConfigError(f"--socket {path}: {e.strerror}") from e
        else:
            raise ConfigError(f"--socket {path}: in use by a running {what}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        private = tempfile.mkdtemp(prefix=".sock", dir=os.path.dirname(os.path.abspath(path)))
        tmp = os.path.join(private, "s")
        try:
            if len(os.fsencode(tmp)) > 107:
                raise OSError(errno.ENAMETOOLONG, "path too long for a UNIX socket (it is "
                              "bound first in a private directory beside it: 13 more bytes)")
            sock.bind(tmp)
            if gid is not None:
                os.chown(tmp, -1, gid)
            os.chmod(tmp, mode)
            os.link(tmp, path)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            os.rmdir(private)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--socket {path}: {e.strerror}") from e
    sock.setblocking(False)
    return sock


@dataclass
class _Peer:
    id: int
    sock: socket.socket
    eventfds: list[int] = field(default_factory=list)
    qemu: bool = False


class Hub:
    """Serve one link on a UNIX socket until :meth:`close`."""

    def __init__(self, socket_path: str, geometry: Geometry, access: Access | None = None,
                 qemu_ids: tuple[int, ...] = (), limiter: LogLimiter | None = None) -> None:
        geometry.validate()
        for i in qemu_ids:
            if not 0 <= i < geometry.max_peers:
                raise ConfigError(f"--qemu-peers: ID {i} is not in 0..{geometry.max_peers - 1}")
        self.path = socket_path
        self.geo = geometry
        self.access = access if access is not None else Access()
        self.qemu_ids = tuple(sorted(set(qemu_ids)))
        self.limiter = limiter if limiter is not None else LogLimiter()
        self.peers: dict[int, _Peer] = {}
        self._shm_fd = memfd("ivshmem-sim", geometry.memfd_size)
        self._mm = map_fd(self._shm_fd, geometry.layout_size)
        self.state_table = Region(self._mm, 0, geometry.state_table_size, "state table")
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _bind(self) -> socket.socket:
        return bind_unix(self.path, self.access.mode, self.access.group, what="hub")

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
                 protocols=",".join(f"{p:#06x}" for p in g.protocols),
                 mode=oct(self.access.mode), group=self.access.group,
                 qemu_ids=",".join(map(str, self.qemu_ids)) or None)
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
            allowed, who = self._check_peer(conn)
            hello = await self._hello(conn, QEMU_GRACE if self.qemu_ids and allowed
                                      else HELLO_TIMEOUT)
            if not allowed:
                self._refuse(conn, hello, -errno.EACCES, f"{who} may not join this link")
                return
            if hello is None and not self.qemu_ids:
                self._log("refused", "warning", "peer refused",
                          reason=f"sent no ID within {HELLO_TIMEOUT:g} s (QEMU peers need "
                          "--qemu-peers)", peer=who)
                return
            peer = self._admit(conn, -1 if hello is None else hello, hello is None, who)
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

    def _check_peer(self, conn: socket.socket) -> tuple[bool, str]:
        """SO_PEERCRED against the access policy: (admitted, "uid U pid P") for log lines."""
        pid, uid, gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         _PEERCRED.size))
        return self.access.admits(uid, gid), f"uid {uid} pid {pid}"

    async def _hello(self, conn: socket.socket, timeout: float) -> int | None:
        """The peer's requested ID, or None when it stayed silent for ``timeout``."""
        try:
            data = await asyncio.wait_for(self._recv_exact(conn, 8), timeout)
        except TimeoutError:
            return None
        peer_id: int = I64.unpack(data)[0]
        return peer_id

    def _refuse(self, conn: socket.socket, hello: int | None, error: int, reason: str) -> None:
        """Answer in the peer's own dialect (version, then a negative errno) and log once."""
        self._send(conn, 0 if hello is None else HUB_VERSION)
        self._send(conn, error)
        self._log("refused", "warning", "peer refused", reason=reason, error=os.strerror(-error))

    def _log(self, key: object, level: str, event: str, **kw: object) -> None:
        dropped = self.limiter.allow(key)
        if dropped is None:
            return
        if dropped:
            kw["suppressed"] = dropped
        getattr(log, level)(event, **kw)

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

    def _admit(self, conn: socket.socket, requested: int, qemu: bool,
               who: str = "") -> _Peer | None:
        g = self.geo
        version = 0 if qemu else HUB_VERSION
        if requested == -1:
            # a QEMU peer only ever gets an ID set aside for QEMU peers
            free = [i for i in (self.qemu_ids if qemu else range(g.max_peers))
                    if i not in self.peers]
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
            self._log("refused", "warning", "peer refused", requested=requested,
                      error=os.strerror(-pid), peer=who)
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
        self._log(("join", pid), "info", "peer joined", id=pid, qemu=qemu, peer=who)
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
            self._log(("leave", peer.id), "info", "peer left", id=peer.id)
        for fd in peer.eventfds:
            os.close(fd)
        peer.eventfds.clear()


class HubThread:
    """A hub on its own thread and event loop: for in-process tests and tools.

    Peers connect synchronously, so a hub must never share an event loop with them.
    """

    def __init__(self, socket_path: str, geometry: Geometry, **options: object) -> None:
        import threading

        # options: Hub's keyword arguments, passed through unchecked
        self.hub = Hub(socket_path, geometry, **options)  # type: ignore[arg-type]
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[object] | None = None
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


async def run_hub(socket_path: str, geometry: Geometry, stop: asyncio.Event,
                  access: Access | None = None, qemu_ids: tuple[int, ...] = ()) -> int:
    """``ivshmem-virtio hub``: serve until SIGTERM/SIGINT, then remove the socket."""
    hub = Hub(socket_path, geometry, access, qemu_ids)
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
    exc = task.exception() if task in done else None
    if exc is not None:
        raise exc
    log.info("hub stopped", socket=socket_path)
    return 0
