"""vhost-user wire format (QEMU ``docs/interop/vhost-user.rst``): header, requests, payloads.

One module per wire format: layouts, constants and parsers only, for both roles (our back-end in
``backend/vhost_user*.py``, our front-end in ``frontend/vhost_user.py``). Everything a peer sends
is untrusted, so every parser here validates what it can see in the bytes alone (sizes, counts,
flag bits, region wraps and overlaps) and raises :class:`VhostUserError`; what needs state (is a
memory table in place, is this queue index below the device's count) is the role's business.

All numbers are in the machine's native byte order (the spec says so: both ends share a host).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from ..errors import VhostUserError

# --- header -------------------------------------------------------------------------------------
HEADER: Final = struct.Struct("=III")  # request, flags, size
HEADER_SIZE: Final = HEADER.size  # 12

VERSION: Final = 0x1
VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8
KNOWN_FLAGS: Final = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

MAX_FDS: Final = 8
"""At most this many fds ride on one message (QEMU's VHOST_MEMORY_BASELINE_NREGIONS)."""
MAX_MEM_REGIONS: Final = 8
"""Regions in one SET_MEM_TABLE (the table has room for exactly 8)."""
MAX_CONFIG_SIZE: Final = 256
"""Largest config-space payload of GET/SET_CONFIG (QEMU's VHOST_USER_MAX_CONFIG_SIZE)."""

# --- feature bits -------------------------------------------------------------------------------
F_PROTOCOL_FEATURES: Final = 30
"""VHOST_USER_F_PROTOCOL_FEATURES: the reserved virtio bit 30 reused to gate protocol features."""
F_LOG_ALL: Final = 26
"""VHOST_F_LOG_ALL (dirty logging for migration); only meaningful with LOG_SHMFD."""


class ProtocolFeature(IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5  # formerly SLAVE_REQ
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10  # formerly SLAVE_SEND_FD
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def protocol_mask(*bits: ProtocolFeature) -> int:
    out = 0
    for b in bits:
        out |= 1 << b
    return out


# --- requests -----------------------------------------------------------------------------------
class Request(IntEnum):
    """Front-end -> back-end requests (``VHOST_USER_*``)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(IntEnum):
    """Back-end -> front-end requests on the optional back-end channel (VHOST_USER_BACKEND_*)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


REPLY_REQUIRED: Final = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
})
"""Requests whose reply carries a body (sent whether or not NEED_REPLY is set); every other
request is answered only with REPLY_ACK negotiated and NEED_REPLY set, by a u64 (0 = success)."""

# --- payloads -----------------------------------------------------------------------------------
U64: Final = struct.Struct("=Q")
VRING_STATE: Final = struct.Struct("=II")  # index, num
VRING_ADDR: Final = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log (40 bytes)
MEM_TABLE_HEADER: Final = struct.Struct("=II")  # nregions, padding
MEM_REGION: Final = struct.Struct("=QQQQ")  # guest addr, size, user addr, mmap offset
SINGLE_MEM_REGION: Final = struct.Struct("=QQQQQ")  # padding, then one MEM_REGION
CONFIG_HEADER: Final = struct.Struct("=III")  # offset, size, flags
LOG: Final = struct.Struct("=QQ")  # mmap_size, mmap_offset

VRING_IDX_MASK: Final = 0xFF
"""SET_VRING_KICK/CALL/ERR u64: bits 0-7 are the ring index..."""
VRING_NOFD_MASK: Final = 0x100
"""...bit 8 says no fd came with the message (poll instead of waiting on an eventfd)."""
VRING_F_LOG: Final = 0x1
"""vhost_vring_addr.flags bit: log writes to the used ring (migration)."""

CONFIG_FLAG_WRITABLE: Final = 0
CONFIG_FLAG_MIGRATION: Final = 1

_FIXED_SIZE: Final[dict[int, int]] = {
    Request.GET_FEATURES: 0, Request.SET_FEATURES: U64.size, Request.SET_OWNER: 0,
    Request.RESET_OWNER: 0, Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size, Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size, Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size, Request.SET_VRING_ERR: U64.size,
    Request.GET_PROTOCOL_FEATURES: 0, Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.GET_QUEUE_NUM: 0, Request.SET_VRING_ENABLE: VRING_STATE.size,
    Request.RESET_DEVICE: 0, Request.VRING_KICK: VRING_STATE.size,
    Request.GET_MAX_MEM_SLOTS: 0, Request.ADD_MEM_REG: SINGLE_MEM_REGION.size,
    Request.REM_MEM_REG: SINGLE_MEM_REGION.size, Request.SET_STATUS: U64.size,
    Request.GET_STATUS: 0, Request.SET_LOG_BASE: LOG.size,
}
"""Exact request payload sizes; SET_MEM_TABLE and GET/SET_CONFIG are checked by their parsers."""

