"""The sim hub speaks sim-link.md exactly: a raw-socket peer checks every message."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from ivshmem_virtio.errors import ConfigError
from ivshmem_virtio.ivshmem.hub import Access, Geometry, Hub, HubThread, LogLimiter
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.procs import cli

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
    procs.hub(sock, "--qemu-peers", "0")
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


def test_sim_native_doorbell_is_the_peers_eventfd(procs, tmp_path):
    """What compiled code rings (``native_doorbell``, a busy device's worker thread) is what
    ``doorbell`` rings: the peer's eventfd for that vector; a vector the link does not have
    rings nothing (-1), as ``doorbell`` drops it."""
    sock = str(tmp_path / "n.sock")
    procs.hub(sock)
    a = SimIvshmem(sock, 0)
    b = SimIvshmem(sock, 1)
    try:
        a.set_int_control(True)
        fd, reg, off, value = b.native_doorbell(0, 1)
        assert fd >= 0 and (reg, off, value) == (None, 0, 0)
        os.eventfd_write(fd, 1)
        time.sleep(0.05)
        assert a.ack_interrupts() == 1
        assert b.native_doorbell(0, 7) == (-1, None, 0, 0)
    finally:
        b.close()
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


# -- access control (issue 13 item 4) ---------------------------------------------------------

NOBODY = 65534


def as_nobody(sock: str, requested: int = 1) -> list[str]:
    """Join the hub as uid 65534 (a local user without access) and say what happened.

    A forked child (the interpreter under /root is not executable for nobody) drops to
    65534, tries the handshake and writes its outcome into a pipe; it always ends by _exit.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        result = "error"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(sock)
            except OSError as e:
                result = f"connect {e.errno}"
            else:
                s.sendall(I64.pack(requested))
                buf = b""
                while len(buf) < 16:
                    d = s.recv(16 - len(buf))
                    if not d:
                        break
                    buf += d
                result = ("reply {} {}".format(*struct.unpack("<2q", buf)) if len(buf) == 16
                          else "reply eof")
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode().split()
    finally:
        os.waitpid(pid, 0)


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory other users can enter (pytest's tmp_path is private to root)."""
    d = tempfile.mkdtemp(prefix="hub-access-")
    os.chmod(d, 0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def test_socket_is_0600_and_never_more_open(tmp_path, monkeypatch):
    """Mode and group are set while the socket sits in a private 0700 directory."""
    seen = []
    real_link = os.link

    def spy(src, dst):
        seen.append((stat.S_IMODE(os.stat(os.path.dirname(src)).st_mode),
                     stat.S_IMODE(os.stat(src).st_mode), os.stat(src).st_gid))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", spy)
    old = os.umask(0)  # the most open umask: the mode must not come from it
    try:
        for access, mode, gid in ((Access(), 0o600, 0), (Access(group=1), 0o660, 1)):
            path = str(tmp_path / "h.sock")
            hub = Hub(path, Geometry(), access)
            hub.listen()
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == mode
            assert st.st_gid == gid
            assert seen.pop() == (0o700, mode, gid)
            hub.close()
            assert os.listdir(tmp_path) == []  # private directory and socket gone
    finally:
        os.umask(old)


def test_socket_in_use_and_stale(tmp_path):
    path = str(tmp_path / "h.sock")
    with HubThread(path, Geometry()):
        with pytest.raises(ConfigError, match="in use by a running hub"):
            Hub(path, Geometry()).listen()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a hub that died: its file is left, nobody listens
    hub = Hub(path, Geometry())
    hub.listen()
    hub.close()
    assert not os.path.exists(path)


def test_access_policy():
    a = Access(owner_uid=1000)
    assert a.admits(0, 0) and a.admits(1000, 1000)  # root always, the owner
    assert not a.admits(1001, 1000)
    assert Access(owner_uid=1000, allow_uids=frozenset({1001})).admits(1001, 5)
    g = Access(owner_uid=1000, group=4242)
    assert g.admits(1001, 4242) and not g.admits(1001, 4243)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_local_user_without_access_is_refused(procs, open_dir):
    sock = os.path.join(open_dir, "a.sock")
    hub = procs.hub(sock)
    # 0600: the kernel refuses the connect itself
    assert as_nobody(sock) == ["connect", str(errno.EACCES)]
    # even with the mode opened by mistake, SO_PEERCRED refuses: a clean -EACCES, one log line
    os.chmod(sock, 0o666)
    assert as_nobody(sock) == ["reply", "2", str(-errno.EACCES)]
    hub.wait_for("peer refused", timeout=10)
    line = [x for x in hub.log().splitlines() if "peer refused" in x]
    assert len(line) == 1 and f"uid {NOBODY}" in line[0]
    # ID 1 is still free for an admitted peer
    b = connect(sock, 1)
    assert recv(b) == (2, None) and recv(b)[0] == 1
    b.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another local user")
def test_allowed_uid_and_group_join(procs, open_dir):
    sock = os.path.join(open_dir, "u.sock")
    procs.hub(sock, "--allow-uid", "nobody")
    os.chmod(sock, 0o666)  # --allow-uid admits; the mode is the operator's to open
    assert as_nobody(sock, 1) == ["reply", "2", "1"]
    procs.stop_all()
    sock2 = os.path.join(open_dir, "g.sock")
    procs.hub(sock2, "--group", str(NOBODY))
    assert stat.S_IMODE(os.stat(sock2).st_mode) == 0o660
    assert os.stat(sock2).st_gid == NOBODY
    assert as_nobody(sock2, 1) == ["reply", "2", "1"]  # a member (gid) connects and joins


def test_bad_access_options_are_one_line_errors(tmp_path):
    for extra, text in ((["--group", "no-such-group-here"], "no such group"),
                        (["--allow-uid", "no-such-user-here"], "no such user"),
                        (["--qemu-peers", "5"], "--qemu-peers: ID 5")):
        out = subprocess.run(cli("hub", "--socket", str(tmp_path / "x.sock"), *extra),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and text in out.stderr, out.stderr
    assert not os.listdir(tmp_path)


def test_silent_peer_takes_no_id_unless_qemu_peers_allow_it(procs, tmp_path):
    sock = str(tmp_path / "s.sock")
    hub = procs.hub(sock)
    q = connect(sock, None)  # sends nothing: dropped after the hello timeout, no ID given
    assert q.recv(8) == b""
    q.close()
    hub.wait_for("sent no ID", timeout=5)
    a = connect(sock, 0)  # the backend's ID is still free
    assert recv(a) == (2, None) and recv(a)[0] == 0
    a.close()
    procs.stop_all()

    sock = str(tmp_path / "t.sock")
    procs.hub(sock, "--qemu-peers", "1")
    q = connect(sock, None)  # a QEMU peer gets an ID set aside for QEMU, not the free ID 0
    assert recv(q) == (0, None) and recv(q)[0] == 1
    q2 = connect(sock, None)  # none left for a second one
    assert recv(q2) == (0, None) and recv(q2)[0] == -errno.EBUSY
    a = connect(sock, 0)
    assert recv(a) == (2, None) and recv(a)[0] == 0
    for s in (q, q2, a):
        s.close()


def test_log_limiter_counts_what_it_drops():
    now = [0.0]
    lim = LogLimiter(burst=2, window=10.0, clock=lambda: now[0])
    assert [lim.allow("k") for _ in range(5)] == [0, 0, None, None, None]
    assert lim.allow("other") == 0  # per key
    now[0] = 10.0
    assert lim.allow("k") == 3  # the next line carries the count of the dropped ones
    assert lim.allow("k") == 0 and lim.allow("k") is None


def test_reconnect_loop_does_not_flood_the_log(procs, tmp_path):
    sock = str(tmp_path / "f.sock")
    hub = procs.hub(sock)
    for _ in range(60):
        p = SimIvshmem(sock, 1)
        p.close()
    a = connect(sock, 0)  # a join of another ID is still logged
    assert recv(a) == (2, None) and recv(a)[0] == 0
    hub.wait_for("id=0", timeout=10)
    a.close()
    text = hub.log()
    joined = [x for x in text.splitlines() if "peer joined" in x and "id=1" in x]
    assert 1 <= len(joined) <= LogLimiter().burst
