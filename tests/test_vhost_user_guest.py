"""Linux's own virtio_blk driver, in a QEMU guest, against a vhost-user-blk back-end (issue 16).

The guest (tests/guest/: Debian's 6.1 kernel, a busybox initramfs, built into .cache/guest/)
boots under TCG with ``-device vhost-user-blk-pci`` and runs a plan the host wrote
(tests/guest/plan.py) on /dev/vda: patterned writes at many offsets and sizes with dd (O_DIRECT,
page cache, fsync), each read back and compared in the guest; rewrites; requests in flight
together; sync + blockdev --flushbufs; discard, write-zeroes with and without unmap; the whole
disk read back; the size, discard and write-zeroes limits the driver sees. Every step reports on
the serial console; then the host compares the image byte for byte with its model of what the
guest wrote. A second run serves the image read-only: /sys/block/vda/ro is 1, writes are
refused, the data reads back and the image is unchanged.

Back-ends: ours (``ivshmem-virtio blk --vhost-user``) and QEMU's qemu-storage-daemon, the
referee: the harness must pass on it too. A planted fault (one read corrupted inside our
back-end) must make the guest's check fail. docs/vhost-user-guest.md: by hand, and timings.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ivshmem_virtio.procs import Child, cli
from tests.guest.build import FILE, QEMU, QSD, Guest, GuestUnavailable, build, cpio
from tests.guest.build import HERE as GUEST_DIR
from tests.guest.pattern import pattern
from tests.guest.plan import READ_ONLY_SEED, Plan, read_only_plan, read_write_plan, restart_plan

SIZE = 32 << 20
PLAN_SEED = 16  # the rw plan is random but fixed: a failure replays exactly
GUEST_TIMEOUT = 150.0  # the guest powers off after ~5-30 s of TCG; this only ends a hang
pytestmark = pytest.mark.timeout(GUEST_TIMEOUT + 60)
BACKEND_TIMEOUT = 20.0
PACKAGES = ("qemu-system-x86", "qemu-system-common", "busybox-static")


def _installed(package: str) -> bool:
    return subprocess.run(["dpkg", "-s", package], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def guest() -> Guest:
    """The kernel and initramfs; a skip only where the Debian packages are absent (CI installs
    .ci/apt-packages, so there the test runs or fails)."""
    if platform.machine() != "x86_64":  # the guest, vdtool (built by the host's gcc) are x86-64
        pytest.skip(f"the guest test runs on x86-64 hosts, not {platform.machine()}")
    try:
        return build()
    except GuestUnavailable as e:
        missing = [p for p in PACKAGES if shutil.which("dpkg") and not _installed(p)]
        if missing:
            pytest.skip(f"{e}; Debian packages {', '.join(missing)} missing "
                        "(scripts/setup --test installs .ci/apt-packages)")
        raise


# --- back-ends ----------------------------------------------------------------------------------

# A wrapper around our CLI that corrupts one read (tests/guest/corrupt_read.c is the same fault
# for qemu-storage-daemon, through LD_PRELOAD): the first read of the image that covers byte
# GT_FAULT_OFFSET after a write covered it gets that byte's lowest bit flipped in guest memory.
# The image itself stays right: only the guest's read-back can see this.
CORRUPT_ONE_READ = r"""
import os, sys
target = int(os.environ["GT_FAULT_OFFSET"])
state = {"written": False, "done": False}
real_preadv, real_pwritev = os.preadv, os.pwritev

def preadv(fd, buffers, offset, *rest):
    n = real_preadv(fd, buffers, offset, *rest)
    if state["written"] and not state["done"] and offset <= target < offset + n:
        at = target - offset
        for b in buffers:
            m = memoryview(b).cast("B")
            if at < len(m):
                m[at] ^= 1
                state["done"] = True
                print(f"planted fault: flipped a bit of byte {target} in a read", flush=True)
                break
            at -= len(m)
    return n

def pwritev(fd, buffers, offset, *rest):
    n = real_pwritev(fd, buffers, offset, *rest)
    if offset <= target < offset + n:
        state["written"] = True
    return n

os.preadv, os.pwritev = preadv, pwritev
from ivshmem_virtio.app.cli import main
sys.argv[0] = "ivshmem-virtio"
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Backend:
    kind: str  # "ours" or "qsd"
    child: Child
    sock: Path


