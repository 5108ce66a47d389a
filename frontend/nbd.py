"""NBD server that exports one block target (fixed newstyle handshake, structured replies).

A Linux cell without a virtio driver reaches the remote virtio-blk disk through this export, as
/dev/nbdX or with `nbdcopy` / `qemu-img`. The wire format lives in :mod:`frontend.nbd_proto`;
the disk itself is any object implementing :class:`BlockTarget` (the virtio-blk client over
shared memory in production). Decisions and measurements: docs/nbd.md.

Design choices, and why:

* Each request runs in its own task so that a slow virtio round trip does not hold up the
  requests behind it; NBD allows replies out of order. Requests and payload bytes in flight are
  bounded per connection, and connections per server, so a client can make the server buffer at
  most a known amount.
* Every request is validated before the target sees it (range, length cap, flags, read-only),
  because the target sits behind shared memory and should only ever receive sane requests. A
  WRITE announcing more than the maximum payload is refused before a byte of its payload is
  read: the client broke a MUST, so the server answers EINVAL and hangs up (proto.md).
* A malformed message (bad magic, unknown client flags) drops that one connection; the other
  connections and the listener keep going.
* Structured replies carry READ data and errors with a message; ``base:allocation`` reports
  every extent as allocated data (status 0), which is what the server knows: virtio-blk has no
  way to ask the disk for holes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import struct
from collections.abc import Callable
from typing import Final, Protocol

import structlog

from ivshmem_virtio.ivshmem.hub import LogLimiter, bind_unix

from .nbd_proto import *  # noqa: F403 - the wire constants stay importable from frontend.nbd
from .nbd_proto import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_NAMES,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_HAS_FLAGS,
    FLAG_NO_ZEROES,
    FLAG_READ_ONLY,
    FLAG_SEND_FLUSH,
    FLAG_SEND_FUA,
    FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES,
    GREETING,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MIN_BLOCK_SIZE,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    PREFERRED_BLOCK_SIZE,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REPLY_TYPE_NONE,
    REQUEST,
    REQUEST_MAGIC,
    WRITING_CMDS,
    block_status_chunk,
    chunk_header,
    errname,
    error_chunk,
    match_contexts,
    nbd_error,
    offset_data_header,
    option_reply,
    parse_info_request,
    parse_meta_context_request,
    simple_reply,
)

__all__ = [
    "BlockTarget",
    "NbdProtocolError",
    "NbdServer",
    "serve_nbd",
    "MIN_BLOCK_SIZE",
    "PREFERRED_BLOCK_SIZE",
    "MAX_PAYLOAD",
    "MAX_CONNECTIONS",
]

log = structlog.get_logger("ivshmem_virtio.nbd")

MAX_CONNECTIONS: Final = 16  # default cap; each connection may hold 256 MiB in flight
_SKIP_CHUNK: Final = 1024 * 1024
_STREAM_LIMIT: Final = 1024 * 1024
_SHUTDOWN_GRACE_S: Final = 10.0
_LOGGED_TARGET_ERRORS: Final = 10  # per connection
_CONTEXT_ID: Final = 1  # the id base:allocation gets from SET_META_CONTEXT
_MAX_EXTENT: Final = 0xFFFFFFFF // MIN_BLOCK_SIZE * MIN_BLOCK_SIZE  # u32, block aligned


class BlockTarget(Protocol):
    """What the NBD export serves: a disk with byte offsets (the blk client implements it)."""

    size: int  # bytes, multiple of 512
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes | memoryview) -> None: ...
    async def flush(self) -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...
    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None: ...


class NbdProtocolError(Exception):
    """The client broke the NBD protocol; the server drops that connection (hard disconnect)."""


class _HangUp(Exception):
    """The client broke a MUST after its reply went out: close (flushing that reply), no abort."""


class _InflightBudget:
    """Bounds requests and payload bytes in flight on one connection.

    Only the connection's reader loop acquires, so a single waiter and an Event suffice; release
    is synchronous so it is safe in a finally block of a cancelled task.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._requests = 0
        self._bytes = 0
        self._freed = asyncio.Event()

    def _fits(self, nbytes: int) -> bool:
        # A request bigger than the whole byte budget is still let through when alone.
        return self._requests < self._max_requests and (
            self._bytes == 0 or self._bytes + nbytes <= self._max_bytes
        )

    async def acquire(self, nbytes: int) -> None:
        while not self._fits(nbytes):
            self._freed.clear()
            await self._freed.wait()
        self._requests += 1
        self._bytes += nbytes

    def release(self, nbytes: int) -> None:
        self._requests -= 1
        self._bytes -= nbytes
        self._freed.set()


