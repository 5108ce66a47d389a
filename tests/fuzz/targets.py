"""The fuzz targets: a valid input built, a few fields mutated, the REAL code driven with it.

Each :class:`Target` has ``case(rng, mutations)`` (a valid input with that many structure-aware
mutations, as bytes) and ``run(data)`` (drive the product code; True when the input reached the
deepest stage: a request executed, a frame accepted, a transaction applied). ``run`` raises only
on a crash: an exception the code must never let out, or a broken invariant (an access outside
the image, a status byte outside {OK, IOERR, UNSUPP}, a transaction left pending). The same
``run`` is what atheris calls with its own mutations of the corpus (tests/fuzz/atheris_main.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ivshmem_virtio.backend.devices.blk import BlkModel, BlkRequest
from ivshmem_virtio.backend.devices.can_backend import CanBackend
from ivshmem_virtio.backend.runner import PEER_FAULTS
from ivshmem_virtio.frontend import nbd, nbd_session
from ivshmem_virtio.ivshmem import hub as hub_mod
from ivshmem_virtio.ivshmem.base import IvshmemDevice
from ivshmem_virtio.shm import Region
from ivshmem_virtio.spec import blk as B
from ivshmem_virtio.spec import can as W
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.spec import virtio as V
from ivshmem_virtio.transport.device import DeviceTransport
from ivshmem_virtio.virtqueue.device import DeviceQueue

from . import rings
from .rings import AVAIL, DATA, DESC, PARAMS, QSIZE, USED, RingImage

# -- shared helpers ------------------------------------------------------------------------------


def _queue(data: bytes) -> tuple[Region, DeviceQueue, int]:
    """The device queue of a ring case (geometry fixed and valid), positioned at last_avail."""
    flags, last_avail, mem = rings.decode(data)
    region = Region(mem, name="fuzz")
    vq = DeviceQueue(region, QSIZE, DESC, AVAIL, USED, event_idx=bool(flags & rings.P_EVENT_IDX),
                     indirect=bool(flags & rings.P_INDIRECT))
    vq.last_avail = vq.next_used = vq.signalled_used = last_avail
    return region, vq, data[3] if len(data) > 3 else 0


def _check_chain(region: Region, chain: object) -> None:
    """The walk's promise: every buffer inside the section, or the chain carries an error."""
    if chain.error is None:  # type: ignore[attr-defined]
        for addr, n in chain.readable + chain.writable:  # type: ignore[attr-defined]
            assert region.contains(addr, n), (chain, "buffer outside without an error")


def _ring_mutations(data: bytes, rng: random.Random, n: int,
                    extra: Callable[[bytearray, random.Random], None] | None = None) -> bytes:
    buf = bytearray(data)
    for _ in range(n):
        if extra is not None and rng.random() < 0.5:
            extra(buf, rng)
        else:
            rings.mutate_ring(buf, rng)
    return bytes(buf)


@dataclass
class Target:
    name: str
    stage: str  # what "deep" means for this target, printed with the count
    case: Callable[[random.Random, int], bytes]
    run: Callable[[bytes], bool]


# -- 1. ring walk (ivshmem_virtio/virtqueue/device.py) ------------------------------------------


def _ring_case(rng: random.Random, mutations: int) -> bytes:
    img = RingImage(rng)
    for _ in range(rng.randint(1, 3)):
        segs = [(img.alloc(n), n, w) for n, w in
                sorted(((rng.choice((1, 16, 64, 512)), rng.random() < 0.5)
                        for _ in range(rng.randint(1, 3))), key=lambda s: s[1])]
        img.chain(segs, indirect=rng.random() < 0.25)
    return _ring_mutations(img.encode(), rng, mutations)


def _ring_run(data: bytes) -> bool:
    region, vq, _ = _queue(data)
    try:
        chains = vq.pop_all()
    except PEER_FAULTS:
        return False  # the runner marks the device NEEDS_RESET
    for chain in chains:
        _check_chain(region, chain)
        vq.push(chain.head, 0)
    vq.publish()
    return any(c.error is None for c in chains)


# -- 2. virtio-blk parse + execute (backend/devices/blk.py) --------------------------------------

SECTORS = 64


