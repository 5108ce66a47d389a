"""A vhost-user back-end: one device service served to a front-end (QEMU, virtio-loopback, our
own ``frontend/vhost_user.py``) over a Unix socket (QEMU ``docs/interop/vhost-user.rst``).

:class:`VhostUserServer` listens and serves one connection at a time; each connection is a
fresh :class:`Session` (a front-end that reconnects, QEMU's ``reconnect=``, starts over and gets
its rings' state back through GET/SET_VRING_BASE). Everything the front-end sends is untrusted:
the wire format is checked by ``spec.vhost_user``, the memory table by ``guestmem``, the rings
by ``DeviceQueue``; a malformed message costs one rate-limited log line and the connection, and
the server goes on listening. The device service is the same object the ivshmem runner drives.
On every disconnect the slow requests in flight are completed and the service's ``flush`` (the
blk image's fsync) runs, so an acknowledged write is never lost to a front-end going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

import structlog

from ivshmem_virtio.errors import MemoryAccessError, RingError, VhostUserError
from ivshmem_virtio.guestmem import GuestMemory, RegionSpec
from ivshmem_virtio.ivshmem.hub import bind_unix
from ivshmem_virtio.log import RateLimiter
from ivshmem_virtio.spec import ring as R
from ivshmem_virtio.spec import vhost_user as VU
from ivshmem_virtio.spec import virtio as V

from .runner import Service
from .vhost_user_rings import VhostTransport, VhostUserRunner, Vring

log = structlog.get_logger("ivshmem_virtio.backend")

PROTOCOL_FEATURES = VU.protocol_mask(VU.ProtocolFeature.MQ, VU.ProtocolFeature.REPLY_ACK,
                                     VU.ProtocolFeature.CONFIG, VU.ProtocolFeature.RESET_DEVICE)
"""What this back-end implements, and so offers: the queue count (MQ, as the spec asks every
back-end to), acknowledgements (REPLY_ACK), the device config space (CONFIG: QEMU's
vhost-user-blk needs it) and RESET_DEVICE. Not LOG_SHMFD (no dirty logging: no live migration),
not INFLIGHT_SHMFD (in-flight requests are completed instead before a ring stops or a session
ends), not BACKEND_REQ (so a config change is not announced, only served at the next GET_CONFIG),
not CONFIGURE_MEM_SLOTS (the table comes whole, at most 8 regions)."""

MESSAGE_TIMEOUT_S = 5.0  # the rest of a message once its header came
_BAD_PEER = (VhostUserError, MemoryAccessError, RingError)


def device_features(service: Service) -> int:
    """Virtio features offered: the service's own, VERSION_1, and the vhost-user bit 30. Not
    ACCESS_PLATFORM (it would need an IOTLB): addresses are guest-physical."""
    return service.features | V.bit(V.F_VERSION_1) | V.bit(VU.F_PROTOCOL_FEATURES)


class Connection:
    """Reads whole messages (header, payload, the fds that came with them) off a socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()

    async def _readable(self) -> None:
        fut = self._loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            self._loop.remove_reader(fd)

    async def recv_exact(self, n: int, fds: list[int]) -> bytes:
        """``n`` bytes; every fd that rides along is appended to ``fds`` (the caller closes)."""
        buf = bytearray()
        while len(buf) < n:
            try:
                data, new, flags, _ = socket.recv_fds(self.sock, n - len(buf), VU.MAX_FDS)
            except BlockingIOError:
                await self._readable()
                continue
            fds.extend(new)
            if flags & socket.MSG_CTRUNC:
                raise VhostUserError(f"more than {VU.MAX_FDS} fds on one message")
            if not data:
                raise EOFError
            buf += data
        return bytes(buf)

    async def send(self, data: bytes) -> None:
        await self._loop.sock_sendall(self.sock, data)

    async def message(self, fds: list[int]) -> tuple[VU.Header, bytes]:
        header = VU.parse_header(await self.recv_exact(VU.HEADER_SIZE, fds))
        if header.is_reply:
            raise VhostUserError(f"a reply ({VU.request_name(header.request)}) from the "
                                 "front-end")
        payload = await asyncio.wait_for(self.recv_exact(header.size, fds), MESSAGE_TIMEOUT_S)
        return header, payload


