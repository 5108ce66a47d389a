"""virtio-blk device model: requests in, disk operations and status bytes out.

Synchronous and loop-free (Firecracker's ``request.rs`` split): :meth:`BlkModel.parse` validates
one descriptor chain from the untrusted driver and returns either a request to execute or the
final status, :meth:`BlkModel.execute` runs a request against a :class:`BlockImage`. The rules
are virtio 1.x §5.2 plus virtio-ivshmem.md §8.8: any descriptor layout, sectors past capacity get
IOERR, unknown types UNSUPP, and a chain with no writable status byte cannot be answered at all
(:class:`DeviceError`, which the transport turns into NEEDS_RESET).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ivshmem_virtio.errors import DeviceError
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.virtqueue.device import Chain

from ..resources.image import BlockImage

SEG = tuple[int, int]
_OUTHDR = B.OUTHDR
_HDR_SIZE = B.OUTHDR_SIZE
_T_IN = B.T_IN
_T_OUT = B.T_OUT
_INLINE = (B.T_IN, B.T_OUT, B.T_GET_ID)  # cheap enough to run on the loop; the rest is deferred


@dataclass(slots=True)
class BlkRequest:
    """A validated request: what to do, where the data is, where the status byte goes."""

    head: int
    type: int
    sector: int
    data: list[SEG]  # device-writable for IN/GET_ID, device-readable for OUT/DISCARD/WZ
    data_len: int
    status_addr: int


@dataclass
class BlkMetrics:
    read_count: int = 0
    read_bytes: int = 0
    write_count: int = 0
    write_bytes: int = 0
    flush_count: int = 0
    discard_count: int = 0
    write_zeroes_count: int = 0
    get_id_count: int = 0
    unsupported_count: int = 0
    invalid_request_count: int = 0
    io_fails: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        d.update(self.extra)
        return d


def _split_last_byte(segs: list[SEG]) -> tuple[list[SEG], int]:
    """Separate the status byte (the last writable byte) from the data before it."""
    addr, length = segs[-1]
    if length == 1:  # the usual layout: the status byte has a descriptor of its own
        return segs[:-1], addr
    return [*segs[:-1], (addr, length - 1)], addr + length - 1


def _total(segs: list[SEG]) -> int:
    """Bytes in ``segs`` (one segment is the common case: no generator for it)."""
    return segs[0][1] if len(segs) == 1 else sum(n for _, n in segs)


def _views(mem: Region, segs: list[SEG]) -> list[memoryview]:
    """Shared-memory views of the non-empty segments, for preadv/pwritev straight into them."""
    if len(segs) == 1 and segs[0][1]:
        return [mem.view(*segs[0])]
    return [mem.view(a, n) for a, n in segs if n]


def _skip(segs: list[SEG], nbytes: int) -> list[SEG]:
    """The segments after the first ``nbytes`` bytes (the request header)."""
    out = []
    for addr, length in segs:
        if nbytes >= length:
            nbytes -= length
            continue
        out.append((addr + nbytes, length - nbytes))
        nbytes = 0
    return out


def _gather(mem: Region, segs: list[SEG], nbytes: int) -> bytes:
    out = bytearray()
    for addr, length in segs:
        take = min(length, nbytes - len(out))
        out += mem.read(addr, take)
        if len(out) == nbytes:
            break
    return bytes(out)


class BlkModel:
    """One virtio-blk device's rules and config (no I/O of its own)."""

    def __init__(self, capacity_sectors: int, *, read_only: bool = False, serial: str = "",
                 size_max: int = 0x1B000, seg_max: int = 126, blk_size: int = 512,
                 max_discard_sectors: int = 1 << 22, max_discard_seg: int = 16) -> None:
        if capacity_sectors <= 0:
            raise ValueError("a disk needs at least one sector")
        self.capacity = capacity_sectors
        self.read_only = read_only
        self.serial = serial.encode()[: B.ID_BYTES]
        self.size_max = size_max
        self.seg_max = seg_max
        self.blk_size = blk_size
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_data = size_max * seg_max
        self.metrics = BlkMetrics()

    @property
    def features(self) -> int:
        f = (V.bit(B.F_SIZE_MAX) | V.bit(B.F_SEG_MAX) | V.bit(B.F_BLK_SIZE) | V.bit(B.F_FLUSH)
             | V.bit(V.F_EVENT_IDX) | V.bit(V.F_INDIRECT_DESC))
        if self.read_only:
            f |= V.bit(B.F_RO)
        else:
            f |= V.bit(B.F_DISCARD) | V.bit(B.F_WRITE_ZEROES)
        return f

    def config(self) -> bytes:
        return B.encode_config(
            capacity=self.capacity, size_max=self.size_max, seg_max=self.seg_max,
            blk_size=self.blk_size, num_queues=1,
            max_discard_sectors=self.max_discard_sectors, max_discard_seg=self.max_discard_seg,
            discard_sector_alignment=self.blk_size // 512,
            max_write_zeroes_sectors=self.max_discard_sectors,
            max_write_zeroes_seg=self.max_discard_seg, write_zeroes_may_unmap=1)

    # -- parsing ------------------------------------------------------------------------------
    def parse(self, mem: Region, chain: Chain) -> BlkRequest | tuple[int, int]:
        """A request to execute, or ``(status_addr, status)`` to answer at once.

        Raises :class:`DeviceError` when the chain has no usable status byte.
        """
        if not chain.writable or chain.writable[-1][1] < 1:
            raise DeviceError(f"request {chain.head} has no writable status byte")
        data_w, status = _split_last_byte(chain.writable)
        if chain.error is not None:  # (without an error the walk found every buffer inside)
            if not mem.contains(status, 1):
                raise DeviceError(f"request {chain.head}: status byte outside the shared "
                                  "section")
            self.metrics.invalid_request_count += 1
            return status, B.S_IOERR
        readable = chain.readable
        if len(readable) == 1 and readable[0][1] == B.OUTHDR_SIZE:  # the usual layout
            rtype, _ioprio, sector = mem.unpack(B.OUTHDR, readable[0][0])
            data_r: list[SEG] = []
        else:
            if _total(readable) < B.OUTHDR_SIZE:
                self.metrics.invalid_request_count += 1
                return status, B.S_IOERR
            rtype, _ioprio, sector = B.OUTHDR.unpack(_gather(mem, readable, B.OUTHDR_SIZE))
            data_r = _skip(readable, B.OUTHDR_SIZE)
        if rtype == B.T_IN:
            return self._rw(chain.head, rtype, sector, data_w, status)
        if rtype == B.T_OUT:
            if self.read_only:
                self.metrics.io_fails += 1
                return status, B.S_IOERR
            return self._rw(chain.head, rtype, sector, data_r, status)
        if rtype == B.T_FLUSH:
            return BlkRequest(chain.head, rtype, 0, [], 0, status)
        if rtype == B.T_GET_ID:
            return BlkRequest(chain.head, rtype, 0, data_w, _total(data_w), status)
        if rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
            if self.read_only:
                self.metrics.io_fails += 1
                return status, B.S_IOERR
            n = _total(data_r)
            if n == 0 or n % B.DWZ_SEG_SIZE or n // B.DWZ_SEG_SIZE > self.max_discard_seg:
                self.metrics.invalid_request_count += 1
                return status, B.S_IOERR
            return BlkRequest(chain.head, rtype, 0, data_r, n, status)
        self.metrics.unsupported_count += 1
        return status, B.S_UNSUPP

    def handle(self, mem: Region, chain: Chain, image: BlockImage) -> int | BlkRequest:
        """Answer a chain now if it can be: the used length (status written), else the request
        to :meth:`execute` off the loop (FLUSH, DISCARD, WRITE_ZEROES).

        The layout every driver we know sends for a read or a write (header, one data buffer,
        status byte: three descriptors, all inside the section) is checked and run right here,
        by the same rules as :meth:`parse` and :meth:`execute`, without the request object and
        the generic segment lists; anything else, errors included, takes the general path.
        """
        readable = chain.readable
        writable = chain.writable
        if chain.error is None and len(readable) + len(writable) == 3 and readable \
                and writable and readable[0][1] == _HDR_SIZE and writable[-1][1] == 1:
            rtype, _ioprio, sector = mem.unpack(_OUTHDR, readable[0][0])
            if rtype == _T_IN:
                data = writable[0] if len(writable) == 2 else None
            elif rtype == _T_OUT and not self.read_only:
                data = readable[1] if len(readable) == 2 else None
            else:
                data = None
            if data is not None:
                addr, n = data
                if 0 < n <= self.max_data and not n & 511 and sector < self.capacity \
                        and sector + (n >> 9) <= self.capacity:
                    return self._rw_now(mem, rtype, sector, addr, n, writable[-1][0], image)
        req = self.parse(mem, chain)
        if not isinstance(req, BlkRequest):
            mem.set_u8(req[0], req[1])
            return 1
        if req.type in _INLINE:
            return self.execute(mem, req, image)
        return req

    def _rw_now(self, mem: Region, rtype: int, sector: int, addr: int, n: int, status: int,
                image: BlockImage) -> int:
        """:meth:`execute` for a read or write of one valid, non-empty data buffer."""
        m = self.metrics
        try:
            if rtype == _T_IN:
                done = image.readv([mem.view(addr, n)], sector << 9)
                if done != n:
                    raise OSError(5, "short read: the image shrank")
                m.read_count += 1
                m.read_bytes += done
            else:
                done = image.writev([mem.view(addr, n)], sector << 9)
                if done != n:
                    raise OSError(28, "short write")
                m.write_count += 1
                m.write_bytes += done
                done = 0  # the device wrote only the status byte
        except OSError:
            m.io_fails += 1
            mem.set_u8(status, B.S_IOERR)
            return 1
        mem.set_u8(status, B.S_OK)
        return done + 1

    def _rw(self, head: int, rtype: int, sector: int, data: list[SEG],
            status: int) -> BlkRequest | tuple[int, int]:
        n = _total(data)
        if n % 512 or n > self.max_data or sector >= self.capacity \
                or sector + n // 512 > self.capacity:
            self.metrics.io_fails += 1
            return status, B.S_IOERR
        if len(data) > self.seg_max:  # more data segments than advertised: a driver error
            self.metrics.invalid_request_count += 1
            return status, B.S_IOERR
        return BlkRequest(head, rtype, sector, data, n, status)

    # -- execution ----------------------------------------------------------------------------
    def execute(self, mem: Region, req: BlkRequest, image: BlockImage) -> int:
        """Run one request; writes its status byte and returns the used length."""
        m = self.metrics
        written = 0
        try:
            if req.type == B.T_IN:
                views = _views(mem, req.data)
                got = image.readv(views, req.sector * 512) if views else 0
                if got != req.data_len:
                    raise OSError(5, "short read: the image shrank")
                written = got
                m.read_count += 1
                m.read_bytes += got
            elif req.type == B.T_OUT:
                views = _views(mem, req.data)
                done = image.writev(views, req.sector * 512) if views else 0
                if done != req.data_len:
                    raise OSError(28, "short write")
                m.write_count += 1
                m.write_bytes += done
            elif req.type == B.T_FLUSH:
                image.flush()
                m.flush_count += 1
            elif req.type == B.T_GET_ID:
                ident = self.serial.ljust(B.ID_BYTES, b"\0")[: min(B.ID_BYTES, req.data_len)]
                pos = 0
                for addr, length in req.data:
                    take = min(length, len(ident) - pos)
                    mem.write(addr, ident[pos:pos + take])
                    pos += take
                written = pos
                m.get_id_count += 1
            else:
                status = self._discard_wz(mem, req, image)
                if status != B.S_OK:
                    mem.set_u8(req.status_addr, status)
                    return 1
        except OSError:
            m.io_fails += 1
            mem.set_u8(req.status_addr, B.S_IOERR)
            return 1
        mem.set_u8(req.status_addr, B.S_OK)
        return written + 1

    def _discard_wz(self, mem: Region, req: BlkRequest, image: BlockImage) -> int:
        raw = _gather(mem, req.data, req.data_len)
        ranges = []
        for i in range(0, len(raw), B.DWZ_SEG_SIZE):
            sector, count, flags = B.DWZ_SEG.unpack_from(raw, i)
            if flags & ~B.DWZ_F_UNMAP or (req.type == B.T_DISCARD and flags & B.DWZ_F_UNMAP):
                self.metrics.unsupported_count += 1
                return B.S_UNSUPP
            if count > self.max_discard_sectors or sector >= self.capacity \
                    or sector + count > self.capacity:
                self.metrics.io_fails += 1
                return B.S_IOERR
            ranges.append((sector, count, flags))
        for sector, count, flags in ranges:
            if req.type == B.T_DISCARD:
                image.discard(sector * 512, count * 512)
            else:
                image.write_zeroes(sector * 512, count * 512, bool(flags & B.DWZ_F_UNMAP))
        if req.type == B.T_DISCARD:
            self.metrics.discard_count += 1
        else:
            self.metrics.write_zeroes_count += 1
        return B.S_OK
