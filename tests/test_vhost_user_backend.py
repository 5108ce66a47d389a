"""``ivshmem-virtio blk --vhost-user``: a test-only front-end drives the real daemon process.

Reads and writes through a hand-built ring in memfd memory of two regions (with a hole), checked
byte for byte against the image; the session life cycle (GET_VRING_BASE, reconnect, flush on
disconnect); the wire format's parsers.
"""

from __future__ import annotations

import os
import stat
import struct
import time
from pathlib import Path

import pytest

from ivshmem_virtio.errors import VhostUserError
from ivshmem_virtio.spec import vhost_user as VU

from .vhost_user_backend_helpers import (
    DATA_GPA,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_INDIRECT,
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    OUTHDR,
    STATE,
    T_FLUSH,
    T_IN,
    T_OUT,
    MiniFrontend,
)


@pytest.fixture
def daemon(procs, tmp_path: Path, image_factory):  # noqa: ANN001, ANN201
    """A blk back-end on a vhost-user socket over a 1 MiB image with a known pattern."""
    pattern = bytes((i * 7) & 0xFF for i in range(1 << 20))
    image = image_factory(1 << 20, data=pattern)
    sock = str(tmp_path / "vu.sock")
    child = procs.start("vu-blk", "blk", "--vhost-user", sock, "--image", image,
                        wait="vhost-user back-end listening")
    return sock, image, pattern, child


def test_socket_is_private(daemon) -> None:  # noqa: ANN001
    sock = daemon[0]
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_reads_and_writes_match_the_image(daemon) -> None:  # noqa: ANN001
    sock, image, pattern, _ = daemon
    f = MiniFrontend(sock)
    try:
        want = f.negotiate()
        assert want & F_VERSION_1 and want & F_INDIRECT and not want & (1 << 33)
        cfg = f.config()
        assert struct.unpack_from("<Q", cfg)[0] == (1 << 20) // 512  # capacity in sectors
        f.set_mem_table()
        f.setup_ring()
        # reads of the pattern at several sectors and sizes
        for sector, n in ((0, 512), (7, 4096), (100, 8192), (2047, 512)):
            status, data, used = f.blk(T_IN, sector, n)
            assert status == 0 and used == n + 1
            assert data == pattern[sector * 512:sector * 512 + n]
        # writes, then the image holds them byte for byte
        writes = {3: os.urandom(4096), 1500: os.urandom(512), 64: os.urandom(16384)}
        for sector, data in writes.items():
            assert f.blk(T_OUT, sector, data)[0] == 0
        assert f.blk(T_FLUSH, 0)[0] == 0
        expect = bytearray(pattern)
        for sector, data in writes.items():
            expect[sector * 512:sector * 512 + len(data)] = data
        assert Path(image).read_bytes() == bytes(expect)
        # a read back through the ring sees the writes too
        assert f.blk(T_IN, 64, 16384, data_gpa=DATA_GPA + 0x8000)[1] == writes[64]
        # past the end: an error status, the device goes on
        assert f.blk(T_IN, 2048, 512)[0] == 1
        assert f.blk(T_IN, 0, 512)[0] == 0
        assert f.get_vring_base() == f.avail_idx
    finally:
        f.close()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_lone_requests_then_idle_costs_no_cpu(daemon) -> None:  # noqa: ANN001
    """After a lone request the back-end polls its rings for a moment (the next QD1 request
    then needs no wake-up): it must stop again, an idle session costs no CPU, and requests
    sent one by one, kicked or not in time, are all served."""
    sock, _image, pattern, child = daemon
    f = MiniFrontend(sock)
    try:
        f.start_blk()
        for k in range(50):
            assert f.blk(T_IN, k, 512)[1] == pattern[k * 512:(k + 1) * 512]
            if k % 10 == 0:
                time.sleep(0.01)  # past the poll: the next one needs its kick
        time.sleep(0.2)
        cpu0 = _cpu_s(child.pid)
        time.sleep(1.0)
        used = _cpu_s(child.pid) - cpu0
        assert used < 0.2, f"the idle back-end used {used:.2f} s of CPU in 1 s"
        assert f.blk(T_IN, 3, 512)[1] == pattern[1536:2048]  # and it still answers
    finally:
        f.close()