MAX_PAYLOAD: Final = max(MEM_TABLE_HEADER.size + MAX_MEM_REGIONS * MEM_REGION.size,
                         CONFIG_HEADER.size + MAX_CONFIG_SIZE)
"""No message we understand is larger (268 bytes, a full config); a header claiming more is bad."""

_U64_MAX: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def parse_header(data: bytes | bytearray | memoryview) -> Header:
    """Validate a 12-byte header: version 1, no unknown flag bits, a payload we can hold."""
    if len(data) != HEADER_SIZE:
        raise VhostUserError(f"vhost-user header of {len(data)} bytes, want {HEADER_SIZE}")
    request, flags, size = HEADER.unpack(data)
    if flags & VERSION_MASK != VERSION:
        raise VhostUserError(f"vhost-user version {flags & VERSION_MASK}, want {VERSION}")
    if flags & ~KNOWN_FLAGS:
        raise VhostUserError(f"vhost-user header flags {flags:#x} carry unknown bits")
    if size > MAX_PAYLOAD:
        raise VhostUserError(f"vhost-user payload of {size} bytes (most is {MAX_PAYLOAD})")
    return Header(request, flags, size)


def encode(request: int, payload: bytes = b"", *, flags: int = 0) -> bytes:
    """One message: header (version 1 plus ``flags``) and payload."""
    return HEADER.pack(request, VERSION | flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    """The back-end's reply to ``request`` (REPLY set, version 1)."""
    return encode(request, payload, flags=FLAG_REPLY)


def check_request_size(request: int, size: int) -> None:
    """Refuse a payload size the request cannot have (only for requests of fixed size)."""
    want = _FIXED_SIZE.get(request)
    if want is not None and size != want:
        raise VhostUserError(f"{_name(request)} payload of {size} bytes, want {want}")


def check_reply(header: Header, request: int) -> None:
    """A front-end's check of a reply header (REPLY set, the same request)."""
    if not header.is_reply or header.request != request:
        raise VhostUserError(f"expected the reply to {_name(request)}, got {_name(header.request)} "
                             f"flags {header.flags:#x}")


def _name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def request_name(request: int) -> str:
    """A readable name for a front-end request number (for logs: never raises)."""
    return _name(request)


def parse_u64(payload: bytes | memoryview) -> int:
    if len(payload) != U64.size:
        raise VhostUserError(f"u64 payload of {len(payload)} bytes")
    return int(U64.unpack(payload)[0])


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int

    @classmethod
    def parse(cls, payload: bytes | memoryview) -> VringState:
        if len(payload) != VRING_STATE.size:
            raise VhostUserError(f"vring state payload of {len(payload)} bytes")
        return cls(*VRING_STATE.unpack(payload))

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """SET_VRING_ADDR: ring addresses in the front-end's *user* (virtual) address space."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int

    @classmethod
    def parse(cls, payload: bytes | memoryview) -> VringAddr:
        if len(payload) != VRING_ADDR.size:
            raise VhostUserError(f"vring address payload of {len(payload)} bytes")
        addr = cls(*VRING_ADDR.unpack(payload))
        if addr.flags & ~VRING_F_LOG:
            raise VhostUserError(f"vring address flags {addr.flags:#x} carry unknown bits")
        return addr

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc, self.used, self.avail, self.log)


@dataclass(frozen=True, slots=True)
class VringFd:
    """The u64 of SET_VRING_KICK/CALL/ERR: a ring index and whether an fd came along."""

    index: int
    nofd: bool

    @classmethod
    def parse(cls, payload: bytes | memoryview, nfds: int) -> VringFd:
        value = parse_u64(payload)
        if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise VhostUserError(f"vring fd payload {value:#x} carries unknown bits")
        nofd = bool(value & VRING_NOFD_MASK)
        if nfds != (0 if nofd else 1):
            raise VhostUserError(f"vring fd message with {nfds} fds, its invalid-fd flag "
                                 f"{'set' if nofd else 'clear'}")
        return cls(value & VRING_IDX_MASK, nofd)

    def pack(self) -> bytes:
        return encode_u64(self.index | (VRING_NOFD_MASK if self.nofd else 0))


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One guest memory region: ``size`` bytes at guest-physical ``guest_addr`` and at front-end
    virtual ``user_addr``, found at ``mmap_offset`` in the fd that comes with it."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int

    @classmethod
    def parse(cls, raw: bytes | memoryview) -> MemRegion:
        region = cls(*MEM_REGION.unpack(raw))
        region.validate()
        return region

    def validate(self) -> None:
        if self.size == 0:
            raise VhostUserError("memory region of size 0")
        for what, base in (("guest", self.guest_addr), ("user", self.user_addr),
                           ("mmap offset", self.mmap_offset)):
            if base + self.size - 1 > _U64_MAX:
                raise VhostUserError(f"memory region {what} range {base:#x}+{self.size:#x} wraps")

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.guest_addr, self.size, self.user_addr, self.mmap_offset)


def check_no_overlap(regions: Sequence[MemRegion]) -> None:
    """Two regions may share neither guest-physical nor user addresses: translation would be
    ambiguous (and a hostile table could alias one page under two guest addresses)."""
    for what in ("guest_addr", "user_addr"):
        spans = sorted((getattr(r, what), r.size) for r in regions)
        for (a, asize), (b, _) in zip(spans, spans[1:], strict=False):
            if b < a + asize:
                raise VhostUserError(f"memory regions overlap in {what.split('_')[0]} space at "
                                     f"{a:#x}+{asize:#x} and {b:#x}")


def parse_mem_table(payload: bytes | memoryview, nfds: int) -> list[MemRegion]:
    """SET_MEM_TABLE: 1..8 regions, one fd each (in order), no wraps, no overlaps."""
    if len(payload) < MEM_TABLE_HEADER.size:
        raise VhostUserError(f"memory table payload of {len(payload)} bytes")
    nregions, _pad = MEM_TABLE_HEADER.unpack_from(payload)
    if not 1 <= nregions <= MAX_MEM_REGIONS:
        raise VhostUserError(f"memory table of {nregions} regions (1..{MAX_MEM_REGIONS})")
    want = MEM_TABLE_HEADER.size + nregions * MEM_REGION.size
    if len(payload) != want:
        raise VhostUserError(f"memory table of {nregions} regions in {len(payload)} bytes, "
                             f"want {want}")
    if nfds != nregions:
        raise VhostUserError(f"memory table of {nregions} regions came with {nfds} fds")
    regions = [MemRegion.parse(memoryview(payload)[off:off + MEM_REGION.size])
               for off in range(MEM_TABLE_HEADER.size, want, MEM_REGION.size)]
    check_no_overlap(regions)
    return regions


def encode_mem_table(regions: Sequence[MemRegion]) -> bytes:
    return (MEM_TABLE_HEADER.pack(len(regions), 0)
            + b"".join(r.pack() for r in regions))


def parse_single_region(payload: bytes | memoryview) -> MemRegion:
    """ADD_MEM_REG / REM_MEM_REG payload (8 bytes of padding, then one region)."""
    if len(payload) != SINGLE_MEM_REGION.size:
        raise VhostUserError(f"single memory region payload of {len(payload)} bytes")
    return MemRegion.parse(memoryview(payload)[8:])


def encode_single_region(region: MemRegion) -> bytes:
    return U64.pack(0) + region.pack()


@dataclass(frozen=True, slots=True)
class ConfigMsg:
    """GET_CONFIG / SET_CONFIG: ``size`` bytes of device config space at ``offset``."""

    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def parse(cls, payload: bytes | memoryview) -> ConfigMsg:
        if len(payload) < CONFIG_HEADER.size:
            raise VhostUserError(f"config payload of {len(payload)} bytes")
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
            raise VhostUserError(f"config access {offset}+{size} beyond {MAX_CONFIG_SIZE} bytes")
        if len(payload) != CONFIG_HEADER.size + size:
            raise VhostUserError(f"config payload of {len(payload)} bytes for a size of {size}")
        if flags not in (CONFIG_FLAG_WRITABLE, CONFIG_FLAG_MIGRATION):
            raise VhostUserError(f"config flags {flags:#x}")
        return cls(offset, size, flags, bytes(payload[CONFIG_HEADER.size:]))

    def pack(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, len(self.data), self.flags) + self.data