def _socket_id(sock: Path) -> tuple[int, int] | None:
    """Which socket file is at ``sock``: its inode and change time (the inode number alone
    can come back at once for a new file where a killed back-end's was unlinked: a restart
    then never looked ready; seen in CI)."""
    try:
        st = sock.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def start_backend(kind: str, work: Path, image: Path, read_only: bool,
                  fault_offset: int | None = None, name: str = "backend") -> Backend:
    """Start a back-end on ``work``/vhu.sock; returns once it listens there (a socket file of
    its own: a killed predecessor's may still be there)."""
    sock = work / "vhu.sock"
    stale = _socket_id(sock)
    if kind == "ours":
        args = ["blk", "--vhost-user", str(sock), "--image", str(image)]
        args += ["--read-only"] if read_only else []
        env = dict(os.environ)
        if fault_offset is None:
            argv = cli(*args)
        else:
            env["IVSHMEM_VIRTIO_PURE"] = "1"  # the Python data path, where the fault is planted
            env["GT_FAULT_OFFSET"] = str(fault_offset)
            argv = [sys.executable, "-c", CORRUPT_ONE_READ, *args]
        child = Child(name, argv, work, env=env)
        ready = lambda: _socket_id(sock) not in (None, stale)  # noqa: E731
    else:
        pidfile = work / f"{name}.pid"
        ro = ",read-only=on" if read_only else ""
        argv = [QSD, "--blockdev", f"driver=file,node-name=f,filename={image},discard=unmap{ro}",
                "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                f"addr.path={sock},writable={'off' if read_only else 'on'}",
                "--pidfile", str(pidfile)]
        env = dict(os.environ)
        if fault_offset is not None:
            shim = work / "corrupt_read.so"
            subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim),
                            str(GUEST_DIR / "corrupt_read.c")], check=True, timeout=60)
            env["LD_PRELOAD"] = str(shim)
            env["GT_FAULT_OFFSET"] = str(fault_offset)
        if stale is not None:
            sock.unlink()  # qemu-storage-daemon does not take over a killed one's socket
        child = Child(name, argv, work, env=env)
        ready = pidfile.exists  # written once the export listens (qemu-storage-daemon(1))
    deadline = time.monotonic() + BACKEND_TIMEOUT
    while not ready():
        if child.proc.poll() is not None or time.monotonic() > deadline:
            child.stop(5)
            pytest.fail(f"{kind} back-end did not start (exit {child.proc.returncode}):\n"
                        f"{child.log()}")
        time.sleep(0.02)
    return Backend(kind, child, sock)


# --- the guest ----------------------------------------------------------------------------------

@dataclass
class Run:
    console: str
    exit_status: int | None
    ok: set[str] = field(default_factory=set)
    fails: list[str] = field(default_factory=list)
    info: dict[str, str] = field(default_factory=dict)
    ended: bool = False

    def parse(self) -> Run:
        for raw in self.console.splitlines():
            line = raw.strip("\r")
            if not line.startswith("GT: "):
                continue
            word, _, rest = line[4:].partition(" ")
            if word == "ok":
                self.ok.add(rest)
            elif word == "FAIL":
                self.fails.append(rest)
            elif word == "info":
                self.info = dict(kv.split("=", 1) for kv in rest.split())
            elif word == "end":
                self.ended = True
        return self

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.console.splitlines()[-n:])


# QEMU's line when a back-end signals a ring's error eventfd: the guest then waits forever for
# its request, so the run ends there instead of at GUEST_TIMEOUT
VRING_ERROR = "vhost vring error"


