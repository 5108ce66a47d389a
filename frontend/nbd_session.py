"""One NBD client connection: the handshake, then the transmission phase.

:class:`_Connection` runs one client for :class:`~ivshmem_virtio.frontend.nbd.NbdServer`: option
haggling (:mod:`ivshmem_virtio.frontend.nbd_handshake`), then requests until DISC, and it ends
the connection whichever way it goes (one log line with the reason and the counts).

* Each request runs in its own task so that a slow virtio round trip does not hold up the
  requests behind it; NBD allows replies out of order. Requests and payload bytes in flight are
  bounded per connection (:class:`_InflightBudget`), so a client can make the server buffer at
  most a known amount.
* Every request is validated before the target sees it (range, length cap, flags, read-only),
  because the target sits behind shared memory and should only ever receive sane requests. A
  WRITE announcing more than the maximum payload is refused before a byte of its payload is
  read: the client broke a MUST, so the server answers EINVAL and hangs up (proto.md).
* A malformed message (bad magic, unknown client flags) drops this connection only.
* Structured replies carry READ data and errors with a message; ``base:allocation`` reports
  every extent as allocated data (status 0), which is what the server knows: virtio-blk has no
  way to ask the disk for holes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import structlog

from .nbd_handshake import Handshake
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
    MAX_PAYLOAD,
    MIN_BLOCK_SIZE,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    REPLY_TYPE_NONE,
    REQUEST,
    REQUEST_MAGIC,
    WRITING_CMDS,
    NbdProtocolError,
    block_status_chunk,
    chunk_header,
    errname,
    error_chunk,
    nbd_error,
    offset_data_header,
    simple_reply,
)

if TYPE_CHECKING:
    from .nbd import NbdServer

log = structlog.get_logger("ivshmem_virtio.nbd")

_SKIP_CHUNK: Final = 1024 * 1024
_LOGGED_TARGET_ERRORS: Final = 10  # per connection
_MAX_EXTENT: Final = 0xFFFFFFFF // MIN_BLOCK_SIZE * MIN_BLOCK_SIZE  # u32, block aligned


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
    """One client: option haggling (:class:`Handshake`), then the transmission phase."""

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
        self._structured = False  # NBD_OPT_STRUCTURED_REPLY acknowledged (the handshake's)
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
            handshake = Handshake(self.id, self.peer, self._target, self._reader, self._writer,
                                  tls=self._server.tls, tls_required=self._server.tls_required)
            async with asyncio.timeout(self._server.handshake_timeout):
                entered = await handshake.run()
            negotiating = False
            self._structured, self._contexts = handshake.structured, handshake.contexts
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