class _Connection:
    """One client: option haggling, then the transmission phase."""

    def __init__(
        self,
        server: NbdServer,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._server = server
        self._target = server.target
        self.id = conn_id
        self._reader = reader
        self._writer = writer
        self._wlock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._budget = _InflightBudget(server.max_inflight, server.max_inflight_bytes)
        self._requests = 0
        self._rejected = 0
        self._target_errors = 0
        self._export_name = ""
        self._structured = False  # NBD_OPT_STRUCTURED_REPLY acknowledged
        self._contexts: dict[int, str] = {}  # metadata contexts selected: id -> name
        peer = writer.get_extra_info("peername")
        self.peer = str(peer) if peer else "unix"

    def abort(self) -> None:
        """Drop the connection at once (server shutdown); the reader loop then sees EOF."""
        self._writer.transport.abort()

    async def run(self) -> None:
        """Serve the client until it disconnects or breaks the protocol; never raises to asyncio."""
        log.info("nbd client connected", conn=self.id, peer=self.peer)
        reason = "eof"
        cancelled = False
        negotiating = True
        try:
            # A client that connects and never finishes haggling must not linger forever.
            async with asyncio.timeout(self._server.handshake_timeout):
                entered = await self._negotiate()
            negotiating = False
            if entered:
                reason = await self._transmit()
            else:
                reason = "abort"
        except asyncio.IncompleteReadError:
            reason = "eof"
        except TimeoutError:  # also a socket ETIMEDOUT
            reason = "handshake_timeout" if negotiating else "timeout"
            self._writer.transport.abort()
        except ConnectionError:
            reason = "connection_lost"
        except NbdProtocolError as exc:
            reason = "protocol_error"
            self._server.warn("protocol", "nbd protocol error", conn=self.id, peer=self.peer,
                              error=str(exc))
            self._writer.transport.abort()
        except _HangUp as exc:
            reason = "protocol_error"  # the reply is out: close, flushing it, rather than abort
            self._server.warn("protocol", "nbd protocol error", conn=self.id, peer=self.peer,
                              error=str(exc))
        except asyncio.CancelledError:
            reason = "cancelled"
            cancelled = True
            raise
        except Exception:
            reason = "internal_error"
            log.exception("nbd internal error", conn=self.id, peer=self.peer)
            self._writer.transport.abort()
        finally:
            await self._finish(cancel=cancelled)
            log.info(
                "nbd client disconnected",
                conn=self.id,
                peer=self.peer,
                reason=reason,
                requests=self._requests,
                rejected=self._rejected,
                target_errors=self._target_errors,
            )

    async def _finish(self, *, cancel: bool) -> None:
        """Let in-flight requests complete (the spec asks for that), then close the socket."""
        if cancel:
            for task in self._tasks:
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    # --- handshake ---------------------------------------------------------------------------

    def _transmission_flags(self) -> int:
        flags = (
            FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
        )
        if self._target.read_only:
            flags |= FLAG_READ_ONLY
        return flags  # CAN_MULTI_CONN stays off: the target makes no cross-connection promise.

    async def _send_option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._writer.write(option_reply(option, reply, data))
        await self._writer.drain()

    async def _negotiate(self) -> bool:
        """Run option haggling; True when the client entered transmission, False on ABORT."""
        self._writer.write(GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await self._writer.drain()
        (client_flags,) = struct.unpack(">I", await self._reader.readexactly(4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            # The spec requires dropping a client that sets flags we did not offer.
            raise NbdProtocolError(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)

        while True:
            magic, option, length = OPTION_HEADER.unpack(
                await self._reader.readexactly(OPTION_HEADER.size)
            )
            if magic != IHAVEOPT:
                raise NbdProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise NbdProtocolError(f"option {option} data too long ({length} bytes)")
            data = await self._reader.readexactly(length)

            if option == OPT_EXPORT_NAME:
                self._enter_transmission(data, "export_name")
                flags = self._transmission_flags()
                self._writer.write(struct.pack(">QH", self._target.size, flags))
                if not no_zeroes:
                    self._writer.write(bytes(124))
                await self._writer.drain()
                return True
            if option == OPT_ABORT:
                # The client may already be gone: a failed ACK is not an error.
                with contextlib.suppress(ConnectionError):
                    await self._send_option_reply(option, REP_ACK)
                return False
            if option == OPT_LIST:
                if data:
                    await self._send_option_reply(option, REP_ERR_INVALID, b"LIST takes no data")
                else:
                    # One export; it answers to any name, the empty default name included.
                    await self._send_option_reply(option, REP_SERVER, struct.pack(">I", 0))
                    await self._send_option_reply(option, REP_ACK)
                continue
            if option in (OPT_INFO, OPT_GO):
                name = parse_info_request(data)
                if name is None:
                    await self._send_option_reply(option, REP_ERR_INVALID, b"malformed request")
                    continue
                await self._send_option_reply(
                    option,
                    REP_INFO,
                    struct.pack(">HQH", INFO_EXPORT, self._target.size, self._transmission_flags()),
                )
                # Sent whether asked or not (allowed): clients then respect the 32 MiB cap.
                await self._send_option_reply(
                    option,
                    REP_INFO,
                    struct.pack(
                        ">HIII", INFO_BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD
                    ),
                )
                await self._send_option_reply(option, REP_ACK)
                if option == OPT_GO:
                    self._enter_transmission(name, "go")
                    return True
                continue
            if option == OPT_STRUCTURED_REPLY:
                if data:
                    await self._send_option_reply(option, REP_ERR_INVALID, b"takes no data")
                else:
                    self._structured = True
                    await self._send_option_reply(option, REP_ACK)
                continue
            if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                await self._meta_context(option, data)
                continue
            # STARTTLS, extended headers and anything unknown.
            log.debug("nbd option unsupported", conn=self.id, option=option)
            await self._send_option_reply(option, REP_ERR_UNSUP, b"option not supported")

    async def _meta_context(self, option: int, data: bytes) -> None:
        """LIST or SET metadata contexts: ``base:allocation`` is the only one there is."""
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            self._contexts = {}  # replaced even when this request fails (proto.md)
        request = parse_meta_context_request(data)
        if not self._structured:
            await self._send_option_reply(option, REP_ERR_INVALID,
                                          b"negotiate structured replies first")
            return
        if request is None:
            await self._send_option_reply(option, REP_ERR_INVALID, b"malformed request")
            return
        for name in match_contexts(request[1], listing=not setting):
            context_id = _CONTEXT_ID if setting else 0  # LIST: the id is reserved, 0
            if setting:
                self._contexts[context_id] = name
            await self._send_option_reply(option, REP_META_CONTEXT,
                                          struct.pack(">I", context_id) + name.encode())
        await self._send_option_reply(option, REP_ACK)

    def _enter_transmission(self, name: bytes, via: str) -> None:
        self._export_name = name.decode("utf-8", errors="replace")
        log.info(
            "nbd handshake done",
            conn=self.id,
            peer=self.peer,
            export=self._export_name,
            via=via,
            size=self._target.size,
            flags=self._transmission_flags(),
        )

    # --- transmission ------------------------------------------------------------------------

    async def _transmit(self) -> str:
        """Read requests until DISC; each valid one is handed to its own task."""
        reader = self._reader
        while True:
            magic, flags, cmd, handle, offset, length = REQUEST.unpack(
                await reader.readexactly(REQUEST.size)
            )
            if magic != REQUEST_MAGIC:
                raise NbdProtocolError(f"bad request magic {magic:#x}")
            if cmd == CMD_DISC:
                return "disc"
            self._requests += 1
            if cmd == CMD_WRITE and length > MAX_PAYLOAD:
                # The client MUST NOT send this (proto.md "Size constraints"): answer, then hang
                # up without reading the payload, which may be as large as 4 GiB.
                self._rejected += 1
                await self._reply(handle, NBD_EINVAL, message=f"a WRITE of {length} bytes is "
                                  f"over the maximum payload of {MAX_PAYLOAD}")
                raise _HangUp(f"WRITE of {length} bytes announced; maximum payload "
                              f"{MAX_PAYLOAD}")
            error = self._check_request(cmd, flags, offset, length)
            if error:
                if cmd == CMD_WRITE:
                    await self._skip_input(length)  # keep the stream in step
                self._rejected += 1
                log.debug(  # client-triggerable: debug only, the count goes in the disconnect line
                    "nbd request rejected",
                    conn=self.id,
                    cmd=CMD_NAMES.get(cmd, cmd),
                    flags=flags,
                    offset=offset,
                    length=length,
                    error=errname(error),
                )
                await self._reply(handle, error, read=cmd == CMD_READ)
                continue
            if cmd == CMD_BLOCK_STATUS:
                await self._block_status(handle, flags, offset, length)
                continue

            cost = length if cmd in (CMD_READ, CMD_WRITE) else 0
            await self._budget.acquire(cost)
            try:
                payload = await reader.readexactly(length) if cmd == CMD_WRITE else None
            except BaseException:
                self._budget.release(cost)
                raise
            task = asyncio.create_task(self._execute(cmd, flags, handle, offset, length, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(self._releaser(cost))

    def _releaser(self, cost: int) -> Callable[[asyncio.Task[None]], None]:
        """A done callback giving ``cost`` back to the in-flight budget."""
        return lambda _t: self._budget.release(cost)

    def _check_request(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """NBD error for a request that must not reach the target, or 0 when it is valid."""
        if cmd == CMD_BLOCK_STATUS:
            # only after SET_META_CONTEXT selected a context; never a zero-length extent
            if not self._contexts or flags & ~CMD_FLAG_REQ_ONE or length == 0:
                return NBD_EINVAL
            return NBD_EINVAL if offset + length > self._target.size else 0
        if cmd not in (CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES):
            return NBD_EINVAL
        allowed = CMD_FLAG_FUA | (CMD_FLAG_NO_HOLE if cmd == CMD_WRITE_ZEROES else 0)
        if flags & ~allowed:
            return NBD_EINVAL
        if cmd in WRITING_CMDS and self._target.read_only:
            return NBD_EPERM
        if cmd == CMD_FLUSH:
            return 0  # offset and length are reserved; a flush is never refused over them
        if cmd in (CMD_READ, CMD_WRITE) and length > MAX_PAYLOAD:
            return NBD_EINVAL
        if offset + length > self._target.size:
            return NBD_ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
        return 0

    async def _block_status(self, handle: int, flags: int, offset: int, length: int) -> None:
        """One extent of status 0 ("allocated, or not known"): all virtio-blk lets us know.

        Without REQ_ONE the extent runs on to the end of the disk (proto.md lets the final
        extent pass the requested length when the server knows it without extra effort), so a
        client maps the whole disk in one round trip per 4 GiB.
        """
        if flags & CMD_FLAG_REQ_ONE:
            n = length
        else:
            n = min(self._target.size - offset, _MAX_EXTENT)
        await self._send(b"".join(block_status_chunk(handle, cid, [(n, 0)])
                                  for cid in self._contexts))

    async def _skip_input(self, length: int) -> None:
        """Consume a rejected WRITE payload without buffering it whole."""
        while length:
            length -= len(await self._reader.readexactly(min(length, _SKIP_CHUNK)))

    async def _execute(
        self,
        cmd: int,
        flags: int,
        handle: int,
        offset: int,
        length: int,
        payload: bytes | None,
    ) -> None:
        """Run one validated request against the target and send its simple reply."""
        target = self._target
        data = b""
        error = 0
        try:
            if cmd == CMD_FLUSH:
                await target.flush()
            elif length == 0:
                pass  # nothing to touch; FUA has nothing to persist either
            elif cmd == CMD_READ:
                data = await target.read(offset, length)
                if len(data) != length:
                    raise OSError(errno.EIO, f"target returned {len(data)} of {length} bytes")
            else:
                if cmd == CMD_WRITE:
                    assert payload is not None
                    await target.write(offset, payload)
                else:
                    await self._ranged(cmd, flags, offset, length)
                if flags & CMD_FLAG_FUA:
                    await target.flush()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = nbd_error(exc)
            data = b""
            self._target_errors += 1
            # A failing disk fails every request: log the first few, count the rest.
            if self._target_errors <= _LOGGED_TARGET_ERRORS:
                log_fn = log.warning if isinstance(exc, OSError) else log.exception
                log_fn(
                    "nbd target error",
                    conn=self.id,
                    cmd=CMD_NAMES.get(cmd, cmd),
                    offset=offset,
                    length=length,
                    error=errname(error),
                    detail=str(exc),
                )
        try:
            await self._reply(handle, error, data, read=cmd == CMD_READ, offset=offset,
                              message=errname(error) if error else "")
        except (ConnectionError, RuntimeError):
            pass  # the client is gone; the reader loop notices and ends the connection

    async def _ranged(self, cmd: int, flags: int, offset: int, length: int) -> None:
        """TRIM / WRITE_ZEROES may exceed the payload cap; hand them to the target in pieces."""
        end = offset + length
        while offset < end:
            n = min(end - offset, MAX_PAYLOAD)
            if cmd == CMD_TRIM:
                await self._target.discard(offset, n)
            else:
                await self._target.write_zeroes(offset, n, may_unmap=not flags & CMD_FLAG_NO_HOLE)
            offset += n

    async def _reply(
        self,
        handle: int,
        error: int,
        data: bytes | memoryview = b"",
        *,
        read: bool = False,
        offset: int = 0,
        message: str = "",
    ) -> None:
        """Send a request's reply: structured for READ and errors once negotiated, else simple."""
        if not self._structured or not (read or error):
            await self._send(simple_reply(handle, error), data)
        elif error:
            await self._send(error_chunk(handle, error, message))
        elif data:
            await self._send(offset_data_header(handle, offset, len(data)), data)
        else:  # a READ of 0 bytes: no OFFSET_DATA chunk can be empty
            await self._send(chunk_header(handle, REPLY_TYPE_NONE, 0))

    async def _send(self, header: bytes, data: bytes | memoryview = b"") -> None:
        """Write one reply; the lock keeps the header and the data of one reply together."""
        async with self._wlock:
            if self._writer.is_closing():
                return
            self._writer.write(header)
            if data:
                self._writer.write(data)
            await self._writer.drain()


class NbdServer(asyncio.AbstractServer):
    """A listening NBD export of one target.

    Unlike a bare asyncio server, close() also drops connected clients and removes the unix
    socket file, so a stopped export leaves nothing behind.
    """

    def __init__(
        self,
        target: BlockTarget,
        *,
        max_inflight: int = 64,
        max_inflight_bytes: int = 256 * 1024 * 1024,
        handshake_timeout: float | None = 30.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if target.size < 0 or target.size % MIN_BLOCK_SIZE:
            raise ValueError(f"target size {target.size} is not a multiple of {MIN_BLOCK_SIZE}")
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.target = target
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.refused = 0  # connections turned away at the cap
        self._limiter = LogLimiter()
        self._server: asyncio.Server | None = None
        self._unix_path: str | None = None
        self._unix_id: tuple[int, int] | None = None
        self._conns: dict[int, tuple[_Connection, asyncio.Task[None]]] = {}
        self._ids = itertools.count(1)
        self._closing = False
        self._address = ""

    async def listen(
        self,
        *,
        unix_path: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        """Bind and start accepting; exactly one of unix_path and port (0 = any free port).

        A unix socket is created 0600 (the exporting user and root may connect); TCP listens on
        loopback unless another host is given, and NBD has no authentication of its own.
        """
        if (unix_path is None) == (port is None):
            raise ValueError("give exactly one of unix_path or port")
        if self._server is not None:
            raise RuntimeError("already listening")
        if unix_path is not None:
            sock = bind_unix(unix_path, 0o600, what="NBD export")
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=_STREAM_LIMIT
            )
            st = os.stat(unix_path)
            self._unix_path = unix_path
            self._unix_id = (st.st_dev, st.st_ino)
            self._address = f"unix:{unix_path}"
        else:
            self._server = await asyncio.start_server(
                self._on_client, host, port, limit=_STREAM_LIMIT
            )
            bound = self._server.sockets[0].getsockname()
            self._address = f"tcp:{bound[0]}:{bound[1]}"
            if not _loopback(host):
                log.warning("nbd export reachable from the network without authentication",
                            address=self._address)
        log.info(
            "nbd listening",
            address=self._address,
            size=self.target.size,
            read_only=self.target.read_only,
        )

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """Listening sockets (e.g. to learn the port picked for port=0)."""
        return tuple(self._server.sockets) if self._server is not None else ()

    def warn(self, key: str, event: str, **kw: object) -> None:
        """A warning a client can trigger: rate-limited per key (a count of the dropped ones)."""
        dropped = self._limiter.allow(key)
        if dropped is not None:
            log.warning(event, **kw, **({"suppressed": dropped} if dropped else {}))

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        if len(self._conns) >= self.max_connections:
            # refused at once, before the greeting: the clients already served keep going
            self.refused += 1
            writer.transport.abort()
            self.warn("cap", "nbd connection refused", reason="connection cap",
                      max_connections=self.max_connections, refused=self.refused)
            return
        conn_id = next(self._ids)
        conn = _Connection(self, conn_id, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._conns[conn_id] = (conn, task)
        try:
            await conn.run()
        finally:
            self._conns.pop(conn_id, None)

    def _remove_socket_file(self) -> None:
        """Unlink our unix socket, unless someone else has bound that path since."""
        if self._unix_path is None:
            return
        path, self._unix_path = self._unix_path, None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._unix_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # --- asyncio.AbstractServer --------------------------------------------------------------

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn, _task in list(self._conns.values()):
            conn.abort()
        self._remove_socket_file()
        log.info("nbd server closed", address=self._address, connections=len(self._conns))

    async def wait_closed(self) -> None:
        """Wait until the listener and every connection are gone (cancel stragglers)."""
        if self._server is not None:
            await self._server.wait_closed()
        tasks = [task for _conn, task in self._conns.values()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        if self._server is None:
            return asyncio.get_running_loop()
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server is not None and not self._closing and self._server.is_serving()

    async def start_serving(self) -> None:
        if self._server is None:
            raise RuntimeError("call listen() first")
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        """Serve until cancelled, then close cleanly (socket file included)."""
        await self.start_serving()
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.close()
            await self.wait_closed()


def _loopback(host: str) -> bool:
    """True when host resolves to loopback addresses only."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addrs = {str(info[4][0]) for info in infos}
    return bool(addrs) and all(a.startswith("127.") or a == "::1" for a in addrs)


async def serve_nbd(
    target: BlockTarget,
    *,
    unix_path: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    max_connections: int = MAX_CONNECTIONS,
) -> NbdServer:
    """Export target over NBD on a unix socket or a TCP port (exactly one); returns the server.

    The caller owns the event loop; close() and wait_closed() on the result stop the export,
    drop its clients and remove the unix socket file.
    """
    server = NbdServer(target, max_connections=max_connections)
    await server.listen(unix_path=unix_path, host=host, port=port)
    return server