def test_reconnect_gets_a_fresh_session_and_the_ring_state(daemon) -> None:  # noqa: ANN001
    sock, image, pattern, child = daemon
    f = MiniFrontend(sock)
    f.start_blk()
    data = os.urandom(4096)
    assert f.blk(T_OUT, 10, data)[0] == 0
    base = f.get_vring_base()
    assert base == 1
    # the front-end goes away without a word (QEMU killed): the write is in the image
    mem, memfd = bytes(f.mem), os.dup(f.memfd)
    f.close()
    child.wait_for("vhost-user front-end left")
    assert Path(image).read_bytes()[10 * 512:10 * 512 + 4096] == data
    # reconnect (QEMU reconnect=): the same guest memory, the ring resumes at the saved base
    g = MiniFrontend(sock)
    try:
        os.close(g.memfd)
        g.memfd = memfd
        g.mem.close()
        import mmap
        g.mem = mmap.mmap(memfd, len(mem))
        g.avail_idx = g.used_seen = base
        g.negotiate()
        g.set_mem_table()
        g.setup_ring(base=base)
        status, out, _ = g.blk(T_IN, 10, 4096)
        assert status == 0 and out == data
        assert g.get_vring_base() == base + 1
    finally:
        g.close()
    child.wait_for("vhost-user front-end connected", count=2)


def test_restart_on_a_new_table_never_serves_the_stopped_ring(daemon) -> None:  # noqa: ANN001
    """QEMU's sequence when the guest's driver takes over from the firmware: GET_VRING_BASE,
    a new SET_MEM_TABLE (the old mappings go), the ring set up again, its KICK before its
    ENABLE. The stopped ring's queue must be gone from the served list: serving it touched
    the unmapped old table ("access ... in no region"), stopped every ring, and the guest's
    first request never completed (seen with Linux's virtio_blk under QEMU 7.2)."""
    sock, _image, pattern, child = daemon
    f = MiniFrontend(sock)
    try:
        f.start_blk()
        assert f.blk(T_IN, 1, 512)[1] == pattern[512:1024]
        f.ack(VU.Request.SET_VRING_ENABLE, STATE.pack(0, 0))  # QEMU disables, then stops
        base = f.get_vring_base()
        f.set_mem_table()  # a new table: new mappings, the old ones unmapped
        f.setup_ring(base=base, enable=False)
        # a request made available (and kicked) while the ring is set up but not enabled:
        # nothing may serve it yet (the stopped ring's old queue did, on the old table)
        hdr, status_at, data_at = DATA_GPA + 0x30000, DATA_GPA + 0x30100, DATA_GPA + 0x1000
        f.poke(hdr, OUTHDR.pack(T_IN, 0, 2))
        f.poke(status_at, b"\xee")
        f.put_desc(0, hdr, 16, DESC_F_NEXT, 1)
        f.put_desc(1, data_at, 512, DESC_F_NEXT | DESC_F_WRITE, 2)
        f.put_desc(2, status_at, 1, DESC_F_WRITE)
        used = f.used_idx()
        f.make_available(0)
        time.sleep(0.3)
        assert f.used_idx() == used, "served while the ring was not enabled"
        f.ack(VU.Request.SET_VRING_ENABLE, STATE.pack(0, 1))
        os.eventfd_write(f.kick, 1)
        ((head, length),) = f.wait_used()
        assert (head, length) == (0, 513)
        assert f.peek(status_at, 1) == b"\x00" and f.peek(data_at, 512) == pattern[1024:1536]
        assert "rings stopped" not in child.log()
    finally:
        f.close()


