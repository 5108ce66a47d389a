"""NBD wire format (NetworkBlockDevice/nbd doc/proto.md): constants, layouts, message parsing.

Nothing here does I/O or keeps state, so the server (:mod:`frontend.nbd`, its connections in
:mod:`frontend.nbd_session` and :mod:`frontend.nbd_handshake`) and the tests and fuzzers build
and take apart the same bytes, and both phases raise the same :class:`NbdProtocolError`.
Parsers return None on input whose lengths do not add up; the server answers that with
NBD_REP_ERR_INVALID.
"""

from __future__ import annotations

import errno
import struct
from typing import Final

# --- Protocol constants (NetworkBlockDevice/nbd doc/proto.md) ---------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

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
OPT_LIST_META_CONTEXT: Final = 9
OPT_SET_META_CONTEXT: Final = 10

# Option reply types.
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_ERR_UNSUP: Final = (1 << 31) + 1
REP_ERR_POLICY: Final = (1 << 31) + 2
REP_ERR_INVALID: Final = (1 << 31) + 3
REP_ERR_TLS_REQD: Final = (1 << 31) + 5

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
CMD_BLOCK_STATUS: Final = 7
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_REQ_ONE: Final = 1 << 3

# Structured reply chunks.
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_BLOCK_STATUS: Final = 5
REPLY_TYPE_ERROR: Final = (1 << 15) + 1

# The one metadata context (proto.md "The base: metadata namespace") and its flags.
BASE_ALLOCATION: Final = "base:allocation"
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1

CMD_NAMES: Final = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_DISC: "disc",
    CMD_FLUSH: "flush",
    CMD_TRIM: "trim",
    CMD_WRITE_ZEROES: "write_zeroes",
    CMD_BLOCK_STATUS: "block_status",
}
WRITING_CMDS: Final = frozenset({CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES})

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

GREETING: Final = struct.Struct(">QQH")
OPTION_HEADER: Final = struct.Struct(">QII")
OPTION_REPLY: Final = struct.Struct(">QIII")
REQUEST: Final = struct.Struct(">IHHQQI")
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")  # magic, flags, type, handle, length


def nbd_error(exc: BaseException) -> int:
    """Map a target exception to an NBD error value; unknown errnos become EIO."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_TO_NBD.get(exc.errno, NBD_EIO)
    return NBD_EIO


def errname(value: int) -> str:
    """Name of an NBD error value for logs (the values are Linux errnos)."""
    return errno.errorcode.get(value, str(value))


def parse_info_request(data: bytes) -> bytes | None:
    """Export name of an NBD_OPT_INFO/GO payload, or None when the lengths do not add up."""
    if len(data) < 6:
        return None
    (name_len,) = struct.unpack_from(">I", data, 0)
    if 4 + name_len + 2 > len(data):
        return None
    (n_requests,) = struct.unpack_from(">H", data, 4 + name_len)
    if len(data) != 4 + name_len + 2 + 2 * n_requests:
        return None
    return data[4 : 4 + name_len]


def parse_meta_context_request(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """(export name, queries) of an NBD_OPT_LIST/SET_META_CONTEXT payload, or None."""
    if len(data) < 8:
        return None
    (name_len,) = struct.unpack_from(">I", data, 0)
    pos = 4 + name_len
    if pos + 4 > len(data):
        return None
    name = data[4:pos]
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (qlen,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + qlen > len(data):
            return None
        queries.append(data[pos : pos + qlen])
        pos += qlen
    return (name, queries) if pos == len(data) else None


def match_contexts(queries: list[bytes], *, listing: bool) -> list[str]:
    """The contexts of ours that queries name: only ``base:allocation`` exists.

    LIST with no query lists everything and ``base:`` is a wildcard there; SET selects only a
    full name (proto.md: ``base:`` MUST be ignored in SET, and so is any unknown name).
    """
    if listing and not queries:
        return [BASE_ALLOCATION]
    wanted = {BASE_ALLOCATION.encode()} | ({b"base:"} if listing else set())
    return [BASE_ALLOCATION] if any(q in wanted for q in queries) else []


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply, len(data)) + data


def simple_reply(handle: int, error: int) -> bytes:
    """The simple reply header; a successful READ's data follows it."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle: int, rtype: int, length: int, *, done: bool = True) -> bytes:
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, rtype,
                                 handle, length)


def offset_data_header(handle: int, offset: int, length: int) -> bytes:
    """Header of the one NBD_REPLY_TYPE_OFFSET_DATA chunk of a READ; length data bytes follow."""
    return chunk_header(handle, REPLY_TYPE_OFFSET_DATA, 8 + length) + struct.pack(">Q", offset)


def error_chunk(handle: int, error: int, message: str = "") -> bytes:
    """A final NBD_REPLY_TYPE_ERROR chunk with a message for the human at the client."""
    text = message.encode()[:4096]
    payload = struct.pack(">IH", error, len(text)) + text
    return chunk_header(handle, REPLY_TYPE_ERROR, len(payload)) + payload


def block_status_chunk(handle: int, context_id: int,
                       extents: list[tuple[int, int]]) -> bytes:
    """A final NBD_REPLY_TYPE_BLOCK_STATUS chunk: (length, flags) descriptors from offset on."""
    payload = struct.pack(">I", context_id) + b"".join(
        struct.pack(">II", length, flags) for length, flags in extents)
    return chunk_header(handle, REPLY_TYPE_BLOCK_STATUS, len(payload)) + payload


class NbdProtocolError(Exception):
    """The client broke the NBD protocol; the server drops that connection (hard disconnect)."""
