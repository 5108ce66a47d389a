"""The sim hub speaks sim-link.md exactly: a raw-socket peer checks every message."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time

from ivshmem_virtio.ivshmem.sim import SimIvshmem

I64 = struct.Struct("<q")


def recv(sock: socket.socket) -> tuple[int, int | None]:
    buf, fd = b"", None
    while len(buf) < 8:
        data, fds, _f, _a = socket.recv_fds(sock, 8 - len(buf), 1)
        assert data, "hub closed"
        buf += data
        fd = fds[0] if fds else fd
    return I64.unpack(buf)[0], fd


def connect(path: str, requested: int | None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    if requested is not None:
        s.sendall(I64.pack(requested))
    return s


def test_handshake_join_and_leave(procs, tmp_path):
    sock = str(tmp_path / "hub.sock")
    procs.hub(sock, "--vectors", "3", "--rw-size", "0x4000", "--output-size", "0x1000",
              protocols="0xC024,0x8024")
    a = connect(sock, 0)
    assert recv(a) == (2, None)  # protocol version
    assert recv(a)[0] == 0  # assigned ID
    marker, shm = recv(a)
    assert marker == -1 and shm is not None
    layout = 0x1000 + 0x4000 + 2 * 0x1000
    size = os.fstat(shm).st_size
    assert size >= layout and size & (size - 1) == 0  # a power of two for QEMU's BAR
    assert [recv(a)[0] for _ in range(6)] == [2, 3, 0x1000, 0x4000, 0x1000, 0xC024]
    own = [recv(a) for _ in range(3)]
    assert [i for i, _ in own] == [0, 0, 0] and all(fd is not None for _, fd in own)

    b = connect(sock, -1)  # lowest free
    assert recv(b) == (2, None) and recv(b)[0] == 1
    recv(b)
    assert [recv(b)[0] for _ in range(6)][-1] == 0x8024
    order = [recv(b)[0] for _ in range(6)]
    assert order == [0, 0, 0, 1, 1, 1]  # peers already there first, itself last
    joined = [recv(a) for _ in range(3)]
    assert [i for i, _ in joined] == [1, 1, 1] and all(fd is not None for _, fd in joined)

    # taken and out of range
    c = connect(sock, 1)
    assert recv(c) == (2, None) and recv(c)[0] == -errno.EBUSY
    d = connect(sock, 5)
    assert recv(d) == (2, None) and recv(d)[0] == -errno.EINVAL

    # b leaves: its state entry goes to 0, vector 0 of a rings, a gets "<1>" with no fd
    import mmap

    mm = mmap.mmap(shm, layout)
    struct.pack_into("<I", mm, 4, 1)  # as if b had set STATE=1
    vec0_a = own[0][1]
    b.close()
    assert recv(a) == (1, None)
    assert struct.unpack_from("<I", mm, 4)[0] == 0
    assert int.from_bytes(os.read(vec0_a, 8), "little") >= 1
    for s in (a, c, d):
        s.close()
    mm.close()


def test_qemu_peer_gets_version_0(procs, tmp_path):
    sock = str(tmp_path / "q.sock")
    procs.hub(sock)
    q = connect(sock, None)  # QEMU sends nothing
    t0 = time.monotonic()
    assert recv(q) == (0, None)
    assert time.monotonic() - t0 >= 0.09
    assert recv(q)[0] == 0
    marker, fd = recv(q)
    assert marker == -1 and fd is not None
    # then straight to the eventfds: no geometry messages
    assert [recv(q)[0] for _ in range(2)] == [0, 0]
    q.close()


def test_sim_peers_doorbell_and_state(procs, tmp_path):
    sock = str(tmp_path / "p.sock")
    procs.hub(sock)
    a = SimIvshmem(sock, 0)
    b = SimIvshmem(sock, 1)
    a.set_int_control(True)
    b.set_int_control(True)
    b.doorbell(0, 1)
    time.sleep(0.05)
    assert a.ack_interrupts() == 1
    a.set_state(1)  # a change rings vector 0 of b
    assert b.peer_state(0) == 1 and b.ack_interrupts() == 1
    a.set_state(1)  # no change, no interrupt
    assert b.ack_interrupts() == 0
    b.doorbell(0, 7)  # vector out of range: dropped
    b.set_int_control(False)
    a.doorbell(1, 0)
    b.set_int_control(True)  # what arrived while disabled is lost
    assert b.ack_interrupts() == 0
    b.close()
    time.sleep(0.1)
    a.process_hub_messages()
    assert a.peer_state(1) == 0
    a.close()


def test_doorbell_after_a_peer_restart_reaches_the_new_incarnation(procs, tmp_path):
    """Seeing a peer's STATE change makes a peer apply the queued hub messages before it rings.

    No event loop runs here, so nothing else reads the hub socket: without that, ``a`` would
    ring the eventfd of the peer's previous incarnation and the interrupt would be lost.
    """
    sock = str(tmp_path / "r.sock")
    procs.hub(sock)
    a = SimIvshmem(sock, 0)
    b = SimIvshmem(sock, 1)
    b.set_state(1)
    a.process_hub_messages()  # as a running event loop would: a knows b's eventfds
    assert 1 in a._peers and a.peer_state(1) == 1
    b.close()  # b's cell is destroyed: the hub zeroes its state ...
    for _ in range(100):
        if a.peer_state(1) == 0:
            break
        time.sleep(0.01)
    assert a.peer_state(1) == 0
    b2 = SimIvshmem(sock, 1)  # ... and re-creates it
    b2.set_int_control(True)
    b2.set_state(1)
    assert a.peer_state(1) == 1
    a.doorbell(1, 1)
    time.sleep(0.05)
    assert b2.ack_interrupts() >= 1
    a.close()
    b2.close()
