"""NBD server that exports one block target (fixed newstyle handshake, structured replies).

A Linux cell without a virtio driver reaches the remote virtio-blk disk through this export, as
/dev/nbdX or with `nbdcopy` / `qemu-img`. The wire format lives in :mod:`frontend.nbd_proto`;
one client's connection (option haggling in :mod:`frontend.nbd_handshake`, then the
transmission phase) in :mod:`frontend.nbd_session`; this module listens, caps the connections
and stops the export. The disk itself is any object implementing :class:`BlockTarget` (the
virtio-blk client over shared memory in production). Decisions and measurements: docs/nbd.md.

Design choices, and why:

* Connections per server are bounded (and requests and payload bytes in flight per connection,
  in the session), so a client can make the server buffer at most a known amount. A client
  over the cap is refused before the greeting; the clients already served keep going.
* A malformed message (bad magic, unknown client flags) drops that one connection; the other
  connections and the listener keep going.
* A unix socket is created 0600; TCP listens on loopback unless told otherwise (NBD has no
  authentication of its own). close() also drops the clients and removes the socket file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import ssl
from typing import Final, Protocol

import structlog

from ivshmem_virtio.ivshmem.hub import LogLimiter, bind_unix

from .nbd_proto import *  # noqa: F403 - the wire constants stay importable from frontend.nbd
from .nbd_proto import MAX_PAYLOAD, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, NbdProtocolError
from .nbd_session import _Connection

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
_STREAM_LIMIT: Final = 1024 * 1024
_SHUTDOWN_GRACE_S: Final = 10.0


class BlockTarget(Protocol):
    """What the NBD export serves: a disk with byte offsets (the blk client implements it)."""

    size: int  # bytes, multiple of 512
    read_only: bool

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes | memoryview) -> None: ...
    async def flush(self) -> None: ...
    async def discard(self, offset: int, length: int) -> None: ...
    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None: ...


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
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
    ) -> None:
        if tls_required and tls is None:
            raise ValueError("tls_required needs a TLS context")
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
        self.tls = tls  # offered through STARTTLS; required: nothing else before it
        self.tls_required = tls_required
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
            if not _loopback(host) and not self.tls_required:
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
    tls: ssl.SSLContext | None = None,
    tls_required: bool = False,
) -> NbdServer:
    """Export target over NBD on a unix socket or a TCP port (exactly one); returns the server.

    The caller owns the event loop; close() and wait_closed() on the result stop the export,
    drop its clients and remove the unix socket file.
    """
    server = NbdServer(target, max_connections=max_connections, tls=tls,
                       tls_required=tls_required)
    await server.listen(unix_path=unix_path, host=host, port=port)
    return server
