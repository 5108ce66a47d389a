"""NBD server that exports one block target (fixed newstyle handshake, simple replies only).

A Linux cell without a virtio driver reaches the remote virtio-blk disk through this export, as
/dev/nbdX or with `nbdcopy` / `qemu-img`. Only the protocol lives here; the disk itself is any
object implementing :class:`BlockTarget` (the virtio-blk client over shared memory in production).

Design choices, and why:

* Each request runs in its own task so that a slow virtio round trip does not hold up the
  requests behind it; NBD allows replies out of order. Requests and payload bytes in flight are
  bounded per connection, so a client can make the server buffer at most a known amount.
* Every request is validated before the target sees it (range, length cap, flags, read-only),
  because the target sits behind shared memory and should only ever receive sane requests.
* A malformed message (bad magic, unknown client flags) drops that one connection; the other
  connections and the listener keep going.
* Structured replies are refused, so READ errors are reported with a simple reply and no payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import struct
from typing import Final, Protocol

import structlog

__all__ = [
    "BlockTarget",
    "NbdProtocolError",
    "NbdServer",
    "serve_nbd",
    "MIN_BLOCK_SIZE",
    "PREFERRED_BLOCK_SIZE",
    "MAX_PAYLOAD",
]

log = structlog.get_logger("ivshmem_virtio.nbd")


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


# --- Protocol constants (NetworkBlockDevice/nbd doc/proto.md) ---------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_CAN_MULTI_CONN: Final = 1 << 8

# Options.
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8

# Option reply types.
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_ERR_UNSUP: Final = (1 << 31) + 1
REP_ERR_INVALID: Final = (1 << 31) + 3

# NBD_REP_INFO types.
INFO_EXPORT: Final = 0
INFO_BLOCK_SIZE: Final = 3

# Commands and command flags.
CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_WRITE_ZEROES: Final = 6
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1

_CMD_NAMES: Final = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_WRITE_ZEROES: "write_zeroes",
}
_WRITING_CMDS: Final = frozenset({CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})

# Error values allowed on the wire (proto.md "Error values"); anything else is sent as EIO.
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108

_ERRNO_TO_NBD: Final = {
    errno.EPERM: NBD_EPERM,
    errno.EACCES: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

# Block size constraints advertised with NBD_INFO_BLOCK_SIZE.
MIN_BLOCK_SIZE: Final = 512
PREFERRED_BLOCK_SIZE: Final = 4096
MAX_PAYLOAD: Final = 32 * 1024 * 1024

# Longest option payload accepted during the handshake: an export name (<= 4096 bytes per the
# spec) plus a handful of info requests. Anything longer is treated as abuse and disconnected.
MAX_OPTION_LENGTH: Final = 8192
_SKIP_CHUNK: Final = 1024 * 1024
_STREAM_LIMIT: Final = 1024 * 1024
_SHUTDOWN_GRACE_S: Final = 10.0
_LOGGED_TARGET_ERRORS: Final = 10  # per connection

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")


def nbd_error(exc: BaseException) -> int:
    """Map a target exception to an NBD error value; unknown errnos become EIO."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_TO_NBD.get(exc.errno, NBD_EIO)
    return NBD_EIO


