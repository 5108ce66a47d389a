"""A peer of the simulated ivshmem link (sim-link.md): memfd memory, eventfd doorbells.

The hub hands out the shared memory and every peer's eventfds over a UNIX socket; from then on
the peer emulates the ivshmem 2.0 registers locally: DOORBELL writes the target's eventfd,
STATE stores into the state table and rings vector 0 of the others, INT_CONTROL is a local flag
that drops interrupts arriving while it is 0, exactly as Jailhouse behaves.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

import structlog

from ..errors import LinkError
from ..shm import Region, map_fd
from .base import IvshmemDevice

log = structlog.get_logger("ivshmem_virtio.sim")

HUB_VERSION = 2  # sim-link.md: the hub's protocol version (QEMU's server sends 0)
I64 = struct.Struct("<q")  # every hub message: one little-endian int64 (+ maybe one fd)
_ONE = (1).to_bytes(8, "little")


def _read_eventfd(fd: int) -> int:
    """Consume an eventfd's pending count (0 when nothing is pending or the fd is gone)."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except OSError:  # BlockingIOError included
        return 0


def _recv_msg(sock: socket.socket, deadline: float) -> tuple[int, int | None]:
    """Read one hub message (an int64, maybe with one fd) before ``deadline``."""
    buf = b""
    fd: int | None = None
    while len(buf) < 8:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 8 - len(buf), 1)
        except TimeoutError:
            raise LinkError("timed out waiting for the ivshmem hub") from None
        if fds:
            if fd is not None:
                os.close(fd)
            fd = fds[0]
        if not data:
            raise LinkError("the ivshmem hub closed the connection")
        buf += data
    return I64.unpack(buf)[0], fd