def test_read_only_refuses_writes(procs, tmp_path: Path, image_factory) -> None:  # noqa: ANN001
    image = image_factory(1 << 20)
    sock = str(tmp_path / "ro.sock")
    procs.start("vu-ro", "blk", "--vhost-user", sock, "--image", image, "--read-only",
                wait="vhost-user back-end listening")
    f = MiniFrontend(sock)
    try:
        assert f.negotiate() & (1 << 5)  # VIRTIO_BLK_F_RO
        f.set_mem_table()
        f.setup_ring()
        assert f.blk(T_OUT, 0, b"\x55" * 512)[0] == 1
        assert Path(image).read_bytes() == bytes(1 << 20)
    finally:
        f.close()


def test_link_and_vhost_user_are_alternatives(procs, tmp_path: Path, image_factory) -> None:  # noqa: ANN001
    from ivshmem_virtio.procs import Child, cli
    image = image_factory(1 << 20)
    child = Child("both", cli("blk", "--link", "sim:/x", "--vhost-user", str(tmp_path / "b.sock"),
                              "--image", image), tmp_path)
    assert child.proc.wait(30) == 2
    assert "not allowed with argument" in child.log()


# -- the wire format's parsers (spec/vhost_user.py) ----------------------------------------------
def test_header_checks() -> None:
    assert VU.parse_header(struct.pack("=III", 1, 1, 0)).request == 1
    for bad in (struct.pack("=III", 1, 2, 0), struct.pack("=III", 1, 0x11, 0),
                struct.pack("=III", 1, 1, VU.MAX_PAYLOAD + 1), b"\x01\x00"):
        with pytest.raises(VhostUserError):
            VU.parse_header(bad)
    with pytest.raises(VhostUserError):
        VU.check_request_size(VU.Request.SET_VRING_NUM, 12)


def test_mem_table_checks() -> None:
    r = VU.MemRegion
    ok = VU.encode_mem_table([r(0, 0x1000, 0x10000, 0), r(0x2000, 0x1000, 0x20000, 0x1000)])
    assert len(VU.parse_mem_table(ok, 2)) == 2
    with pytest.raises(VhostUserError, match="fds"):
        VU.parse_mem_table(ok, 1)
    with pytest.raises(VhostUserError, match="bytes"):
        VU.parse_mem_table(ok[:-8], 2)
    with pytest.raises(VhostUserError, match="overlap"):
        VU.parse_mem_table(VU.encode_mem_table([r(0, 0x2000, 0, 0), r(0x1000, 0x1000, 0x9000, 0)]),
                           2)
    with pytest.raises(VhostUserError, match="overlap"):  # the same user addresses twice
        VU.parse_mem_table(VU.encode_mem_table([r(0, 0x1000, 0, 0), r(0x8000, 0x1000, 0x800, 0)]),
                           2)
    with pytest.raises(VhostUserError, match="wraps"):
        VU.parse_mem_table(VU.encode_mem_table([r(2**64 - 0x1000, 0x2000, 0, 0)]), 1)
    with pytest.raises(VhostUserError, match="regions"):
        VU.parse_mem_table(struct.pack("=II", 9, 0) + bytes(9 * 32), 9)
    with pytest.raises(VhostUserError, match="size 0"):
        VU.parse_mem_table(VU.encode_mem_table([r(0, 0, 0, 0)]), 1)


def test_vring_fd_and_config_checks() -> None:
    assert VU.VringFd.parse(struct.pack("=Q", 0x101), 0) == VU.VringFd(1, True)
    with pytest.raises(VhostUserError):
        VU.VringFd.parse(struct.pack("=Q", 0x101), 1)  # an fd despite the no-fd flag
    with pytest.raises(VhostUserError):
        VU.VringFd.parse(struct.pack("=Q", 0x1), 0)  # no fd without the flag
    with pytest.raises(VhostUserError):
        VU.VringFd.parse(struct.pack("=Q", 0x200), 0)
    with pytest.raises(VhostUserError):
        VU.ConfigMsg.parse(struct.pack("=III", 250, 10, 0) + bytes(10))
    with pytest.raises(VhostUserError):
        VU.ConfigMsg.parse(struct.pack("=III", 0, 10, 0) + bytes(9))
    assert F_PROTOCOL_FEATURES == 1 << VU.F_PROTOCOL_FEATURES
