"""A hostile vhost-user front-end against ``ivshmem-virtio blk --vhost-user`` (issue 16).

Descriptors outside every region, region tables that overlap, wrap or outgrow their fd, a table
replaced under a running queue, ring addresses outside, a kick storm, malformed headers, sizes
and fd counts. After each the daemon is alive, touched nothing outside the regions (a canary
beyond them in the memfd stays intact), leaks no fds, and serves a well-behaved front-end.
"""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from pathlib import Path

import pytest

from ivshmem_virtio.spec import vhost_user as VU

from .vhost_user_backend_helpers import (
    ADDR,
    AREAS,
    DATA_GPA,
    DESC_F_NEXT,
    DESC_F_WRITE,
    HDR,
    MEM_SIZE,
    STATE,
    T_IN,
    T_OUT,
    USER_BASE,
    Area,
    MiniFrontend,
    Q,
)

CANARY = b"\xa5" * 0x1000


@pytest.fixture
def daemon(procs, tmp_path: Path, image_factory):  # noqa: ANN001, ANN201
    image = image_factory(1 << 20, data=bytes(range(256)) * 4096)
    sock = str(tmp_path / "hostile.sock")
    child = procs.start("vu-hostile", "blk", "--vhost-user", sock, "--image", image,
                        wait="vhost-user back-end listening")
    return sock, image, child


def _fds(child) -> int:  # noqa: ANN001
    return len(os.listdir(f"/proc/{child.pid}/fd"))


def _no_fd_leak(child, before: int, timeout: float = 10.0) -> bool:  # noqa: ANN001
    """The daemon's fd count is back to ``before`` (a session closes after its peer's EOF)."""
    deadline = time.monotonic() + timeout
    while _fds(child) > before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _frontend(sock: str) -> MiniFrontend:
    """A front-end whose memfd is larger than its regions: a canary page lies beyond them."""
    f = MiniFrontend(sock)
    os.ftruncate(f.memfd, MEM_SIZE + len(CANARY))
    os.pwrite(f.memfd, CANARY, MEM_SIZE)
    return f


def _canary_intact(f: MiniFrontend) -> bool:
    return os.pread(f.memfd, len(CANARY), MEM_SIZE) == CANARY


def _healthy(sock: str, image: str) -> None:
    """A well-behaved session on a new connection: a write lands in the image, reads match."""
    f = MiniFrontend(sock)
    try:
        f.start_blk()
        data = os.urandom(1024)
        assert f.blk(T_OUT, 20, data)[0] == 0
        assert f.blk(T_IN, 20, 1024)[1] == data
        assert Path(image).read_bytes()[20 * 512:20 * 512 + 1024] == data
    finally:
        f.close()


def _err_signalled(f: MiniFrontend, timeout: float = 5.0) -> bool:
    r, _, _ = select.select([f.err], [], [], timeout)
    return bool(r)


def test_descriptor_beyond_every_region_gets_an_error_status(daemon) -> None:  # noqa: ANN001
    sock, image, child = daemon
    f = _frontend(sock)
    try:
        f.start_blk()
        end = AREAS[-1].gpa + AREAS[-1].size  # just past the last region: the canary's offset
        assert f.blk(T_IN, 0, 512, data_gpa=end)[0] == 1
        assert f.blk(T_IN, 0, 512, data_gpa=end - 256)[0] == 1  # straddles the end
        assert f.blk(T_IN, 0, 512, data_gpa=(1 << 64) - 256)[0] == 1  # wraps
        assert f.blk(T_IN, 0, 512)[0] == 0  # the device goes on
        assert _canary_intact(f)
    finally:
        f.close()
    _healthy(sock, image)


