"""blk-client and the CLI's misuse answers: one line on stderr, exit status 2, no traceback.

Every case the README and ``blk-client --help`` document, against real hub and backend processes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ivshmem_virtio.app.cli import _size
from ivshmem_virtio.procs import cli

TIMEOUT = 30.0


def run_cli(*args: str, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=cwd, input=stdin, capture_output=True,
                          timeout=TIMEOUT)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ivshmem-virtio: error: "), err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


@pytest.fixture
def disks(procs, image_factory, tmp_path):
    """A writable 1 MiB disk on rw.sock and a read-only one on ro.sock."""
    rw = image_factory(1 << 20, "rw.img")
    ro = image_factory(1 << 20, "ro.img")
    procs.hub(str(tmp_path / "rw.sock"))
    procs.hub(str(tmp_path / "ro.sock"))
    procs.blk(str(tmp_path / "rw.sock"), rw, name="blk-rw")
    procs.blk(str(tmp_path / "ro.sock"), ro, "--read-only", name="blk-ro")
    (tmp_path / "data.bin").write_bytes(b"x" * 1024)
    return tmp_path


MISUSE = [
    # (link, action args, words the one line must carry)
    ("rw", ["read", "--offset", "3", "--length", "512", "--out", "o"], ["--offset 3", "512"]),
    ("rw", ["read", "--length", "100", "--out", "o"], ["--length 100", "512"]),
    ("rw", ["read", "--offset", "1M", "--length", "512", "--out", "o"], ["past the end"]),
    ("rw", ["read", "--offset", "2M", "--out", "o"], ["past the end"]),
    ("rw", ["write", "--offset", "100", "--in", "data.bin"], ["--offset 100"]),
    ("rw", ["write", "--offset", "1M", "--in", "data.bin"], ["past the end"]),
    ("rw", ["write", "--in", "missing.bin"], ["missing.bin"]),
    ("rw", ["read", "--out", "no/such/dir/o"], ["no/such/dir/o"]),
    ("ro", ["write", "--in", "data.bin"], ["read-only"]),
    ("ro", ["verify", "--size", "64K"], ["read-only"]),
    ("rw", ["verify", "--size", "8X"], ["8X"]),
    ("rw", ["read", "--offset=-1K", "--out", "o"], ["-1K"]),
]


@pytest.mark.parametrize(("link", "action", "words"), MISUSE,
                         ids=[" ".join([m[0], *m[1]]) for m in MISUSE])
def test_blk_client_misuse_is_one_line(disks, link, action, words):
    r = run_cli("blk-client", "--link", f"sim:{link}.sock", *action, cwd=disks)
    assert_one_line_error(r, *words)


def test_blk_client_good_uses(disks):
    """The same options used right: suffixes, stdout when it is no terminal, a padded write."""
    r = run_cli("blk-client", "--link", "sim:rw.sock", "write", "--offset", "4K", "--in", "-",
                "--flush", cwd=disks, stdin=b"hello")
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    r = run_cli("blk-client", "--link", "sim:rw.sock", "read", "--offset", "4K", "--length",
                "1K", cwd=disks)  # stdout is a pipe here: no --out needed
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    assert r.stdout == b"hello" + bytes(1019)
    r = run_cli("blk-client", "--link", "sim:rw.sock", "verify", "--size", "256K", "--depth",
                "4", cwd=disks)
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    result = json.loads(r.stdout)
    assert result["verified"] and result["bytes"] == 256 << 10


def test_blk_client_refuses_binary_to_a_terminal(disks):
    master, slave = os.openpty()
    try:
        r = subprocess.run(cli("blk-client", "--link", "sim:rw.sock", "read", "--length", "1K"),
                           cwd=disks, stdout=slave, stderr=subprocess.PIPE, timeout=TIMEOUT)
        os.close(slave)
        slave = -1
        out = b""
        try:
            while chunk := os.read(master, 4096):
                out += chunk
        except OSError:  # EIO: the terminal's other side is closed
            pass
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    assert_one_line_error(r, "terminal", "--out")
    assert out == b""


def test_blk_client_without_backend_says_so_and_times_out(procs, tmp_path):
    procs.hub(str(tmp_path / "lonely.sock"))
    r = run_cli("blk-client", "--link", "sim:lonely.sock", "--timeout", "0.5", "info",
                cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0] == "ivshmem-virtio: waiting for the backend on sim:lonely.sock (up to 0.5 s)"
    assert lines[1].startswith("ivshmem-virtio: error: ") and "READY" in lines[1]


@pytest.mark.parametrize("args", [
    ["blk-client", "--link", "sim:nothing-here.sock", "info"],
    ["blk-client", "--link", "bogus", "info"],
    ["blk-client", "--link", "sim:x.sock", "--timeout", "0", "info"],
    ["blk-client", "--link", "sim:x.sock", "verify", "--size", "lots"],
    ["--log-level", "loud", "blk-client", "--link", "sim:x.sock", "info"],
    ["serve", "--config", "missing.toml"],
    ["serve", "--config", "missing.toml", "--file-only"],
], ids=lambda a: " ".join(a))
def test_cli_misuse_without_a_link_is_one_line(tmp_path, args):
    assert_one_line_error(run_cli(*args, cwd=tmp_path))


@pytest.mark.parametrize(("text", "value"), [
    ("8M", 8 << 20), ("8MiB", 8 << 20), ("8mb", 8 << 20), ("512K", 512 << 10), ("1G", 1 << 30),
    ("4096", 4096), ("0x1000", 4096), ("0", 0),
])
def test_size_suffixes(text, value):
    assert _size(text) == value