def boot(guest: Guest, work: Path, backend: Backend, plan: Plan,
         when: tuple[str, Callable[[], None]] | None = None, reconnect: bool = False) -> Run:
    """Boot the guest on ``backend`` with ``plan``; returns when it powered off, or was ended
    (GUEST_TIMEOUT, a ring error, the back-end gone). ``when`` = (text, action): the action runs
    once, as soon as the console shows the text. ``reconnect``: QEMU reconnects to the socket
    (every second) when the back-end goes away."""
    initrd = work / "initrd.cpio"  # the cached archive + one with the plan (the kernel reads both)
    initrd.write_bytes(guest.initrd.read_bytes() + cpio([("plan.sh", FILE, plan.script())]))
    argv = [QEMU, "-machine", "q35,accel=tcg", "-m", "256M", "-smp", "1",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=c0,path={backend.sock}{',reconnect=1' if reconnect else ''}",
            "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1",
            "-kernel", str(guest.kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-nodefaults", "-display", "none", "-serial", "stdio", "-no-reboot"]
    qemu = Child("qemu", argv, work)
    deadline = time.monotonic() + GUEST_TIMEOUT
    try:
        while qemu.proc.poll() is None and time.monotonic() < deadline:
            if when is not None and when[0] in qemu.log():
                when[1]()
                when = None
            if VRING_ERROR in qemu.log() or backend.child.proc.poll() is not None:
                time.sleep(1)  # the last console lines
                break
            time.sleep(0.1)
    finally:  # also when pytest-timeout interrupts: QEMU is ended by its pid
        status = qemu.proc.poll()
        qemu.stop(5)
        initrd.unlink()
    return Run(qemu.log(), status).parse()


def stop_backend(backend: Backend) -> str:
    """End the back-end by its pid; returns its log. Its socket is removed if it left one."""
    status = backend.child.proc.poll()
    backend.child.stop(10)
    log = backend.child.log()
    left = backend.sock.exists()
    backend.sock.unlink(missing_ok=True)
    assert status is None, f"{backend.kind} back-end died during the run (exit status " \
        f"{status}):\n{log}"
    if backend.kind == "ours":
        assert not left, f"our back-end left its socket {backend.sock} behind"
    return log


def assert_guest_passed(run: Run, plan: Plan, backend_log: str) -> None:
    context = f"\n--- console (tail) ---\n{run.tail()}\n--- back-end log (tail) ---\n" \
              + "\n".join(backend_log.splitlines()[-30:])
    assert run.ended, f"the guest did not finish its plan (exit status {run.exit_status})" \
        + context
    assert run.exit_status == 0, f"QEMU exited with {run.exit_status}" + context
    assert not run.fails, "guest steps failed:\n" + "\n".join(run.fails) + context
    missing = [s for s in plan.ids if s not in run.ok]
    assert not missing, f"steps that never reported: {missing}" + context


# --- the tests ----------------------------------------------------------------------------------

BACKENDS = ["ours", "qsd"]
# The referee's read-only, planted-fault and restart runs only confirm the harness (about 30 s
# of TCG): with FULL_ENV=1 they run too; CI runs the rest, about 45 s on 2 cores
FULL_ENV = "IVSHMEM_VIRTIO_GUEST_FULL"
REFEREE_IN_FULL = ["ours", pytest.param("qsd", marks=pytest.mark.skipif(
    os.environ.get(FULL_ENV) != "1", reason=f"the referee's confirmation run: {FULL_ENV}=1"))]


@pytest.mark.parametrize("kind", BACKENDS)
def test_guest_reads_writes_flushes_discards_and_zeroes(guest: Guest, tmp_path: Path,
                                                        kind: str) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    plan = read_write_plan(SIZE, PLAN_SEED)
    backend = start_backend(kind, tmp_path, image, read_only=False)
    try:
        run = boot(guest, tmp_path, backend, plan)
    finally:
        log = stop_backend(backend)
    assert_guest_passed(run, plan, log)
    info = run.info
    assert int(info["size"]) == SIZE // 512 and int(info["bytes"]) == SIZE, info
    assert info["ro"] == "0", info
    # both back-ends offer DISCARD and WRITE_ZEROES: the driver must see them, or the "d" and
    # "p" steps above would not have reached the device
    assert int(info["discard_max_bytes"]) > 0, info
    assert int(info["write_zeroes_max_bytes"]) > 0, info
    wrong = plan.model.mismatches(image.read_bytes())
    assert not wrong, "the image differs from what the guest wrote:\n" + "\n".join(wrong)


@pytest.mark.parametrize("kind", REFEREE_IN_FULL)
def test_guest_sees_a_read_only_disk(guest: Guest, tmp_path: Path, kind: str) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(pattern(READ_ONLY_SEED, 0, SIZE))
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    plan = read_only_plan(SIZE)
    backend = start_backend(kind, tmp_path, image, read_only=True)
    try:
        run = boot(guest, tmp_path, backend, plan)
    finally:
        log = stop_backend(backend)
    assert_guest_passed(run, plan, log)
    assert run.info["ro"] == "1" and int(run.info["size"]) == SIZE // 512, run.info
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before, "the image changed"


@pytest.mark.parametrize("kind", REFEREE_IN_FULL)
def test_planted_fault_one_corrupted_read_is_caught(guest: Guest, tmp_path: Path,
                                                    kind: str) -> None:
    """A back-end with one read corrupted (a bit flipped in the guest's buffer after the data
    was written right): the guest's read-back of that range fails, and only that step."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    plan = read_write_plan(SIZE, PLAN_SEED)
    first_write = next(line for line in plan.lines if " w " in line).split()
    off, length = int(first_write[4]), int(first_write[5])
    target = off + length // 2
    backend = start_backend(kind, tmp_path, image, read_only=False, fault_offset=target)
    try:
        run = boot(guest, tmp_path, backend, plan)
    finally:
        log = stop_backend(backend)
    assert "planted fault: flipped" in log, log
    assert run.ended and run.exit_status == 0, run.tail()
    assert len(run.fails) == 1, "\n".join(run.fails) + "\n" + run.tail()
    failed = run.fails[0]
    assert f"MISMATCH at byte {target} " in failed, failed
    assert failed.split()[0] == plan.ids[1], (failed, plan.ids[:3])  # the read after the write
    assert not plan.model.mismatches(image.read_bytes()), "the image itself should be right"


@pytest.mark.parametrize("kind", REFEREE_IN_FULL)
def test_guest_survives_a_backend_killed_and_restarted(guest: Guest, tmp_path: Path,
                                                       kind: str) -> None:
    """The back-end is killed (SIGKILL) in the middle of the guest's writes and a new one is
    started on the same socket and image; QEMU reconnects (reconnect=1) and the guest goes on:
    every write acknowledged before the kill reads back, in the guest and in the image."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    plan = restart_plan(SIZE)
    backend = start_backend(kind, tmp_path, image, read_only=False)
    killed: list[Child] = []

    def restart() -> None:
        backend.child.kill()
        killed.append(backend.child)
        backend.child = start_backend(kind, tmp_path, image, read_only=False,
                                      name="backend2").child

    try:
        run = boot(guest, tmp_path, backend, plan, reconnect=True,
                   when=(f"GT: ok {plan.ids[len(plan.ids) // 3]}\n", restart))
    finally:
        for child in killed:
            child.stop(5)
        log = stop_backend(backend)
    assert killed, "the console never showed the step to kill the back-end at:\n" + run.tail()
    assert_guest_passed(run, plan, killed[0].log() + "\n--- the second back-end ---\n" + log)
    wrong = plan.model.mismatches(image.read_bytes())
    assert not wrong, "the image differs from what the guest wrote:\n" + "\n".join(wrong)


# --- the checks themselves, without a guest -----------------------------------------------------

def test_the_image_check_finds_one_wrong_byte_and_garbage_in_a_discarded_range() -> None:
    from tests.guest.plan import DiskModel

    size = 1 << 20
    model = DiskModel(size)
    model.write(4096, 65536, 3)
    model.write(5000, 100, 4)  # a byte-granular rewrite inside
    model.discard(32768, 8192)
    image = bytearray(size)
    image[4096:4096 + 65536] = pattern(3, 4096, 65536)
    image[5000:5100] = pattern(4, 5000, 100)
    assert model.mismatches(bytes(image)) == []  # the discarded range still holds seed 3
    image[32768:32768 + 512] = bytes(512)  # one discarded sector reads back zeros: allowed
    assert model.mismatches(bytes(image)) == []
    assert model.segments(4096, 2048) == ["3:904", "4:100", "3:1044"]
    assert model.segments(32768 - 512, 1024) == ["3:512", "s:512"]
    image[33792] ^= 0x40  # garbage in a discarded sector: neither zeros nor the old data
    assert "discarded bytes [33792, 34304)" in model.mismatches(bytes(image))[0]
    image[33792] ^= 0x40
    image[5099] ^= 1
    assert model.mismatches(bytes(image)) == ["byte 5099: "
                                              f"{image[5099]:#04x}, want {image[5099] ^ 1:#04x} "
                                              "(seed 4 over [5000, 5100))"]


def test_the_rw_plan_is_fixed_and_covers_every_step_kind() -> None:
    plan = read_write_plan(SIZE, PLAN_SEED)
    assert plan.script() == read_write_plan(SIZE, PLAN_SEED).script()
    kinds = {line.split()[2] for line in plan.lines if line.startswith("op ")}
    assert kinds == {"w", "r", "d", "z", "p", "flush"}
    modes = {line.split()[7] for line in plan.lines if line.startswith("op ") and " w " in line}
    assert modes >= {"direct", "buffered"}
    assert sum(line.endswith(" &") for line in plan.lines) == 12
