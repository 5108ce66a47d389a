"""The runner's options on the command line: a bad value is one line and exit status 2."""

from __future__ import annotations

import subprocess

import pytest

from ivshmem_virtio.procs import cli


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "1e7"])
def test_spin_us_out_of_range_is_refused(tmp_path, value):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 16))
    r = subprocess.run(cli("blk", "--link", f"sim:{tmp_path / 'x.sock'}", "--image", str(image),
                           "--spin-us", value), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--spin-us" in r.stderr