class SimIvshmem(IvshmemDevice):
    """A connected sim-link peer."""

    def __init__(self, socket_path: str, requested_id: int = -1, timeout: float = 5.0) -> None:
        self.name = f"sim:{socket_path}"
        self._peers: dict[int, list[int]] = {}
        self._int_control = False
        self._rxbuf = b""
        self._rxfd: int | None = None
        self._hub_open = True
        self._seen_state: dict[int, int] = {}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path)
        except OSError as e:
            sock.close()
            raise LinkError(f"cannot reach the ivshmem hub at {socket_path}: {e.strerror}") from e
        self._sock = sock
        try:
            self._handshake(requested_id, time.monotonic() + timeout)
        except BaseException:
            self.close()
            raise
        sock.setblocking(False)

    def _handshake(self, requested_id: int, deadline: float) -> None:
        sock = self._sock
        sock.sendall(I64.pack(requested_id))
        version, _ = _recv_msg(sock, deadline)
        if version != HUB_VERSION:
            raise LinkError(f"ivshmem hub speaks protocol version {version}, not {HUB_VERSION}")
        own, _ = _recv_msg(sock, deadline)
        if own < 0:
            reason = {-errno.EBUSY: "that ID is taken", -errno.EINVAL: "ID out of range"}
            raise LinkError(f"ivshmem hub refused ID {requested_id}: "
                            f"{reason.get(own, os.strerror(-own))}")
        marker, shm_fd = _recv_msg(sock, deadline)
        if marker != -1 or shm_fd is None:
            raise LinkError("ivshmem hub sent no shared memory")
        geometry = [_recv_msg(sock, deadline)[0] for _ in range(6)]
        max_peers, vectors, st_size, rw_size, out_size, protocol = geometry
        self.id, self.max_peers, self.vectors, self.protocol = own, max_peers, vectors, protocol
        layout = st_size + rw_size + max_peers * out_size
        if not (0 < vectors and 0 <= own < max_peers and st_size >= 4 * max_peers
                and rw_size >= 0 and out_size >= 0):
            os.close(shm_fd)
            raise LinkError(f"ivshmem hub sent impossible geometry {geometry}")
        try:
            if os.fstat(shm_fd).st_size < layout:
                raise LinkError("ivshmem hub's shared memory is smaller than its layout")
            self._mm = map_fd(shm_fd, layout)
        finally:
            os.close(shm_fd)
        self.state_table = Region(self._mm, 0, st_size, "state table")
        self.rw = Region(self._mm, st_size, rw_size, "R/W section")
        self.output_size = out_size
        self.outputs = [Region(self._mm, st_size + rw_size + i * out_size, out_size,
                               f"output section {i}") for i in range(max_peers)]
        # eventfds: every connected peer's, then our own last
        while len(self._peers.get(own, [])) < vectors:
            pid, fd = _recv_msg(sock, deadline)
            self._on_message(pid, fd)

    # -- hub messages after the handshake ---------------------------------------------------
    def hub_fileno(self) -> int:
        return self._sock.fileno()

    def process_hub_messages(self) -> None:
        """Apply pending join/leave messages without blocking."""
        while self._hub_open:
            try:
                data, fds, _f, _a = socket.recv_fds(self._sock, 8 - len(self._rxbuf), 1,
                                                    socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("hub connection failed", link=self.name, error=str(e))
                return
            if fds:
                self._rxfd = fds[0]
            if not data:
                # hub gone: the link keeps working with the fds we hold, but joins are over
                if self._hub_open:
                    log.warning("ivshmem hub connection closed", link=self.name)
                self._hub_open = False
                self.fd_epoch += 1
                return
            self._rxbuf += data
            if len(self._rxbuf) == 8:
                value = I64.unpack(self._rxbuf)[0]
                fd, self._rxbuf, self._rxfd = self._rxfd, b"", None
                self._on_message(value, fd)

    def _on_message(self, peer: int, fd: int | None) -> None:
        if peer == self.id:
            self.fd_epoch += 1  # our own vectors (never re-sent today; kept honest anyway)
        if fd is None:
            for old in self._peers.pop(peer, []):
                os.close(old)
            return
        fds = self._peers.setdefault(peer, [])
        if len(fds) >= self.vectors:  # a new incarnation of that ID
            for old in fds:
                os.close(old)
            fds.clear()
        fds.append(fd)

    def peer_state(self, peer: int) -> int:
        """A peer's STATE; a change means its hub messages may be queued: apply them first.

        The hub tells the others about a new peer before that peer gets its memory, so by the
        time its STATE changes our socket already holds its join. Without this, a doorbell
        right after a peer's restart could go to the eventfd of its previous incarnation and be
        lost (a request that never completes).
        """
        value = self.state_table.u32(4 * peer)
        if self._seen_state.get(peer) != value:
            self._seen_state[peer] = value
            self.process_hub_messages()
        return value

    # -- registers ----------------------------------------------------------------------------
    def set_state(self, value: int) -> None:
        old = self.state_table.u32(4 * self.id)
        self.state_table.set_u32(4 * self.id, value)
        if old != value:
            self.process_hub_messages()
            for peer in list(self._peers):
                if peer != self.id:
                    self._ring(self._bell_fd(peer, 0))

    def doorbell(self, peer: int, vector: int) -> None:
        self._ring(self._bell_fd(peer, vector))

    def native_doorbell(self, peer: int, vector: int) -> tuple[int, object | None, int, int]:
        """The peer's eventfd for ``vector`` (valid until our hub messages are next applied,
        which happens on the caller's thread only); -1 where :meth:`doorbell` rings nothing."""
        return self._bell_fd(peer, vector), None, 0, 0

    def _bell_fd(self, peer: int, vector: int) -> int:
        """The eventfd that rings ``vector`` of ``peer``, or -1 where a doorbell goes nowhere:
        a vector the link does not have (Jailhouse drops it too), a peer unknown even after the
        hub's queued messages were applied."""
        if vector >= self.vectors:
            return -1
        if peer not in self._peers:
            self.process_hub_messages()
        fds = self._peers.get(peer)
        return fds[vector] if fds and vector < len(fds) else -1

    @staticmethod
    def _ring(fd: int) -> None:
        if fd < 0:
            return
        try:
            os.write(fd, _ONE)
        except BlockingIOError:
            pass  # counter saturated: an interrupt is pending anyway

    def set_int_control(self, enabled: bool) -> None:
        if enabled and not self._int_control:
            self._drain()  # what arrived while disabled is lost, as on Jailhouse
        self._int_control = enabled

    def interrupt_fds(self) -> list[int]:
        """Our vectors' eventfds, plus the hub socket (join/leave messages) while it is open."""
        fds = list(self._peers.get(self.id, []))
        if self._hub_open:
            fds.append(self._sock.fileno())
        return fds

    def _drain(self) -> int:
        return sum(_read_eventfd(fd) for fd in self._peers.get(self.id, []))

    def ack_fd(self, fd: int) -> int:
        if self._hub_open and fd == self._sock.fileno():
            self.process_hub_messages()
            return 0
        n = _read_eventfd(fd)
        return n if self._int_control else 0

    def ack_interrupts(self) -> int:
        self.process_hub_messages()
        n = self._drain()
        return n if self._int_control else 0

    def close(self) -> None:
        for fds in self._peers.values():
            for fd in fds:
                os.close(fd)
        self._peers.clear()
        self.fd_epoch += 1
        sock = getattr(self, "_sock", None)
        if sock is not None:
            sock.close()