def test_descriptor_in_a_hole_between_regions_stops_the_rings(daemon) -> None:  # noqa: ANN001
    sock, image, child = daemon
    f = _frontend(sock)
    try:
        f.start_blk()
        hole = AREAS[0].gpa + AREAS[0].size + 0x1000  # between region A and region B
        status_gpa = DATA_GPA + 0x30100
        f.poke(DATA_GPA + 0x30000, struct.pack("<IIQ", T_IN, 0, 0))
        f.poke(status_gpa, b"\xee")
        f.put_desc(0, DATA_GPA + 0x30000, 16, DESC_F_NEXT, 1)
        f.put_desc(1, hole, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
        f.put_desc(2, status_gpa, 1, DESC_F_WRITE)
        f.make_available(0)
        assert _err_signalled(f)  # the error eventfd: the ring is stopped, nothing written
        assert f.used_idx() == 0 and f.peek(status_gpa, 1) == b"\xee"
        assert _canary_intact(f)
        # the session survives; the front-end may set the ring up again
        assert f.get_vring_base() == 1
        f.used_seen = 0
        f.avail_idx = 1
        f.setup_ring(base=1)
        assert f.blk(T_IN, 0, 512)[0] == 0
    finally:
        f.close()
    _healthy(sock, image)


@pytest.mark.parametrize("areas, why", [
    ((Area(0x0, 0x40000, 0), Area(0x20000, 0x40000, 0x40000)), "guest addresses overlap"),
    ((Area(0x0, 0x40000, 0), Area(0x100000, 0x40000, 0x20000)), "user addresses overlap"),
    ((Area((1 << 64) - 0x1000, 0x40000, 0),), "guest range wraps"),
    ((Area(0x0, 0x40000, 0), Area(0x100000, 0x80000, 0x40000)), "beyond the fd's size"),
    ((Area(0x0, 0x40000, 0), Area(0x100000, 0, 0x40000)), "empty region"),
])
def test_bad_region_tables_drop_the_connection(daemon, areas, why) -> None:  # noqa: ANN001
    sock, image, child = daemon
    f = MiniFrontend(sock)
    try:
        f.negotiate()
        if why == "user addresses overlap":  # region B claims region A's user addresses
            payload = struct.pack("=II", 2, 0) + b"".join(
                struct.pack("=QQQQ", a.gpa, a.size, USER_BASE + (0x1000 if i else 0),
                            a.file_off) for i, a in enumerate(areas))
        else:
            payload = f.table(areas)
        f.send(VU.Request.SET_MEM_TABLE, payload, tuple([f.memfd] * len(areas)),
               need_reply=True)
        assert f.is_closed(), why
    finally:
        f.close()
    assert child.proc.poll() is None
    _healthy(sock, image)


def test_ring_address_outside_every_region(daemon) -> None:  # noqa: ANN001
    sock, image, child = daemon
    f = MiniFrontend(sock)
    try:
        f.negotiate()
        f.set_mem_table()
        outside = USER_BASE + MEM_SIZE + 0x10000
        straddle = AREAS[0].user + AREAS[0].size - 0x40  # the used ring leaves region A
        f.setup_ring(addrs=(outside, f.user(0x2000), straddle), enable=False)
    except (AssertionError, EOFError, ConnectionError):
        pass  # refused at SET_VRING_KICK: the connection is dropped
    else:
        pytest.fail("a ring outside every region was started")
    finally:
        assert f.is_closed()
        f.close()
    _healthy(sock, image)


def test_table_replaced_while_the_queue_runs(daemon) -> None:  # noqa: ANN001
    sock, image, child = daemon
    f = _frontend(sock)
    try:
        f.start_blk()
        assert f.blk(T_IN, 1, 512)[0] == 0
        # the same memory again (QEMU does this on every layout change): the queue goes on
        f.set_mem_table()
        assert f.blk(T_IN, 2, 512)[1] == (bytes(range(256)) * 4)[:512]
        # a table without the ring's region: the rings stop, nothing touches the old mapping
        f.set_mem_table((Area(0x100000, 0x40000, 0x40000),))
        assert _err_signalled(f)
        f.make_available(0)  # a kick on the stopped ring is ignored
        assert f.get_vring_base() >= 2
        assert f.call_msg(VU.Request.GET_FEATURES)  # the session answers
        assert f.used_idx() == 2 and _canary_intact(f)
    finally:
        f.close()
    _healthy(sock, image)


def test_kick_storm_costs_bounded_work_and_the_daemon_stays_responsive(daemon) -> None:  # noqa: ANN001
    sock, image, child = daemon
    f = MiniFrontend(sock)
    stop = threading.Event()

    def storm() -> None:
        while not stop.is_set():
            try:
                os.eventfd_write(f.kick, 1)
            except BlockingIOError:
                pass

    t = threading.Thread(target=storm)
    try:
        f.start_blk()
        t.start()
        for i in range(12):  # the control path and the data path both answer meanwhile
            assert f.call_msg(VU.Request.GET_QUEUE_NUM) == Q.pack(1)
            data = os.urandom(512)
            assert f.blk(T_OUT, 100 + i, data)[0] == 0
            assert f.blk(T_IN, 100 + i, 512)[1] == data
    finally:
        stop.set()
        if t.is_alive():
            t.join(10)
        f.close()
    _healthy(sock, image)


MALFORMED = {
    "version 2": HDR.pack(VU.Request.GET_FEATURES, 2, 0),
    "unknown flag": HDR.pack(VU.Request.GET_FEATURES, 1 | 0x100, 0),
    "a reply from the front-end": HDR.pack(VU.Request.GET_FEATURES, 1 | VU.FLAG_REPLY, 0),
    "huge size": HDR.pack(VU.Request.SET_FEATURES, 1, 1 << 30),
    "size for the request": HDR.pack(VU.Request.SET_VRING_NUM, 1, 12) + bytes(12),
    "unknown request": HDR.pack(999, 1, 0),
    "unsupported request": HDR.pack(VU.Request.SET_LOG_FD, 1, 0),
    "ring index": HDR.pack(VU.Request.SET_VRING_NUM, 1, 8) + STATE.pack(7, 16),
    "ring size": HDR.pack(VU.Request.SET_VRING_NUM, 1, 8) + STATE.pack(0, 24),
    "features not offered": HDR.pack(VU.Request.SET_FEATURES, 1, 8) + Q.pack(1 << 63),
    "log flag": HDR.pack(VU.Request.SET_VRING_ADDR, 1, 40) + ADDR.pack(0, 1, 0, 0, 0, 0),
    "kick before memory": None,
    "truncated then gone": HDR.pack(VU.Request.SET_FEATURES, 1, 8) + b"\x01\x02",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_messages_drop_the_connection(daemon, case: str) -> None:  # noqa: ANN001
    sock, image, child = daemon
    _healthy(sock, image)  # the daemon's fds settle (its first session opens what it keeps)
    time.sleep(0.3)
    before = _fds(child)
    f = MiniFrontend(sock)
    try:
        raw = MALFORMED[case]
        if raw is None:
            f.send(VU.Request.SET_VRING_KICK, Q.pack(0), (f.kick,))
        else:
            f.send_raw(raw)
        if case == "truncated then gone":
            f.sock.shutdown(2)
        else:
            assert f.is_closed(), case
    finally:
        f.close()
    _healthy(sock, image)
    assert _no_fd_leak(child, before), "the daemon leaked fds"


@pytest.mark.parametrize("case", ["fds on GET_FEATURES", "two kick fds", "fd count of the table",
                                  "nine fds", "fd despite the no-fd flag"])
def test_wrong_fd_counts_drop_the_connection_and_leak_nothing(daemon, case: str) -> None:  # noqa: ANN001
    sock, image, child = daemon
    _healthy(sock, image)
    time.sleep(0.3)
    before = _fds(child)
    f = MiniFrontend(sock)
    try:
        if case == "fds on GET_FEATURES":
            f.send(VU.Request.GET_FEATURES, b"", (f.kick,))
        elif case == "two kick fds":
            f.send(VU.Request.SET_VRING_KICK, Q.pack(0), (f.kick, f.call))
        elif case == "fd count of the table":
            f.send(VU.Request.SET_MEM_TABLE, f.table(), (f.memfd,))
        elif case == "nine fds":
            f.send(VU.Request.SET_MEM_TABLE, f.table(), tuple([f.memfd] * 9))
        else:
            f.send(VU.Request.SET_VRING_CALL, Q.pack(0x100), (f.call,))
        assert f.is_closed(), case
    finally:
        f.close()
    _healthy(sock, image)
    assert _no_fd_leak(child, before), "the daemon leaked fds"
