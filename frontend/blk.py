"""virtio-blk driver in Python: an async disk client with many requests in flight.

Buffers are bounced through the R/W section exactly as Linux's ``virtio_ivshmem`` DMA ops do:
allocate chunks, copy out, let the device work in place, copy back, free. Requests outlive a
backend restart: they are kept and resubmitted once the device is up again.

Unlike Linux, whose bounce pages are scattered, a request's bounce buffer here is one contiguous
allocation, so its data goes out as ONE descriptor and SIZE_MAX (the per-segment bound a backend
sets for Linux) is not negotiated; ``page_segments=True`` negotiates it and splits the data the
way Linux does (the tests use it to drive the multi-segment path).
"""

from __future__ import annotations

import asyncio
import errno
import struct
import weakref
from collections.abc import Iterable
from typing import Any, cast

import structlog

from ivshmem_virtio._native import front_native
from ivshmem_virtio.errors import TransportError
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.transport.allocator import ChunkAllocator
from ivshmem_virtio.virtqueue.driver import DriverQueue

from .driver import Device, VirtioDriver

log = structlog.get_logger("ivshmem_virtio.frontend")
INLINE_YIELD_EVERY = 8  # a lone caller completing in place yields to the loop this often
# readinto_many hands its requests to the ring in groups of this many: a polling backend starts
# on the first ones while the rest are being built (+8 % at QD32 over one group of 32)
MANY_PUMP = 8
_DATA_OFF = 64  # data after the header and status byte of a request's bounce buffer
_HDR = B.OUTHDR_SIZE  # the status byte follows the header
_OUTHDR_STATUS = struct.Struct(B.OUTHDR.format + "B")  # the header, then the status byte
_S_OK = B.S_OK
_T_IN = B.T_IN
_running_loop = asyncio.get_running_loop
WANTED = (V.bit(B.F_SEG_MAX) | V.bit(B.F_BLK_SIZE) | V.bit(B.F_FLUSH)
          | V.bit(B.F_RO) | V.bit(B.F_DISCARD) | V.bit(B.F_WRITE_ZEROES))


class BlkIOError(OSError):
    """A request the device answered with IOERR (errno EIO) or UNSUPP (EOPNOTSUPP)."""


class _Group:
    """The requests of one :meth:`BlkClient.readinto_many` call, standing in for their futures:
    one wake-up of the caller for however many completions came, not a task switch each."""

    __slots__ = ("left", "error", "waiter")

    def __init__(self) -> None:
        self.left = 0  # requests of the group not answered yet
        self.error: BaseException | None = None  # the first failure, raised once all ended
        self.waiter: asyncio.Future | None = None  # the caller's, while it waits

    def done(self) -> bool:
        return False  # (a future's: each request of the group is answered once)

    def set_result(self, _data: object) -> None:
        self.left -= 1
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.left -= 1
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class _Req:
    """One request in flight (a plain slots class: built once per request, on the hot path)."""

    __slots__ = ("type", "sector", "out", "in_len", "into", "future", "base")

    def __init__(self, rtype: int, sector: int, out: bytes | memoryview = b"", in_len: int = 0,
                 into: memoryview | bool | None = None, group: _Group | None = None) -> None:
        self.type = rtype
        self.sector = sector
        self.out = out  # payload the device reads (OUT, DISCARD, WRITE_ZEROES)
        self.in_len = in_len  # bytes the device writes before the status (IN, GET_ID)
        # readinto: the caller's buffer, filled on completion; False: read_zerocopy (the data
        # stays in the bounce buffer, lent to the caller)
        self.into = into
        self.future: asyncio.Future | _Group = (
            _running_loop().create_future() if group is None else group)
        # offset of the bounce buffer while the request holds one (else -1), laid out as
        # [outhdr 16][status 1][pad to _DATA_OFF][data]: every address derives from it
        self.base = -1


