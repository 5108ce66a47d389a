"""Coverage-guided smoke run of every Python target under atheris (tests/fuzz/atheris_main.py).

The 20,000 cases per target of a CI run are the structure-aware ones (test_fuzz_targets.py);
instrumented atheris runs are 3-10x slower, so CI gives each target 1,000 coverage-guided runs
from its corpus: enough to prove the harness, the custom mutator and the depth it keeps.
Longer campaigns: docs/fuzzing.md. Skipped where atheris is not installed (it ships wheels for
x86_64 only; the ``test`` extra installs it there).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from . import Record
from .test_fuzz_targets import NAMES

pytest.importorskip("atheris", reason="atheris not installed (x86_64 only, the test extra)")

ROOT = Path(__file__).resolve().parents[2]
RUNS = 1000
LINE = re.compile(r"^atheris (\w+): (\d+) execs, (\d+) reached '([^']+)'", re.M)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", NAMES)
def test_atheris_run_finds_nothing_and_keeps_depth(name: str, tmp_path: Path,
                                                    record_property: Record) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.atheris_main", name, f"-runs={RUNS}", "-seed=1",
         "-max_len=8192", "-timeout=10", f"-artifact_prefix={tmp_path}/", str(tmp_path),
         str(ROOT / "tests" / "fuzz" / "corpus" / name)],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    found = LINE.findall(run.stdout)
    assert run.returncode == 0, f"atheris found something:\n{run.stderr[-4000:]}"
    assert found, run.stdout[-2000:]
    _, execs, deep, stage = found[-1]
    record_property("figure", f"atheris {name:<10} {execs:>6} execs, {deep:>6} reached "
                    f"'{stage}' ({100 * int(deep) / int(execs):4.1f} %)")
    assert int(execs) >= RUNS
    assert int(deep) >= 0.1 * int(execs), f"{name}: too few reached '{stage}'"
