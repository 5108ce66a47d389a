"""NBD option haggling: the handshake phase of one connection, up to the transmission phase.

:class:`Handshake` greets the client (fixed newstyle, no zeroes), answers its options (LIST,
INFO/GO with the export's size, flags and block sizes, EXPORT_NAME, STRUCTURED_REPLY, LIST/SET
of the ``base:allocation`` metadata context, STARTTLS when the server has a certificate; anything
else is unsupported) and records what was
agreed (:attr:`Handshake.structured`, :attr:`Handshake.contexts`) for the transmission phase
(:mod:`ivshmem_virtio.frontend.nbd_session`). One export answers to any name. A client that sets
flags we did not offer, or sends a bad option magic or an over-long option, breaks the protocol
(:class:`NbdProtocolError`): the connection is dropped.

TLS (the NBD spec's "TLS support"): STARTTLS upgrades the connection in place and forgets what
was negotiated before it (structured replies, metadata contexts), as the spec requires. With
TLS required, every option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD until then,
and EXPORT_NAME (which has no error reply) drops the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from typing import TYPE_CHECKING, Final

import structlog

from .nbd_proto import (
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
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_LIST_META_CONTEXT,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION_HEADER,
    PREFERRED_BLOCK_SIZE,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TLS_REQD,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    NbdProtocolError,
    match_contexts,
    option_reply,
    parse_info_request,
    parse_meta_context_request,
)

if TYPE_CHECKING:
    from .nbd import BlockTarget

log = structlog.get_logger("ivshmem_virtio.nbd")

_CONTEXT_ID: Final = 1  # the id base:allocation gets from SET_META_CONTEXT


class Handshake:
    """Option haggling with one client; what it agreed stays here for the transmission phase."""

    def __init__(
        self,
        conn_id: int,
        peer: str,
        target: BlockTarget,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
    ) -> None:
        self.id = conn_id
        self.peer = peer
        self._target = target
        self._reader = reader
        self._writer = writer
        self.export_name = ""
        self.structured = False  # NBD_OPT_STRUCTURED_REPLY acknowledged
        self.contexts: dict[int, str] = {}  # metadata contexts selected: id -> name
        self._tls = tls
        self._tls_required = tls_required and tls is not None
        self.tls_active = False

    def transmission_flags(self) -> int:
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

    async def run(self) -> bool:
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

            if option == OPT_STARTTLS:
                await self._starttls(data)
                continue
            if self._tls_required and not self.tls_active and option != OPT_ABORT:
                if option == OPT_EXPORT_NAME:  # no error reply exists: hang up (the spec)
                    raise NbdProtocolError("EXPORT_NAME before STARTTLS; TLS is required")
                await self._send_option_reply(option, REP_ERR_TLS_REQD, b"TLS is required")
                continue
            if option == OPT_EXPORT_NAME:
                self._enter_transmission(data, "export_name")
                flags = self.transmission_flags()
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
                    struct.pack(">HQH", INFO_EXPORT, self._target.size, self.transmission_flags()),
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
                    self.structured = True
                    await self._send_option_reply(option, REP_ACK)
                continue
            if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                await self._meta_context(option, data)
                continue
            # STARTTLS, extended headers and anything unknown.
            log.debug("nbd option unsupported", conn=self.id, option=option)
            await self._send_option_reply(option, REP_ERR_UNSUP, b"option not supported")

    async def _starttls(self, data: bytes) -> None:
        if self._tls is None:
            await self._send_option_reply(OPT_STARTTLS, REP_ERR_UNSUP, b"no TLS configured")
            return
        if self.tls_active or data:
            why = b"TLS is already active" if self.tls_active else b"takes no data"
            await self._send_option_reply(OPT_STARTTLS, REP_ERR_INVALID, why)
            return
        await self._send_option_reply(OPT_STARTTLS, REP_ACK)
        try:
            await self._writer.start_tls(self._tls)
        except (ssl.SSLError, OSError) as e:
            raise NbdProtocolError(f"TLS handshake failed: {e}") from None
        self.tls_active = True
        self.structured = False  # everything negotiated in the clear is void (the spec)
        self.contexts = {}
        log.info("nbd tls", conn=self.id, version=self._writer.get_extra_info("ssl_object")
                 .version())

    async def _meta_context(self, option: int, data: bytes) -> None:
        """LIST or SET metadata contexts: ``base:allocation`` is the only one there is."""
        setting = option == OPT_SET_META_CONTEXT
        if setting:
            self.contexts = {}  # replaced even when this request fails (proto.md)
        request = parse_meta_context_request(data)
        if not self.structured:
            await self._send_option_reply(option, REP_ERR_INVALID,
                                          b"negotiate structured replies first")
            return
        if request is None:
            await self._send_option_reply(option, REP_ERR_INVALID, b"malformed request")
            return
        for name in match_contexts(request[1], listing=not setting):
            context_id = _CONTEXT_ID if setting else 0  # LIST: the id is reserved, 0
            if setting:
                self.contexts[context_id] = name
            await self._send_option_reply(option, REP_META_CONTEXT,
                                          struct.pack(">I", context_id) + name.encode())
        await self._send_option_reply(option, REP_ACK)

    def _enter_transmission(self, name: bytes, via: str) -> None:
        self.export_name = name.decode("utf-8", errors="replace")
        log.info(
            "nbd handshake done",
            conn=self.id,
            peer=self.peer,
            export=self.export_name,
            via=via,
            size=self._target.size,
            flags=self.transmission_flags(),
        )