class ZeroCopyRead:
    """The data of a :meth:`BlkClient.read_zerocopy`, where the device put it: a read-only view
    of the request's bounce buffer in shared memory, lent until :meth:`release` (or the end of
    a ``with`` block, whose target is the view).

    The memory stays the client's until then, so lent reads take from the bounce pool that
    every request needs (release them promptly). The view is shared memory: a backend can
    still write there, as it could have returned other data in the first place; a caller that
    needs bytes no one can change copies them (``bytes(view)``, or :meth:`BlkClient.readinto`).
    A device reset, a recovery from a backend restart and :meth:`BlkClient.close` end every
    lent view (using it then raises ValueError): that memory is reused by the new rings.
    """

    __slots__ = ("_client", "_alloc", "_base", "_view", "__weakref__")

    def __init__(self, client: BlkClient, alloc: ChunkAllocator, base: int,
                 view: memoryview) -> None:
        self._client = client
        self._alloc = alloc
        self._base = base
        self._view: memoryview | None = view

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ValueError("zero-copy read already released")
        return self._view

    def release(self) -> None:
        """Give the bounce buffer back (idempotent): the view ends. Views made from it
        (``memoryview(view)``, ``numpy.frombuffer(view)``) do not end with it, and like it
        must not be used after: the memory is handed out to other requests again. BufferError
        while a C-level export of the view itself is live: the memory then stays lent."""
        view = self._view
        if view is None:
            return
        view.release()  # (raises BufferError, and nothing changes, while exported)
        self._view = None
        self._client._lent.discard(self)
        self._alloc.free(self._base)  # (a reset or bring-up since would have ended the view)

    def _invalidate(self) -> None:
        """The device's memory is about to be reused: the view ends, nothing is freed."""
        view, self._view = self._view, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                log.warning("a zero-copy read is still exported while its memory is reused",
                            link=self._client.dev.name)

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()  # a lent buffer dropped without release goes back to the pool
        except Exception:  # noqa: BLE001,S110 - (exported, or at interpreter exit)
            pass