class FuzzImage:
    """A BlockImage on a bytearray that fails the case if the model asks for anything outside."""

    def __init__(self) -> None:
        self.data = bytearray(SECTORS * 512)
        self.size = len(self.data)

    def _range(self, offset: int, n: int) -> None:
        assert 0 <= offset and 0 <= n and offset + n <= self.size, ("image access", offset, n)

    def readv(self, views: list[memoryview], offset: int) -> int:
        n = sum(len(v) for v in views)
        self._range(offset, n)
        for v in views:
            v[:] = self.data[offset:offset + len(v)]
            offset += len(v)
        return n

    def writev(self, views: list[memoryview], offset: int) -> int:
        n = sum(len(v) for v in views)
        self._range(offset, n)
        for v in views:
            self.data[offset:offset + len(v)] = v
            offset += len(v)
        return n

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        self._range(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._range(offset, length)
        self.data[offset:offset + length] = bytes(length)


_BLK_TYPES = (B.T_IN, B.T_IN, B.T_OUT, B.T_OUT, B.T_FLUSH, B.T_GET_ID, B.T_DISCARD,
              B.T_WRITE_ZEROES)


def _blk_case(rng: random.Random, mutations: int) -> bytes:
    img = RingImage(rng)
    for _ in range(rng.randint(1, 2)):
        rtype = rng.choice(_BLK_TYPES)
        hdr = img.alloc(16)
        sectors = rng.randint(1, 2)
        sector = rng.randrange(SECTORS - sectors + 1)
        img.put(hdr, B.OUTHDR.pack(rtype, 0, sector if rtype in (B.T_IN, B.T_OUT) else 0))
        segs = [(hdr, 16, False)]
        if rtype in (B.T_IN, B.T_OUT):
            n = 512 * sectors
            data = img.alloc(n)
            if rtype == B.T_OUT:
                img.put(data, rng.randbytes(n))
            if rng.random() < 0.3:  # Linux's page-segment split
                segs += [(data, 512, rtype == B.T_IN), (data + 512, n - 512, rtype == B.T_IN)]
                segs = [s for s in segs if s[1]]
            else:
                segs.append((data, n, rtype == B.T_IN))
        elif rtype == B.T_GET_ID:
            segs.append((img.alloc(B.ID_BYTES), B.ID_BYTES, True))
        elif rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):
            seg = img.alloc(16)
            count = rng.randint(1, 4)
            flags = B.DWZ_F_UNMAP if rtype == B.T_WRITE_ZEROES and rng.random() < 0.5 else 0
            img.put(seg, B.DWZ_SEG.pack(rng.randrange(SECTORS - count), count, flags))
            segs.append((seg, 16, False))
        segs.append((img.alloc(1), 1, True))
        img.chain(segs, indirect=rng.random() < 0.2)

    def blk_field(buf: bytearray, rng: random.Random) -> None:
        # the first request's header is at DATA, a discard segment right after it
        p = PARAMS + DATA
        f = rng.choice(("type", "sector", "ioprio", "dwz_sector", "dwz_count", "dwz_flags"))
        if f == "type":
            struct.pack_into("<I", buf, p, rng.choice((*_BLK_TYPES, 2, 3, 10, 14, 0xFFFFFFFF)))
        elif f == "sector":
            struct.pack_into("<Q", buf, p + 8, rng.choice((SECTORS - 1, SECTORS, SECTORS - 2,
                                                           2**64 - 1, 2**63, 2**55)))
        elif f == "ioprio":
            struct.pack_into("<I", buf, p + 4, rng.getrandbits(32))
        elif f == "dwz_sector":
            struct.pack_into("<Q", buf, p + 16, rng.choice((SECTORS, SECTORS - 1, 2**64 - 1)))
        elif f == "dwz_count":
            struct.pack_into("<I", buf, p + 24, rng.choice((0, SECTORS, SECTORS + 1, 2**32 - 1,
                                                            1 << 22, (1 << 22) + 1)))
        else:
            struct.pack_into("<I", buf, p + 28, rng.choice((1, 2, 3, 0x80000000)))

    return _ring_mutations(img.encode(), rng, mutations, blk_field)


def _blk_oracle(region: Region, chain: object) -> tuple[int, int] | None:
    """(sector, data addr) of a plain header/data/status read whose result can be checked."""
    r, w = chain.readable, chain.writable  # type: ignore[attr-defined]
    if chain.error is not None or len(r) != 1 or r[0][1] != 16 or len(w) != 2 or w[1][1] != 1:  # type: ignore[attr-defined]
        return None
    spans = sorted([r[0], w[0], w[1]])
    if any(a + n > b for (a, n), (b, _) in zip(spans, spans[1:])):
        return None  # overlapping buffers: last writer wins, nothing to compare
    rtype, _, sector = region.unpack(B.OUTHDR, r[0][0])
    return (sector, w[0][0]) if rtype == B.T_IN else None


