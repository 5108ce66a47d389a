"""A console session through a simulated link with real processes: hub, ``ivshmem-virtio
console`` (``--socket`` and ``--pty``) and ``ivshmem-virtio console-client`` as the cell.

Typed input reaches the cell, the cell's output comes back, a window size change is seen by the
frontend. Every process is ended by pid; no socket or pty is left behind.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ivshmem_virtio.procs import _die_with_parent, cli
from ivshmem_virtio.spec import console as wire

PROTOCOLS = (f"{wire.IVSHMEM_PROTOCOL_CONSOLE_BACKEND:#06x},"
             f"{wire.IVSHMEM_PROTOCOL_CONSOLE_FRONTEND:#06x}")
ROOT = str(Path(__file__).resolve().parent.parent)


def read_until(fd: int, want: bytes, timeout: float = 15.0) -> bytes:
    """Read ``fd`` until ``want`` shows up (or fail after ``timeout``)."""
    got = b""
    end = time.monotonic() + timeout
    while want not in got:
        left = end - time.monotonic()
        assert left > 0, f"{want!r} not seen; got {got!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            assert chunk, f"end of stream before {want!r}; got {got!r}"
            got += chunk
    return got


@pytest.fixture
def cell(procs, tmp_path: Path) -> Iterator:  # noqa: ANN001
    """Start the hub; yields a function that starts the cell (console-client) with pipes."""
    sock = str(tmp_path / "con.sock")
    procs.hub(sock, "--rw-size", "0x40000", protocols=PROTOCOLS)
    started: list[subprocess.Popen] = []

    def start(*extra: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        p = subprocess.Popen(cli("console-client", "--link", f"sim:{sock}", *extra),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, preexec_fn=_die_with_parent)
        started.append(p)
        return p

    start.sock = sock  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for p in started:
            if p.poll() is None:
                os.kill(p.pid, 15)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, 9)
                    p.wait(5)
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    f.close()


def test_session_over_socket(procs, cell, tmp_path: Path) -> None:  # noqa: ANN001
    csock = str(tmp_path / "console.sock")
    backend = procs.start("console", "console", "--link", f"sim:{cell.sock}", "--socket", csock,
                          "--mode", "block", wait="backend ready")
    assert oct(os.stat(csock).st_mode & 0o777) == "0o600"
    client = cell()
    backend.wait_for("driver ok")
    with socket.socket(socket.AF_UNIX) as user:
        user.connect(csock)
        user.sendall(b"uname -a\r")  # typed in the root cell ...
        read_until(client.stdout.fileno(), b"uname -a\r")  # ... reaches the cell
        client.stdin.write(b"Linux cell 6.1\r\n")  # the cell answers ...
        client.stdin.flush()
        read_until(user.fileno(), b"Linux cell 6.1\r\n")  # ... and it comes back
        # a second user is turned away; the first keeps its session
        with socket.socket(socket.AF_UNIX) as other:
            other.connect(csock)
            other.settimeout(10)
            assert other.recv(1) == b""
        blob = os.urandom(256 << 10)  # bulk output, in order and whole
        client.stdin.write(blob)
        client.stdin.flush()
        got = read_until(user.fileno(), blob[-64:], timeout=30)
        assert got == blob
    assert backend.stop() == 0
    assert not os.path.exists(csock)


def test_session_over_pty_with_resize(procs, cell) -> None:  # noqa: ANN001
    backend = procs.start("console", "console", "--link", f"sim:{cell.sock}", "--pty",
                          "--cols", "100", "--rows", "30", wait="char device redirected to")
    path = re.search(r"char device redirected to (\S+)", backend.log()).group(1)
    client = cell("--show-size", "--echo")
    read_until(client.stderr.fileno(), b"console size 100x30")
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"echo me\r")
        read_until(client.stdout.fileno(), b"echo me\r")  # the cell got it ...
        read_until(fd, b"echo me\r")  # ... and its echo came back on the pty
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        read_until(client.stderr.fileno(), b"console size 132x50")
    finally:
        os.close(fd)
    backend.wait_for("console resized")
    assert backend.stop() == 0


def test_log_file(procs, cell, tmp_path: Path) -> None:  # noqa: ANN001
    logf = tmp_path / "cell.log"
    backend = procs.start("console", "console", "--link", f"sim:{cell.sock}", "--log-file",
                          str(logf), wait="backend ready")
    client = cell()
    client.stdin.write(b"[    0.000000] Booting Linux\n")
    client.stdin.close()
    assert client.wait(20) == 0
    assert backend.stop() == 0
    assert logf.read_bytes() == b"[    0.000000] Booting Linux\n"


BAD = [
    (["console", "--link", "nope"], "--link"),
    (["console", "--link", "sim:/x", "--cols", "0"], "--cols"),
    (["console", "--link", "sim:/x", "--rows", "70000"], "--rows"),
    (["console", "--link", "sim:/x", "--pty", "--log-file", "f"], "not allowed"),
    (["console", "--link", "sim:/nonexistent/hub.sock", "--log-file", "/nonexistent/dir/f"],
     "/nonexistent/dir/f"),
    (["console", "--link", "sim:/nonexistent/hub.sock", "--log-file", "LOG"], "--link"),
    (["console-client", "--link", "sim:/nonexistent/hub.sock"], "--link"),
    (["console-client", "--link", "sim:/x", "--timeout", "0"], "--timeout"),
]


@pytest.mark.parametrize(("args", "word"), BAD)
def test_cli_misuse_is_one_line_status_2(args: list[str], word: str, tmp_path: Path) -> None:
    args = [str(tmp_path / "log") if a == "LOG" else a for a in args]
    r = subprocess.run(cli(*args), capture_output=True, timeout=30, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL)
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert word in err, err