class Session:
    """One front-end connection: negotiation, memory, rings; the runner serving them."""

    def __init__(self, service: Service, name: str, conn: Connection,
                 bind: Callable[[VhostUserRunner], None] | None,
                 limiter: RateLimiter | None = None) -> None:
        self.service = service
        self._limiter = limiter or RateLimiter()
        self.name = name
        self.conn = conn
        self.transport = VhostTransport(name, service.num_queues)
        self.runner = VhostUserRunner(service, self.transport, name=name)
        if bind is not None:
            bind(self.runner)
        self.offered = device_features(service)
        self.protocol = 0  # acked protocol features
        self.features_set = False
        self.mem: GuestMemory | None = None
        self.activated = False

    async def run(self) -> None:
        while True:
            fds: list[int] = []
            try:
                header, payload = await self.conn.message(fds)
                status = 0
                try:
                    reply = await self.handle(header.request, payload, fds)
                except _Refused as e:
                    if self._limiter.allow(time.monotonic()):
                        log.warning("vhost-user request refused", socket=self.name, reason=str(e))
                    reply, status = None, 1
                if reply is not None:
                    await self.conn.send(VU.encode_reply(header.request, reply))
                elif header.need_reply and self.protocol & VU.protocol_mask(
                        VU.ProtocolFeature.REPLY_ACK):
                    await self.conn.send(VU.encode_reply(header.request, VU.encode_u64(status)))
            finally:
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    async def close(self) -> None:
        """The connection is gone: finish what is in flight, flush, forget the session."""
        try:
            await self.runner.close()
        finally:
            flush = getattr(self.service, "flush", None)
            if flush is not None:
                flush()
            self._reset_device()
            for ring in self.transport.rings:
                ring.close_fds()
            if self.mem is not None:
                self.mem.close()
                self.mem = None

    def _reset_device(self) -> None:
        if self.activated:
            self.activated = False
            self.runner.generation += 1
            self.service.on_reset()

    def _ring(self, index: int) -> Vring:
        if not 0 <= index < len(self.transport.rings):
            raise VhostUserError(f"ring {index} of {len(self.transport.rings)}")
        return self.transport.rings[index]

    def _stopped_ring(self, index: int, request: str) -> Vring:
        """Ring ``index`` for a request that only a stopped ring takes (its size, its base)."""
        ring = self._ring(index)
        if ring.vq is not None:
            raise VhostUserError(f"{request} on running ring {ring.index}")
        return ring

    def _take_fd(self, fds: list[int]) -> int:
        return fds.pop(0)

    def _start(self, ring: Vring) -> None:
        self.transport.restart(ring, self.mem)
        if not self.activated:
            self.activated = True
            self.service.on_activate(self.transport.features, self.runner)
        self.runner.schedule()  # buffers may wait already (a reconnect)

    # -- messages ---------------------------------------------------------------------------
    async def handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        """Apply one request; the reply body of a request that has one, else None."""
        VU.check_request_size(request, len(payload))
        log.debug("vhost-user request", request=VU.request_name(request), size=len(payload),
                  fds=len(fds))
        rq = VU.Request
        t = self.transport
        if request not in (rq.SET_MEM_TABLE, rq.SET_VRING_KICK, rq.SET_VRING_CALL,
                           rq.SET_VRING_ERR) and fds:
            raise VhostUserError(f"{VU.request_name(request)} came with {len(fds)} fds")
        if request == rq.GET_FEATURES:
            return VU.encode_u64(self.offered)
        if request == rq.SET_FEATURES:
            value = VU.parse_u64(payload)
            if value & ~self.offered:
                raise VhostUserError(f"features {value:#x} beyond the offered {self.offered:#x}")
            t.features = value & ~V.bit(VU.F_PROTOCOL_FEATURES)
            t.gate_on_enable = bool(value & V.bit(VU.F_PROTOCOL_FEATURES))
            self.features_set = True
            return None
        if request == rq.GET_PROTOCOL_FEATURES:
            return VU.encode_u64(PROTOCOL_FEATURES)
        if request == rq.SET_PROTOCOL_FEATURES:
            value = VU.parse_u64(payload)
            if value & ~PROTOCOL_FEATURES:
                raise VhostUserError(f"protocol features {value:#x} beyond the offered "
                                     f"{PROTOCOL_FEATURES:#x}")
            self.protocol = value
            return None
        if request in (rq.SET_OWNER, rq.RESET_OWNER, rq.RESET_DEVICE):
            if request != rq.SET_OWNER:  # RESET_OWNER (deprecated): disable every ring
                await self._stop_all()
            return None
        if request == rq.GET_QUEUE_NUM:
            return VU.encode_u64(len(t.rings))
        if request == rq.SET_MEM_TABLE:
            await self._set_mem_table(payload, fds)
            return None
        if request == rq.SET_VRING_NUM:
            state = VU.VringState.parse(payload)
            ring = self._stopped_ring(state.index, "SET_VRING_NUM")
            if not 0 < state.num <= R.MAX_QUEUE_SIZE or state.num & (state.num - 1):
                raise VhostUserError(f"ring size {state.num} is not a power of two <= "
                                     f"{R.MAX_QUEUE_SIZE}")
            ring.num = state.num
            return None
        if request == rq.SET_VRING_ADDR:
            addr = VU.VringAddr.parse(payload)
            if addr.flags & VU.VRING_F_LOG:
                raise VhostUserError("ring logging asked for without LOG_SHMFD")
            ring = self._ring(addr.index)
            ring.addr = (addr.desc, addr.avail, addr.used)
            if ring.vq is not None:
                await self.runner.quiesce()
                t.restart(ring, self.mem)
            return None
        if request == rq.SET_VRING_BASE:
            state = VU.VringState.parse(payload)
            ring = self._stopped_ring(state.index, "SET_VRING_BASE")
            if state.num > 0xFFFF:
                raise VhostUserError(f"ring base {state.num:#x} (split rings: 16 bits)")
            ring.base = state.num
            return None
        if request == rq.GET_VRING_BASE:
            ring = self._ring(VU.VringState.parse(payload).index)
            await self.runner.quiesce()  # in-flight requests complete before the state leaves
            if ring.vq is not None and ring.vq.publish():
                t.notify_queue(ring.index)
            self.runner.unwatch(ring.index)
            base = t.stop(ring)
            if all(r.vq is None for r in t.rings):
                self._reset_device()
            return VU.VringState(ring.index, base).pack()
        if request in (rq.SET_VRING_KICK, rq.SET_VRING_CALL, rq.SET_VRING_ERR):
            self._set_vring_fd(request, payload, fds)
            return None
        if request == rq.SET_VRING_ENABLE:
            state = VU.VringState.parse(payload)
            if state.num not in (0, 1):
                raise VhostUserError(f"SET_VRING_ENABLE {state.num}")
            ring = self._ring(state.index)
            ring.enabled = bool(state.num)
            t.relist(ring)
            self.runner.schedule()
            return None
        if request == rq.GET_CONFIG:
            msg = VU.ConfigMsg.parse(payload)
            data = t.config[msg.offset:msg.offset + msg.size]
            return VU.ConfigMsg(msg.offset, msg.size, msg.flags,
                                data + bytes(msg.size - len(data))).pack()
        if request == rq.SET_CONFIG:
            VU.ConfigMsg.parse(payload)
            raise _Refused("SET_CONFIG: no writable config field is offered")
        raise VhostUserError(f"{VU.request_name(request)} is not supported")

    def _set_vring_fd(self, request: int, payload: bytes, fds: list[int]) -> None:
        msg = VU.VringFd.parse(payload, len(fds))
        ring = self._ring(msg.index)
        fd = None if msg.nofd else self._take_fd(fds)
        if fd is not None:
            os.set_blocking(fd, False)  # our writes and reads never block the loop
        if request == VU.Request.SET_VRING_CALL:
            old, ring.call = ring.call, fd
        elif request == VU.Request.SET_VRING_ERR:
            old, ring.err = ring.err, fd
        else:
            if fd is None:
                raise VhostUserError(f"ring {ring.index}: polling (no kick fd) is not supported")
            old, ring.kick = ring.kick, fd
            self.runner.watch(ring.index, fd)
            self._start(ring)
        if old is not None:
            os.close(old)

    async def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        regions = VU.parse_mem_table(payload, len(fds))
        specs = [RegionSpec(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in regions]
        mem = GuestMemory.map_fds(specs, fds, name=f"{self.name} memory")
        # the fds are closed by the caller: the mappings keep their own reference
        await self.runner.quiesce()  # nothing in flight on the old mappings
        old, self.mem = self.mem, mem
        t = self.transport
        try:
            for ring in t.rings:
                if ring.vq is not None:
                    t.restart(ring, mem)  # same indices, the ring areas looked up again
        except _BAD_PEER as e:
            t.mark_needs_reset(f"ring outside the new memory table: {e}")
            self.runner.generation += 1
        if old is not None:
            old.close()

    async def _stop_all(self) -> None:
        await self.runner.quiesce()
        for ring in self.transport.rings:
            self.runner.unwatch(ring.index)
            self.transport.stop(ring)
            ring.enabled = False
        self._reset_device()


class _Refused(VhostUserError):
    """A well-formed request we decline: a failure reply with REPLY_ACK, the session goes on."""


class VhostUserServer:
    """Listen on ``path`` (0600) and serve ``service`` to one front-end at a time."""

    def __init__(self, service: Service, path: str, *,
                 bind: Callable[[VhostUserRunner], None] | None = None) -> None:
        self.service = service
        self.path = path
        self.bind = bind
        self.sessions = 0
        self.dropped = 0
        self._limiter = RateLimiter()
        self._sock: socket.socket | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def listen(self) -> None:
        self._sock = bind_unix(self.path, 0o600, what="vhost-user back-end")
        self._sock.setblocking(False)
        log.info("vhost-user back-end listening", socket=self.path)

    async def serve_forever(self) -> None:
        if self._sock is None:
            self.listen()
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn, _ = await loop.sock_accept(self._sock)
                with conn:
                    await self._serve(conn)
        finally:
            self.close()

    async def _serve(self, sock: socket.socket) -> None:
        self.sessions += 1
        session = Session(self.service, self.path, Connection(sock), self.bind, self._limiter)
        log.info("vhost-user front-end connected", socket=self.path, session=self.sessions)
        try:
            await self._run(session)
        finally:
            await session.close()

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        except (EOFError, ConnectionError):
            log.info("vhost-user front-end left", socket=self.path)
        except (*_BAD_PEER, TimeoutError, OSError) as e:
            self.dropped += 1
            if self._limiter.allow(time.monotonic()):
                log.warning("vhost-user front-end dropped", socket=self.path, error=str(e))
        except Exception:  # noqa: BLE001 - a bug of ours costs the session, not the server
            self.dropped += 1
            log.exception("vhost-user session failed", socket=self.path)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