def _blk_run(data: bytes) -> bool:
    region, vq, _ = _queue(data)
    model = BlkModel(SECTORS, size_max=4096, seg_max=8, max_discard_seg=4)
    image = FuzzImage()
    image.data[:] = bytes(range(256)) * (len(image.data) // 256)
    try:
        chains = vq.pop_all()
    except PEER_FAULTS:
        return False  # the runner marks the device NEEDS_RESET
    executed = False
    for chain in chains:
        _check_chain(region, chain)
        check = _blk_oracle(region, chain)
        try:
            res = model.handle(region, chain, image)
            if isinstance(res, BlkRequest):  # FLUSH/DISCARD/WRITE_ZEROES: the worker's part
                status_addr = res.status_addr
                res = model.execute(region, res, image)
            else:
                status_addr = chain.writable[-1][0] + chain.writable[-1][1] - 1
        except PEER_FAULTS:
            return executed  # e.g. no usable status byte: the runner marks NEEDS_RESET
        assert 1 <= res <= chain.writable_len, ("used length", res, chain)
        status = region.u8(status_addr)
        assert status in (B.S_OK, B.S_IOERR, B.S_UNSUPP), status
        if status == B.S_OK:
            executed = True
            if check is not None:
                sector, addr = check
                n = chain.writable[0][1]
                assert region.read(addr, n) == bytes(image.data[sector * 512:sector * 512 + n])
        vq.push(chain.head, res)
    vq.publish()
    return executed


# -- 3/4. virtio-can TX and control queues (backend/devices/can.py via can_service) --------------


class _FakeTransport:
    def __init__(self, vqs: list[DeviceQueue | None]) -> None:
        self.vqs = vqs
        self.serving = True
        self.needs_reset: list[str] = []
        self.configs = 0

    def notify_queue(self, index: int) -> None:
        pass

    def mark_needs_reset(self, reason: str) -> None:
        self.needs_reset.append(reason)

    def update_config(self, config: bytes) -> None:
        self.configs += 1


class _FakeRunner:
    """What CanLinkService uses of a LinkRunner: its batch, generation and transport."""

    batch = 64

    def __init__(self, vqs: list[DeviceQueue | None]) -> None:
        self.generation = 0
        self.transport = _FakeTransport(vqs)


_START = W.CONTROL_REQUEST.pack(W.VIRTIO_CAN_SET_CTRL_MODE_START)
CAN_STOPPED = 0x80  # params byte 3: the fuzzed link's controller is not started


def _can_pair(data: bytes, queue: int) -> tuple[Region, DeviceQueue, object, object, Region,
                                               DeviceQueue] | None:
    """Link a (the fuzzed queue ``queue``) and link b (8 valid RX buffers) on one switch."""
    region, vq, feat = _queue(data)
    backend = CanBackend(None)
    a, b = backend.add_link("a"), backend.add_link("b")
    if not a.model.set_features(feat & 0x7F & W.F_ALL | (W.F_IVV_BUSOFF_REPORT if feat & 0x10
                                                            else 0)):
        return None  # the transport refuses FEATURES_OK: nothing is served
    if not feat & CAN_STOPPED:
        a.model.handle_control(_START)
    rx = RingImage(random.Random(0), indirect_ok=False)
    for _ in range(QSIZE):
        rx.chain([(rx.alloc(W.RX_BUFFER_SIZE_FD), W.RX_BUFFER_SIZE_FD, True)])
    _flags, rx_last, rx_mem = rings.decode(rx.encode())
    rx_region = Region(rx_mem, name="rx")
    rx_vq = DeviceQueue(rx_region, QSIZE, DESC, AVAIL, USED)
    rx_vq.last_avail = rx_vq.next_used = rx_vq.signalled_used = rx_last
    assert b.model.set_features(W.F_ALL)
    b.model.handle_control(_START)
    vqs_a: list[DeviceQueue | None] = [None] * W.NUM_QUEUES
    vqs_a[queue] = vq
    a.bind(_FakeRunner(vqs_a))  # type: ignore[arg-type]
    b.bind(_FakeRunner([None, rx_vq, None]))  # type: ignore[arg-type]
    return region, vq, a, b, rx_region, rx_vq


def _frame(rng: random.Random) -> bytes:
    ext = rng.random() < 0.5
    can_id = rng.randrange(W.CAN_EFF_MASK + 1 if ext else W.CAN_SFF_MASK + 1)
    kind = rng.choice(("classic", "fd", "rtr"))
    if kind == "rtr":
        frame = W.CanFrame.remote_frame(can_id, rng.randint(0, 8), extended=ext)
    elif kind == "fd":
        frame = W.CanFrame.data_frame(can_id, rng.randbytes(rng.choice(sorted(W.CAN_FD_LENGTHS))),
                                      extended=ext, fd=True)
    else:
        frame = W.CanFrame.data_frame(can_id, rng.randbytes(rng.randint(0, 8)), extended=ext)
    return W.encode_frame(frame, W.VIRTIO_CAN_TX)


def _can_params(rng: random.Random, img: RingImage) -> bytes:
    enc = bytearray(img.encode())
    enc[3] = W.F_CAN_CLASSIC | W.F_CAN_FD | W.F_RTR_FRAMES | 0x10 \
        | (W.F_LATE_TX_ACK if rng.random() < 0.5 else 0)
    return bytes(enc)


def _param_flip(buf: bytearray, rng: random.Random) -> None:
    buf[3] ^= rng.choice((W.F_CAN_CLASSIC, W.F_CAN_FD, W.F_RTR_FRAMES, W.F_LATE_TX_ACK, 0x10,
                          CAN_STOPPED))


def _can_tx_case(rng: random.Random, mutations: int) -> bytes:
    img = RingImage(rng)
    for _ in range(rng.randint(1, 3)):
        frame = _frame(rng)
        addr = img.alloc(len(frame) + 8, 8)
        img.put(addr, frame)
        if rng.random() < 0.25 and len(frame) > 16:  # header and payload apart
            segs = [(addr, 16, False), (addr + 16, len(frame) - 16, False)]
        else:
            segs = [(addr, len(frame), False)]
        img.chain([*segs, (img.alloc(1), 1, True)], indirect=rng.random() < 0.2)

    def frame_field(buf: bytearray, rng: random.Random) -> None:
        p = PARAMS + DATA  # the first frame's header
        f = rng.choice(("type", "length", "flags", "id", "params", "dlc"))
        if f == "type":
            struct.pack_into("<H", buf, p, rng.choice((W.VIRTIO_CAN_RX, 0, 0xFFFF, 2)))
        elif f == "length":
            struct.pack_into("<H", buf, p + 2, rng.choice((8, 9, 12, 13, 64, 65, 0xFFFF)))
        elif f == "flags":
            old = struct.unpack_from("<I", buf, p + 8)[0]
            struct.pack_into("<I", buf, p + 8, old ^ rng.choice((
                W.VIRTIO_CAN_FLAGS_EXTENDED, W.VIRTIO_CAN_FLAGS_FD, W.VIRTIO_CAN_FLAGS_RTR, 1,
                0x10000)))
        elif f == "id":
            struct.pack_into("<I", buf, p + 12, rng.choice((0x7FF, 0x800, W.CAN_EFF_MASK,
                                                            W.CAN_EFF_MASK + 1, 0xFFFFFFFF)))
        elif f == "dlc":
            buf[p + 4] = rng.getrandbits(8)
        else:
            _param_flip(buf, rng)

    return _ring_mutations(_can_params(rng, img), rng, mutations, frame_field)


def _can_tx_run(data: bytes) -> bool:
    pair = _can_pair(data, W.TXQ)
    if pair is None:
        return False
    region, vq, a, b, rx_region, rx_vq = pair
    runner = a.runner
    try:
        a.serve(W.TXQ, vq, runner)
    except PEER_FAULTS:
        return False  # the runner marks this link NEEDS_RESET
    accepted = a.model.metrics.tx_count
    # every accepted frame reached link b (it takes every type, 8 buffers for at most 8 frames)
    assert b.model.metrics.rx_count == accepted, (accepted, b.model.metrics)
    used = struct.unpack_from("<H", rx_region.view(USED + 2, 2))[0]
    for k in range(accepted):
        slot = (rx_vq.next_used - accepted + k) & (QSIZE - 1)
        head, length = struct.unpack_from("<II", rx_region.view(USED + 4 + 8 * slot, 8))
        addr = struct.unpack_from("<Q", rx_region.view(DESC + 16 * head, 8))[0]
        W.decode_frame(rx_region.read(addr, length), W.VIRTIO_CAN_RX)  # a valid frame arrived
    assert used == rx_vq.next_used
    return accepted > 0


_CTRL = (W.VIRTIO_CAN_SET_CTRL_MODE_START, W.VIRTIO_CAN_SET_CTRL_MODE_STOP,
         W.VIRTIO_CAN_IVV_BUSOFF_REPORT)


def _can_ctrl_case(rng: random.Random, mutations: int) -> bytes:
    img = RingImage(rng)
    for _ in range(rng.randint(1, 3)):
        addr = img.alloc(2, 2)
        img.put(addr, W.CONTROL_REQUEST.pack(rng.choice(_CTRL)))
        img.chain([(addr, 2, False), (img.alloc(1), 1, True)], indirect=rng.random() < 0.2)

    def ctrl_field(buf: bytearray, rng: random.Random) -> None:
        if rng.random() < 0.5:
            struct.pack_into("<H", buf, PARAMS + DATA, rng.choice((*_CTRL, 0, 0x0203, 0xFFFF)))
        else:
            _param_flip(buf, rng)

    return _ring_mutations(_can_params(rng, img), rng, mutations, ctrl_field)


def _can_ctrl_run(data: bytes) -> bool:
    pair = _can_pair(data, W.CONTROLQ)
    if pair is None:
        return False
    region, vq, a, _b, _rx, _rxvq = pair
    before = a.model.metrics.control_count - a.model.metrics.control_fails
    try:
        served = a.serve(W.CONTROLQ, vq, a.runner)
    except PEER_FAULTS:
        return False
    assert (vq.next_used - vq.signalled_used) & 0xFFFF == served  # every request answered
    applied = a.model.metrics.control_count - a.model.metrics.control_fails - before
    return applied > 0


# -- 5. the device transport's header and write transactions (transport/device.py) --------------

T_MEM = 0x4000
T_RINGS = 0x1000  # queue q's rings at T_RINGS + 0x400 * q
_REC = struct.Struct("<IQ")
PEER_STATE = 0xFFFFFFF0  # a record that sets the peer's STATE instead of a transaction


class _FakeDev(IvshmemDevice):
    """An ivshmem device on bytearrays: the transport's only view of the link."""

    def __init__(self) -> None:
        self.id, self.max_peers, self.vectors, self.protocol = 1, 2, 2, 0xC002
        self.name = "fuzz"
        self.state_table = Region(bytearray(16), name="state")
        self.rw = Region(bytearray(T_MEM), name="rw")
        self.doorbells = 0

    def set_state(self, value: int) -> None:
        self.state_table.set_u32(4 * self.id, value)

    def doorbell(self, peer: int, vector: int) -> None:
        self.doorbells += 1

    def set_int_control(self, enabled: bool) -> None:
        pass

    def interrupt_fds(self) -> list[int]:
        return []

    def ack_interrupts(self) -> int:
        return 0


_BLK_FEATURES = BlkModel(SECTORS).features
_WIDTH = {off: size for off, (_n, size) in H.HEADER_FIELDS.items()}


def _bringup(rng: random.Random) -> list[tuple[int, int]]:
    """The transactions of a Linux driver's bring-up, two queues, as (offset, value)."""
    feats = _BLK_FEATURES | V.REQUIRED_FEATURES
    if rng.random() < 0.5:
        feats &= ~V.bit(V.F_EVENT_IDX)
    st = V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER
    recs = [(H.HDR_DEVICE_STATUS, V.STATUS_ACKNOWLEDGE), (H.HDR_DEVICE_STATUS, st),
            (H.HDR_DEVICE_FEATURES_SEL, 0), (H.HDR_DEVICE_FEATURES_SEL, 1),
            (H.HDR_DRIVER_FEATURES_SEL, 0), (H.HDR_DRIVER_FEATURES, feats & 0xFFFFFFFF),
            (H.HDR_DRIVER_FEATURES_SEL, 1), (H.HDR_DRIVER_FEATURES, feats >> 32),
            (H.HDR_DEVICE_STATUS, st | V.STATUS_FEATURES_OK)]
    for q in range(2):
        base = T_RINGS + 0x400 * q
        recs += [(H.HDR_QUEUE_SEL, q), (H.HDR_QUEUE_SIZE, rng.choice((QSIZE, QSIZE // 2))),
                 (H.HDR_QUEUE_DESC, base), (H.HDR_QUEUE_DRIVER, base + 0x80),
                 (H.HDR_QUEUE_DEVICE, base + 0x100), (H.HDR_QUEUE_ENABLE, 1)]
    recs.append((H.HDR_DEVICE_STATUS, st | V.STATUS_FEATURES_OK | V.STATUS_DRIVER_OK))
    return recs


_T_EDGES = (0, 1, 2, 3, 7, 8, 9, 16, 0x80, 0xB0, 0xFFF, T_RINGS, T_MEM - 1, T_MEM, 2**32 - 1,
            2**63, 2**64 - 1)


def _transport_case(rng: random.Random, mutations: int) -> bytes:
    recs = _bringup(rng)
    for _ in range(mutations):
        f = rng.random()
        i = rng.randrange(len(recs))
        off, val = recs[i]
        if f < 0.35:
            recs[i] = (off, rng.choice(_T_EDGES) if rng.random() < 0.7 else rng.getrandbits(64))
        elif f < 0.55:
            recs[i] = (rng.choice((*H.HEADER_FIELDS, H.HDR_CONFIG, H.HDR_CONFIG + 4, 0x20 + 1,
                                   0x1000, 2**32 - 1, rng.randrange(0x100))), val)
        elif f < 0.65:
            del recs[i]
        elif f < 0.75:
            recs.insert(i, recs[rng.randrange(len(recs))])
        elif f < 0.85:
            j = rng.randrange(len(recs))
            recs[i], recs[j] = recs[j], recs[i]
        elif f < 0.93:
            recs.insert(i, (PEER_STATE, rng.choice((0, 1, 2))))
        else:
            recs.insert(i, (H.HDR_DEVICE_STATUS, 0))  # a driver reset in the middle
    return b"".join(_REC.pack(o, v) for o, v in recs)


def _transport_run(data: bytes) -> bool:
    dev = _FakeDev()
    t = DeviceTransport(dev, device_features=_BLK_FEATURES, config=bytes(B.CONFIG_SIZE),
                        num_queues=2, queue_max_size=QSIZE)
    hdr = dev.rw
    t.start()
    t.step()  # peer RESET: header initialised, READY
    dev.state_table.set_u32(0, H.STATE_READY)
    t.step()
    assert t.phase.value == "active"
    for k in range(len(data) // _REC.size):
        off, val = _REC.unpack_from(data, k * _REC.size)
        if off & PEER_STATE == PEER_STATE:
            dev.state_table.set_u32(0, val & 3)
            t.step()
            continue
        width = _WIDTH.get(off, 4)
        if off == H.HDR_WRITE_TRANSACTION:
            width = 0  # the transaction word itself: only the transaction below writes it
        if width and hdr.contains(off, width):
            hdr.pack(struct.Struct("<" + {1: "B", 2: "H", 4: "I", 8: "Q"}[width]), off,
                     val & ((1 << 8 * width) - 1))
        hdr.set_u32(H.HDR_WRITE_TRANSACTION, off & 0xFFFFFFFF)
        t.step()  # must never raise on peer data
        if t.phase.value == "active":
            assert hdr.u32(H.HDR_WRITE_TRANSACTION) == 0, "transaction left pending"
        for q, vq in enumerate(t.vqs):
            if vq is not None:
                assert t.queues[q].enabled and 1 <= vq.size <= QSIZE
                assert min(vq.desc, vq.avail, vq.used) >= t.header_size
                assert hdr.contains(vq.used, 4 + 8 * vq.size + 2)
    return t.serving and any(vq is not None for vq in t.vqs)


# -- 6. the sim hub's handshake (ivshmem_virtio/ivshmem/hub.py) ----------------------------------

_HUB_PEERS = 3


class _HubHarness:
    """One hub (one memfd) and one event loop for a whole campaign; peers on socketpairs."""

    def __init__(self) -> None:
        geo = hub_mod.Geometry(max_peers=_HUB_PEERS, vectors=2, rw_size=0x1000,
                               protocols=(0xC002, 0x8002, 0x8002))
        self.hub = hub_mod.Hub("/nonexistent/fuzz-hub.sock", geo)  # never bound
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.hub.close()
        self.loop.close()

    def run(self, data: bytes) -> bool:
        hub = self.hub
        occupants = []
        occupied = data[0] if data else 0
        for pid in range(_HUB_PEERS):
            if occupied >> pid & 1:
                mine, theirs = socket.socketpair()
                peer = hub._admit(mine, pid, False)
                assert peer is not None and peer.id == pid
                occupants.append((peer, mine, theirs))
        client, conn = socket.socketpair()
        try:
            client.sendall(data[1:])
            client.shutdown(socket.SHUT_WR)
            conn.setblocking(False)
            self.loop.run_until_complete(hub._serve_peer(conn))  # closes conn
            assert all(p.sock is not conn for p in hub.peers.values()), "peer not dropped"
            reply = client.recv(16)
        finally:
            client.close()
        for peer, mine, theirs in occupants:
            hub._drop(peer, notify=True)
            mine.close()
            theirs.close()
        assert not hub.peers, hub.peers
        assert all(hub.state_table.u32(4 * i) == 0 for i in range(_HUB_PEERS))
        return len(reply) == 16 and hub_mod.I64.unpack_from(reply, 8)[0] >= 0


_HUB_EDGES = (-1, -2, 0, 1, 2, 3, 12, 2**31, 2**63 - 1, -(2**63))


def _hub_case(rng: random.Random, mutations: int) -> bytes:
    occupied = rng.choice((0, 1, 2, 4, 5))
    free = [i for i in range(_HUB_PEERS) if not occupied >> i & 1]
    req = rng.choice((-1, rng.choice(free)))
    msg = bytearray(hub_mod.I64.pack(req))
    for _ in range(mutations):
        f = rng.random()
        if f < 0.4:
            msg[:8] = hub_mod.I64.pack(rng.choice(_HUB_EDGES))
        elif f < 0.55:
            occupied ^= 1 << rng.randrange(_HUB_PEERS)
        elif f < 0.7:
            del msg[rng.randrange(len(msg) + 1):]
        elif f < 0.85:
            msg += rng.randbytes(rng.randint(1, 9))
        elif msg:
            msg[rng.randrange(len(msg))] ^= 1 << rng.randrange(8)
    return bytes([occupied]) + bytes(msg)


# -- 7. the NBD server's protocol (frontend/nbd_session.py) ---------------------------------------

NBD_SIZE = 64 * 1024


class _NbdTarget:
    """A BlockTarget on a bytearray; the server must only pass on requests inside it."""

    def __init__(self) -> None:
        self.size = NBD_SIZE
        self.read_only = False
        self.buf = bytearray(NBD_SIZE)
        self.calls = 0

    def _check(self, offset: int, length: int) -> None:
        assert 0 <= offset and 0 < length and offset + length <= self.size, (offset, length)
        self.calls += 1

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.buf[offset:offset + length])

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self.buf[offset:offset + len(data)] = data

    async def flush(self) -> None:
        self.calls += 1

    async def discard(self, offset: int, length: int) -> None:
        self._check(offset, length)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> None:
        self._check(offset, length)


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class _Writer:
    """What _Connection uses of an asyncio.StreamWriter, collecting the replies."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.transport = _Transport()
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return None

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed or self.transport.aborted

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


def _nbd_messages(rng: random.Random) -> list[list]:
    """A valid session as fields: [kind, *fields], serialised by :func:`_nbd_bytes`."""
    msgs: list[list] = [["flags", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES]]
    if rng.random() < 0.3:
        msgs.append(["opt", nbd.IHAVEOPT, nbd.OPT_LIST, b""])
    name = b"disk"[:rng.randint(0, 4)]
    if rng.random() < 0.8:
        info = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE)
        msgs.append(["opt", nbd.IHAVEOPT, nbd.OPT_GO, info])
    else:
        msgs.append(["opt", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, name])
    for h in range(rng.randint(1, 4)):
        cmd = rng.choice((nbd.CMD_READ, nbd.CMD_WRITE, nbd.CMD_WRITE, nbd.CMD_FLUSH,
                          nbd.CMD_TRIM, nbd.CMD_WRITE_ZEROES))
        length = rng.choice((512, 4096, 1, 1000)) if cmd != nbd.CMD_FLUSH else 0
        offset = rng.randrange(0, NBD_SIZE - length + 1, 512) if length else 0
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.2 and cmd != nbd.CMD_FLUSH else 0
        msgs.append(["req", nbd.REQUEST_MAGIC, flags, cmd, h, offset, length,
                     rng.randbytes(length) if cmd == nbd.CMD_WRITE else b""])
    msgs.append(["req", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 99, 0, 0, b""])
    return msgs


_NBD_EDGES = (0, 1, 511, 512, NBD_SIZE - 1, NBD_SIZE, NBD_SIZE + 1, nbd.MAX_PAYLOAD,
              nbd.MAX_PAYLOAD + 1, nbd.MAX_OPTION_LENGTH + 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1)


def _nbd_mutate(msgs: list[list], rng: random.Random) -> None:
    m = rng.choice(msgs)
    f = rng.random()
    if f < 0.1:
        msgs.remove(m) if len(msgs) > 1 else None
    elif f < 0.2:
        msgs.insert(rng.randrange(len(msgs)), list(rng.choice(msgs)))
    elif m[0] == "flags":
        m[1] = rng.choice((0, 1, 2, 3, 4, 0xFFFFFFFF))
    elif m[0] == "opt":
        k = rng.choice((1, 2, 3, 3))
        if k == 1:
            m[1] ^= 1 << rng.randrange(64)
        elif k == 2:
            m[2] = rng.choice((0, 2, 3, 4, 5, 6, 8, 9, 0xFFFFFFFF))
        else:
            data = bytearray(m[3])
            if data and rng.random() < 0.6:
                data[rng.randrange(len(data))] = rng.getrandbits(8)
            else:
                data += rng.randbytes(rng.randint(1, 6))
            m[3] = bytes(data)
    else:
        k = rng.randrange(6)
        if k == 0:
            m[1] ^= 1 << rng.randrange(32)
        elif k == 1:
            m[2] = rng.choice((1, 2, 3, 0x8000, 0xFFFF))
        elif k == 2:
            m[3] = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 0xFFFF))
        elif k == 3:
            m[5] = rng.choice(_NBD_EDGES)
        else:  # the length, with a payload that follows it or not
            m[6] = rng.choice(_NBD_EDGES)
            if m[3] == nbd.CMD_WRITE and m[6] <= 8192 and rng.random() < 0.7:
                m[7] = rng.randbytes(m[6])


def _nbd_bytes(msgs: list[list]) -> bytes:
    out = bytearray()
    for m in msgs:
        if m[0] == "flags":
            out += struct.pack(">I", m[1])
        elif m[0] == "opt":
            out += struct.pack(">QII", m[1], m[2], len(m[3])) + m[3]
        else:
            out += struct.pack(">IHHQQI", m[1], m[2], m[3], m[4] & (2**64 - 1), m[5],
                               m[6] & 0xFFFFFFFF) + m[7]
    return bytes(out)


def _nbd_case(rng: random.Random, mutations: int) -> bytes:
    msgs = _nbd_messages(rng)
    for _ in range(mutations):
        _nbd_mutate(msgs, rng)
    return _nbd_bytes(msgs)


class _NbdHarness:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def run(self, data: bytes) -> bool:
        async def session() -> _NbdTarget:
            target = _NbdTarget()
            server = nbd.NbdServer(target, handshake_timeout=5.0)
            reader = asyncio.StreamReader(limit=1 << 20)
            reader.feed_data(data)
            reader.feed_eof()
            writer = _Writer()
            await nbd_session._Connection(server, 1, reader, writer).run()  # type: ignore[arg-type]
            assert writer.closed
            return target

        return self.loop.run_until_complete(session()).calls > 0


# -- registry --------------------------------------------------------------------------------------


def make_targets() -> tuple[list[Target], Callable[[], None]]:
    """Every Python target, and a function releasing what they hold (hub memfd, loops)."""
    hub = _HubHarness()
    nbd_h = _NbdHarness()

    def close() -> None:
        hub.close()
        nbd_h.close()

    return [
        Target("ring", "chain walked", _ring_case, _ring_run),
        Target("blk", "request executed", _blk_case, _blk_run),
        Target("can_tx", "frame accepted", _can_tx_case, _can_tx_run),
        Target("can_ctrl", "request applied", _can_ctrl_case, _can_ctrl_run),
        Target("transport", "transaction applied", _transport_case, _transport_run),
        Target("hub", "peer admitted", _hub_case, hub.run),
        Target("nbd", "request executed", _nbd_case, nbd_h.run),
    ], close


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