class BlkClient(VirtioDriver):
    """A remote disk: ``await read(offset, n)``, ``write``, ``flush``, ``discard``, ..."""

    device_id = B.DEVICE_ID
    num_queues = 1

    def __init__(self, dev: Device, *, event_idx: bool = True, indirect: bool = True,
                 page_segments: bool = False, **kw: object) -> None:
        features = WANTED
        if page_segments:
            features |= V.bit(B.F_SIZE_MAX)
        if event_idx:
            features |= V.bit(V.F_EVENT_IDX)
        if indirect:
            features |= V.bit(V.F_INDIRECT_DESC)
        super().__init__(dev, features=features, **kw)  # type: ignore[arg-type]
        self._backlog: list[_Req] = []
        self._callers = 0  # tasks inside _submit: the inline QD1 path is for a lone caller
        self._inline_run = 0  # inline completions since the caller last yielded
        self.completed = 0
        # requests added to the ring whose on_used has not run yet: they still hold bounce
        # memory even after get_used() returned their descriptors to the free list
        self._outstanding = 0
        self._lent: weakref.WeakSet[ZeroCopyRead] = weakref.WeakSet()  # read_zerocopy's
        #: the compiled queue (``_native._frontpath.DriverQueue``) in vqs[0]'s place, or None:
        #: places, adds and completes the usual requests in C (the Python path is the reference)
        self._fast: Any = None

    # -- geometry from the device config ---------------------------------------------------------
    def on_queues_ready(self) -> None:
        self._fast = None
        nat = front_native()
        vq = self.vqs[0]
        # the compiled queue knows one flat window of memory (ivshmem's R/W section); guest
        # memory of several regions (vhost-user) keeps the Python queue
        if nat is not None and isinstance(vq, DriverQueue) and type(vq.mem) is Region:
            self._fast = self.vqs[0] = vq.compiled(nat)
        cfg = self.transport.read_config(0, B.CONFIG_SIZE)
        f = self.features

        def field_(name: str) -> int:
            off, size = B.CONFIG_FIELDS[name]
            return int.from_bytes(cfg[off:off + size], "little")

        offered = self.transport.device_features
        self.capacity = field_("capacity")
        self.size = self.capacity * 512
        self.read_only = bool(f & V.bit(B.F_RO))
        self.size_max = field_("size_max") if offered & V.bit(B.F_SIZE_MAX) else 1 << 16
        # the data in one descriptor, unless SIZE_MAX was negotiated (then: segments of it)
        self.segment = self.size_max if f & V.bit(B.F_SIZE_MAX) else 0
        self.seg_max = field_("seg_max") if f & V.bit(B.F_SEG_MAX) else 1
        self.seg_max = max(1, min(self.seg_max, self.vqs[0].size - 2))
        self.blk_size = field_("blk_size") if f & V.bit(B.F_BLK_SIZE) else 512
        # every byte in flight is bounced through the R/W section: one request may take at
        # most a quarter of it, so that several fit at once
        alloc = self.transport.allocator
        assert alloc is not None
        budget = max(512, (alloc.free_bytes // 4) // 512 * 512)
        # size_max x seg_max is also the largest request the device takes (offered bounds are
        # honoured as a total even where the per-segment bound is not negotiated)
        self.max_transfer = min(self.size_max * self.seg_max, budget)

    # -- public API -------------------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of 512); split into requests."""
        if self._one_request(offset, length):  # the common case: no gather, no extra task
            return await self._submit(_Req(B.T_IN, offset >> 9, in_len=length))
        self._check_range(offset, length)
        chunks = self._chunks(offset, length)
        parts = [self._submit(_Req(B.T_IN, off // 512, in_len=n)) for off, n in chunks]
        return b"".join(await asyncio.gather(*parts))

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> int:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``: the bounce buffer is copied once,
        straight into the caller's memory (``os.preadv`` semantics, no intermediate bytes)."""
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError("readinto needs a writable buffer")
        length = len(view)
        if self._one_request(offset, length):
            await self._submit(_Req(B.T_IN, offset >> 9, in_len=length, into=view))
            return length
        self._check_range(offset, length)
        await asyncio.gather(*[
            self._submit(_Req(B.T_IN, off // 512, in_len=n,
                              into=view[off - offset: off - offset + n]))
            for off, n in self._chunks(offset, length)])
        return length

    async def read_zerocopy(self, offset: int, length: int) -> ZeroCopyRead:
        """Read ``length`` bytes at ``offset`` (one request: at most ``max_transfer``) and lend
        them where the device put them, with no copy: a :class:`ZeroCopyRead` (``with (await
        disk.read_zerocopy(o, n)) as view: ...``). Saves the copy out of shared memory that
        :meth:`read`/:meth:`readinto` make, for a caller that uses the data in place."""
        if not self._one_request(offset, length):
            self._check_range(offset, length)
            raise ValueError(f"read_zerocopy takes one request: 512 to {self.max_transfer} "
                             f"bytes, not {length}")
        return cast(ZeroCopyRead,
                    await self._submit(_Req(_T_IN, offset >> 9, in_len=length, into=False)))

    def _lend(self, req: _Req, alloc: ChunkAllocator) -> ZeroCopyRead:
        """A completed read_zerocopy: its bounce buffer, now the caller's to release."""
        view = self.transport.hdr.view(req.base + _DATA_OFF, req.in_len).toreadonly()
        lent = ZeroCopyRead(self, alloc, req.base, view)
        self._lent.add(lent)
        return lent

    def _invalidate_lent(self) -> None:
        """The bounce memory is about to be reused (reset, new bring-up, close)."""
        for lent in list(self._lent):
            lent._invalidate()
        self._lent = weakref.WeakSet()

    async def readinto_many(self, reads: Iterable[tuple[int, bytearray | memoryview]],
                            depth: int = 32) -> int:
        """Read each ``(offset, buffer)`` of ``reads`` into its buffer, keeping up to ``depth``
        requests in flight (an iterator is consumed as requests complete; an entry larger than
        one request goes in whole, as the requests :meth:`readinto` would split it in); the
        bytes read.

        The batched form of :meth:`readinto` for a caller with many reads at hand (a copy, a
        prefetch, a server answering several clients), as ``io_submit``/io_uring are to
        ``preadv``: the requests go into the ring together behind one doorbell, and the caller
        wakes once for whatever completed, not once per request, so the per-request cost is
        the compiled queue's. Every request has ended (its buffer filled, or not) before this
        returns or raises. A bad entry (range, alignment, a read-only buffer, not a pair) or
        an iterable that raises ends the call: the entries before it are read, then it
        raises; a device error is raised once all requests ended (the first one). A cancel
        lets the requests already in the ring end, and those still waiting for room never
        start.
        """
        if depth < 1:
            raise ValueError("depth must be at least 1")
        group = _Group()
        backlog = self._backlog
        pending = iter(reads)
        one_request = self._one_request
        req_ = _Req
        total = 0
        bad: Exception | None = None
        self._callers += 1  # no lone caller's inline path beside us
        try:
            while True:
                if self.closed:
                    raise ConnectionError("device closed")
                while bad is None and group.left < depth:
                    try:
                        item = next(pending, None)
                    except Exception as e:  # noqa: BLE001 - the caller's iterable failed: as
                        bad = e  # a bad entry, the entries it gave before are read first
                        break
                    if item is None:
                        break
                    try:
                        offset, buf = item
                        view = memoryview(buf).cast("B")
                        length = len(view)
                        if one_request(offset, length) and not view.readonly:
                            backlog.append(req_(_T_IN, offset >> 9, b"", length, view, group))
                            group.left += 1
                            total += length
                            if len(backlog) >= MANY_PUMP:
                                self.loud(0)
                                self._pump()
                            continue
                        if view.readonly:
                            raise TypeError("readinto_many needs writable buffers")
                        self._check_range(offset, length)
                    except (TypeError, ValueError, OSError) as e:
                        bad = e  # the entries before it are read first
                        break
                    for off, n in self._chunks(offset, length):
                        backlog.append(_Req(_T_IN, off >> 9, in_len=n, group=group,
                                            into=view[off - offset: off - offset + n]))
                        group.left += 1
                    total += length
                if not group.left:
                    break
                self.loud(0)  # the interrupt task reaps: completions must interrupt
                self._pump()
                await self._group_progress(group)
        finally:
            try:
                if group.left:  # a cancel: what is still waiting for room never starts
                    kept = [r for r in backlog if r.future is not group]
                    group.left -= len(backlog) - len(kept)
                    backlog[:] = kept
                while group.left:  # what is in the ring ends first (a close fails it all)
                    await self._group_progress(group)
            finally:
                self._callers -= 1
        if bad is not None:
            raise bad
        if group.error is not None:
            raise group.error
        return total

    async def _group_progress(self, group: _Group) -> None:
        """Wait until at least one request of ``group`` has been answered."""
        left = group.left
        while group.left == left:
            group.waiter = _running_loop().create_future()
            try:
                await group.waiter
            finally:
                group.waiter = None

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        self._check_range(offset, len(data))
        if self.read_only:
            raise BlkIOError(errno.EROFS, "read-only device")
        chunks = self._chunks(offset, len(data))
        if len(chunks) == 1:
            await self._submit(_Req(B.T_OUT, offset // 512, out=data))
            return
        await asyncio.gather(*[self._submit(_Req(B.T_OUT, off // 512,
                                                 out=data[off - offset: off - offset + n]))
                               for off, n in chunks])

    async def flush(self) -> None:
        await self._submit(_Req(B.T_FLUSH, 0))

    async def get_id(self) -> str:
        raw = await self._submit(_Req(B.T_GET_ID, 0, in_len=B.ID_BYTES))
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    async def discard(self, offset: int, length: int) -> None:
        await self._ranges(B.T_DISCARD, offset, length, 0)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        await self._ranges(B.T_WRITE_ZEROES, offset, length, B.DWZ_F_UNMAP if may_unmap else 0)

    async def _ranges(self, rtype: int, offset: int, length: int, flags: int) -> None:
        self._check_range(offset, length)
        step = 1 << 22  # sectors per segment, within max_discard_sectors
        segs = b""
        for sec in range(offset // 512, (offset + length) // 512, step):
            count = min(step, (offset + length) // 512 - sec)
            segs += B.DWZ_SEG.pack(sec, count, flags)
        await self._submit(_Req(rtype, 0, out=segs))

    def _one_request(self, offset: int, length: int) -> bool:
        """A valid, non-empty range that fits one request (what _check_range + _chunks would
        accept as a single chunk, decided without building the chunk list)."""
        return 0 < length <= self.max_transfer and not (offset | length) & 511 \
            and 0 <= offset <= self.size - length

    def _check_range(self, offset: int, length: int) -> None:
        if offset % 512 or length % 512 or offset < 0 or length < 0:
            raise ValueError("offset and length must be multiples of 512")
        if offset + length > self.size:
            raise BlkIOError(errno.ENOSPC, f"{offset + length} past the end ({self.size})")

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = max(512, (self.max_transfer // 512) * 512)
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    # -- the queue --------------------------------------------------------------------------------
    async def _submit(self, req: _Req) -> bytes:
        if self.closed:
            raise ConnectionError("device closed")
        # the only caller with the only request: wait for it right here (the QD1 latency
        # path). Never with more callers: their requests would be serialized behind our spin
        # instead of being in flight together.
        lone = not self._callers and not self._outstanding and not self._backlog \
            and self.connected.is_set()
        inline = lone and self.inline_ok()
        if inline:
            self.quiet(0)
        else:
            self.loud(0)  # before the request is in the ring: its completion must interrupt
            if lone:
                self.lone_waiting()
        self._backlog.append(req)
        self._pump()
        self._callers += 1
        try:
            if inline and req.base >= 0:
                self.reap_inline(0)
                if req.future.done():
                    # it never suspended: every few requests give the other tasks their turn,
                    # as awaiting a pending future would (a task issuing requests back to back
                    # would otherwise keep the loop to itself)
                    self._inline_run += 1
                    if self._inline_run >= INLINE_YIELD_EVERY:
                        self._inline_run = 0
                        await asyncio.sleep(0)
            return await cast(asyncio.Future, req.future)  # (a group's request: never here)
        finally:
            self._callers -= 1

    def _pump(self) -> None:
        """Move backlog requests into the ring while descriptors and memory last."""
        if not self.connected.is_set() or not self.vqs:
            return
        vq = self.vqs[0]
        fast = self._fast
        alloc = self.transport.allocator
        segment = self.segment
        backlog = self._backlog
        added = False
        while backlog:
            req = backlog[0]
            n = len(req.out) or req.in_len
            one = not segment or n <= segment  # the data fits one descriptor
            # room in the ring first: a request that must wait takes no bounce memory
            if not vq.can_add(3 if n and one else 2 + -(-n // segment) if n else 2):
                break
            try:
                if fast is not None and one:
                    # the compiled path: the same placement and chain as _place + add, in C
                    assert alloc is not None
                    req.base = base = alloc.alloc(_DATA_OFF + n)
                    fast.add_blk(req, req.type, req.sector, base, req.out or None, req.in_len,
                                 req.into)
                else:
                    out, inn = self._place(req)
                    vq.add(out, inn, req)
            except TransportError as e:  # no bounce memory, or none for an indirect table
                self._free(req)
                if self._outstanding == 0:  # nothing in flight will free memory for it
                    backlog.pop(0)
                    req.future.set_exception(BlkIOError(errno.ENOMEM, str(e)))
                    continue
                break  # shared memory full: wait for completions
            backlog.pop(0)
            self._outstanding += 1
            added = True
        if added and vq.kick_needed():
            self.transport.kick(0)

    def _place(self, req: _Req) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Bounce one request through ONE allocation: header, status byte, then the data.

        ``[outhdr 16][status 1][pad to 64][data]``: the data stays cache-line aligned and a
        request costs one allocator call however many descriptors it spans.
        """
        t = self.transport
        alloc = t.allocator
        assert alloc is not None
        mem = t.hdr
        payload = req.out
        n = len(payload) or req.in_len
        req.base = base = alloc.alloc(_DATA_OFF + n)
        mem.pack(_OUTHDR_STATUS, base, req.type, 0, req.sector, 0xFF)  # status: not answered
        status = base + _HDR
        data = base + _DATA_OFF
        one = not self.segment or n <= self.segment  # the data fits one descriptor
        if payload:
            mem.write(data, payload)
            if one:
                return [(base, _HDR), (data, n)], [(status, 1)]
            return [(base, _HDR), *self._segments(data, n)], [(status, 1)]
        if not n:
            return [(base, _HDR)], [(status, 1)]
        if one:
            return [(base, _HDR)], [(data, n), (status, 1)]
        return [(base, _HDR)], [*self._segments(data, n), (status, 1)]

    def _segments(self, addr: int, length: int) -> list[tuple[int, int]]:
        step = self.segment
        if not step or length <= step:
            return [(addr, length)]
        return [(addr + pos, min(step, length - pos)) for pos in range(0, length, step)]

    def _free(self, req: _Req) -> None:
        alloc = self.transport.allocator
        if alloc is not None and req.base >= 0:
            alloc.free(req.base)
        req.base = -1

    def on_used(self, index: int, token: object, length: int) -> None:
        req = token
        assert isinstance(req, _Req)
        self._outstanding -= 1
        t = self.transport
        mem = t.hdr
        base = req.base
        status = mem.u8(base + _HDR)
        data = b""
        in_len = req.in_len
        if status == _S_OK and in_len:
            n = length - 1 if length > 0 else 0  # the bytes before the status byte ...
            if n > in_len:
                n = in_len  # ... of the buffer we gave it (min/max cost two calls)
            if n != in_len and req.type == _T_IN:
                status = B.S_IOERR  # a device must return all of a read
            # the segments are one contiguous buffer
            into = req.into
            if into is None:
                data = mem.read(base + _DATA_OFF, n)
            elif status == _S_OK and into is not False:  # (False: lent, see _finish)
                mem.read_into(base + _DATA_OFF, cast(memoryview, into))
        self._finish(req, status, data)

    def take_used(self, index: int, vq: DriverQueue) -> int:
        """The compiled queue collects and checks the completions of the requests it placed
        (``reap_blk``: on_used's status check and copy, in C); the rest go to on_used."""
        fast = self._fast
        if fast is None or vq is not fast:
            return super().take_used(index, vq)
        done = self._fast.reap_blk()
        for req, length, status, data in done:
            if status < 0:
                self.on_used(index, req, length)
            else:
                self._outstanding -= 1
                self._finish(req, status, b"" if data is None else data)
        return len(done)

    def _finish(self, req: _Req, status: int, data: bytes) -> None:
        """The end of a request: its bounce buffer freed (or lent: read_zerocopy), its caller
        answered."""
        alloc = self.transport.allocator
        fut = req.future
        self.completed += 1
        if req.into is False and status == _S_OK and not fut.done() and alloc is not None:
            fut.set_result(self._lend(req, alloc))  # the buffer is the caller's until released
        else:
            if alloc is not None:
                alloc.free(req.base)
            if not fut.done():
                if status == _S_OK:
                    fut.set_result(data)
                elif status == B.S_UNSUPP:
                    fut.set_exception(BlkIOError(errno.EOPNOTSUPP, "unsupported request"))
                else:
                    fut.set_exception(BlkIOError(errno.EIO, f"device status {status}"))
        req.base = -1
        if self._backlog:
            self._pump()

    def resubmit(self, tokens: list[object]) -> None:
        reqs = [t for t in tokens if isinstance(t, _Req)]
        for r in reqs:
            r.base = -1  # the allocator was rebuilt with the new bring-up
        self._backlog[:0] = reqs
        self._pump()

    def fail_all(self, exc: BaseException, tokens: list[object] | None = None) -> None:
        reqs = list(self._backlog) if tokens is None else []
        if tokens is None:
            self._backlog.clear()
            reqs += [t for vq in self.vqs for t in vq.in_flight() if isinstance(t, _Req)]
        else:
            reqs += [t for t in tokens if isinstance(t, _Req)]
        for r in reqs:
            if not r.future.done():
                r.future.set_exception(exc)

    async def _bring_up(self, timeout: float | None = None) -> None:
        self._invalidate_lent()  # the new bring-up's allocator hands that memory out again
        await super()._bring_up(timeout)
        self._outstanding = 0  # a fresh ring: what was in flight is resubmitted or failed
        self._pump()

    async def reset_device(self, queue_size: int | None = None) -> None:
        self._invalidate_lent()
        await super().reset_device(queue_size)

    async def close(self) -> None:
        self._invalidate_lent()
        await super().close()
