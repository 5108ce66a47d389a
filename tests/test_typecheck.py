"""The mypy configuration keeps the core as strict as ``mypy --strict``.

A per-module ``strict = true`` would turn on --strict for every module (mypy applies it
globally), so pyproject.toml spells out --strict's flags for ``ivshmem_virtio``. This test reads
the list from the installed mypy's own help, so a mypy that adds a flag to --strict fails here
instead of leaving the core less strict than it says. The type check itself runs in
scripts/test (``.venv/bin/mypy``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parent.parent


def _strict_flags() -> list[str]:
    """--strict's flags as mypy --help lists them: ['--disallow-any-generics', ...]."""
    env = {**os.environ, "COLUMNS": "10000"}  # argparse wraps at the width: one line each
    out = subprocess.run([sys.executable, "-m", "mypy", "--help"], capture_output=True,
                         text=True, timeout=60, check=True, env=env).stdout
    m = re.search(r"--strict\s+Strict mode; enables the following flags: (.*)", out)
    assert m, "mypy --help no longer describes --strict"
    flags = re.findall(r"--[a-z-]+", m.group(1))
    assert len(flags) >= 10, flags
    return flags


def test_core_override_is_all_of_strict() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    core = next(o for o in cfg["overrides"] if "ivshmem_virtio.*" in o["module"])
    missing = []
    for flag in _strict_flags():
        name = flag[2:].replace("-", "_")
        key, want = (name[3:], False) if name.startswith("no_") else (name, True)
        if core.get(key, cfg.get(key)) is not want:
            missing.append(f"{key} = {str(want).lower()}")
    assert not missing, f"the core's mypy override lacks --strict's {missing}"