def _errname(value: int) -> str:
    """Name of an NBD error value for logs (the values are Linux errnos)."""
    return errno.errorcode.get(value, str(value))


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
            log.warning("nbd protocol error", conn=self.id, peer=self.peer, error=str(exc))
            self._writer.transport.abort()
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
        self._writer.write(_OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data)
        await self._writer.drain()

    async def _negotiate(self) -> bool:
        """Run option haggling; True when the client entered transmission, False on ABORT."""
        self._writer.write(_GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        await self._writer.drain()
        (client_flags,) = struct.unpack(">I", await self._reader.readexactly(4))
        if client_flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            # The spec requires dropping a client that sets flags we did not offer.
            raise NbdProtocolError(f"unknown client flags {client_flags:#x}")
        no_zeroes = bool(client_flags & FLAG_C_NO_ZEROES)

        while True:
            magic, option, length = _OPTION_HEADER.unpack(
                await self._reader.readexactly(_OPTION_HEADER.size)
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
                name = self._parse_info_request(data)
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
            # STRUCTURED_REPLY, STARTTLS, meta contexts, extended headers and anything unknown.
            # Refusing structured replies keeps every reply a simple one.
            log.debug("nbd option unsupported", conn=self.id, option=option)
            await self._send_option_reply(option, REP_ERR_UNSUP, b"option not supported")

    @staticmethod
    def _parse_info_request(data: bytes) -> bytes | None:
        """Export name of an INFO/GO payload, or None when the lengths do not add up."""
        if len(data) < 6:
            return None
        (name_len,) = struct.unpack_from(">I", data, 0)
        if 4 + name_len + 2 > len(data):
            return None
        (n_requests,) = struct.unpack_from(">H", data, 4 + name_len)
        if len(data) != 4 + name_len + 2 + 2 * n_requests:
            return None
        return data[4 : 4 + name_len]

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
            magic, flags, cmd, handle, offset, length = _REQUEST.unpack(
                await reader.readexactly(_REQUEST.size)
            )
            if magic != REQUEST_MAGIC:
                raise NbdProtocolError(f"bad request magic {magic:#x}")
            if cmd == CMD_DISC:
                return "disc"
            self._requests += 1
            error = self._check_request(cmd, flags, offset, length)
            if error:
                if cmd == CMD_WRITE:
                    await self._skip_input(length)  # keep the stream in step
                self._rejected += 1
                log.debug(  # client-triggerable: debug only, the count goes in the disconnect line
                    "nbd request rejected",
                    conn=self.id,
                    cmd=_CMD_NAMES.get(cmd, cmd),
                    flags=flags,
                    offset=offset,
                    length=length,
                    error=_errname(error),
                )
                await self._reply(handle, error)
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
            task.add_done_callback(lambda _t, c=cost: self._budget.release(c))

    def _check_request(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """NBD error for a request that must not reach the target, or 0 when it is valid."""
        if cmd not in (CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES):
            return NBD_EINVAL
        allowed = CMD_FLAG_FUA | (CMD_FLAG_NO_HOLE if cmd == CMD_WRITE_ZEROES else 0)
        if flags & ~allowed:
            return NBD_EINVAL
        if cmd in _WRITING_CMDS and self._target.read_only:
            return NBD_EPERM
        if cmd == CMD_FLUSH:
            return 0  # offset and length are reserved; a flush is never refused over them
        if cmd in (CMD_READ, CMD_WRITE) and length > MAX_PAYLOAD:
            return NBD_EINVAL
        if offset + length > self._target.size:
            return NBD_ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else NBD_EINVAL
        return 0

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
                    cmd=_CMD_NAMES.get(cmd, cmd),
                    offset=offset,
                    length=length,
                    error=_errname(error),
                    detail=str(exc),
                )
        try:
            await self._reply(handle, error, data)
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

    async def _reply(self, handle: int, error: int, data: bytes | memoryview = b"") -> None:
        """Send a simple reply; the lock keeps header and data of one reply together."""
        async with self._wlock:
            if self._writer.is_closing():
                return
            self._writer.write(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle))
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
    ) -> None:
        if target.size < 0 or target.size % MIN_BLOCK_SIZE:
            raise ValueError(f"target size {target.size} is not a multiple of {MIN_BLOCK_SIZE}")
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.target = target
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.AbstractServer | None = None
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
        """Bind and start accepting; exactly one of unix_path and port (0 = any free port)."""
        if (unix_path is None) == (port is None):
            raise ValueError("give exactly one of unix_path or port")
        if self._server is not None:
            raise RuntimeError("already listening")
        if unix_path is not None:
            self._server = await asyncio.start_unix_server(
                self._on_client, path=unix_path, limit=_STREAM_LIMIT
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
        log.info(
            "nbd listening",
            address=self._address,
            size=self.target.size,
            read_only=self.target.read_only,
        )

    @property
    def sockets(self) -> tuple:
        """Listening sockets (e.g. to learn the port picked for port=0)."""
        return tuple(self._server.sockets) if self._server is not None else ()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
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


async def serve_nbd(
    target: BlockTarget,
    *,
    unix_path: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
) -> asyncio.AbstractServer:
    """Export target over NBD on a unix socket or a TCP port (exactly one); returns the server.

    The caller owns the event loop; close() and wait_closed() on the result stop the export,
    drop its clients and remove the unix socket file.
    """
    server = NbdServer(target)
    await server.listen(unix_path=unix_path, host=host, port=port)
    return server
