"""Fuzzing that reaches depth: structure-aware generators, coverage-guided runs."""

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

#: pytest's ``record_property`` fixture: each fuzz test records its figure (executions, depth)
#: for the run's "figures" section (tests/conftest.py), which xdist's workers reach too
Record = Callable[[str, object], None]


def libfuzzer(harness: Path, tmp_path: Path, corpus: Path, runs: int, line: re.Pattern[str],
              record: Record, deepest: str, min_deep: float, *options: str) -> None:
    """Build ``harness`` with clang (libFuzzer, ASan, UBSan) and run it ``runs`` times from
    ``corpus``; its closing ``line`` gives the executions and the inputs that reached the
    deepest stage (``deepest``, as the figure says it), recorded as the run's figure with
    libFuzzer's coverage. Fails on a finding, fewer executions than ``runs`` or fewer than
    ``min_deep`` of them deep; skips where clang or its runtime is missing."""
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (see .ci/apt-packages)")
    exe = tmp_path / harness.stem
    build = subprocess.run(
        ["clang", "-g", "-O1", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
         "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all", str(harness),
         "-o", str(exe)],
        capture_output=True, text=True, timeout=120)
    if build.returncode != 0:
        if "libclang_rt.fuzzer" in build.stderr or "fsanitize=fuzzer" in build.stderr:
            pytest.skip("clang's libFuzzer runtime is missing (libclang-rt-14-dev)")
        pytest.fail(f"the harness does not build:\n{build.stderr[-3000:]}")
    new = tmp_path / "corpus"
    new.mkdir()
    run = subprocess.run(
        [str(exe), f"-runs={runs}", "-seed=1", "-max_len=600", *options,
         "-use_value_profile=1", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/",
         str(new), str(corpus)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path)
    found = line.findall(run.stdout)
    covs = re.findall(r"cov: (\d+) ft: (\d+)", run.stderr)
    assert run.returncode == 0, f"a finding (input saved in {tmp_path}):\n{run.stderr[-4000:]}"
    assert found, run.stdout + run.stderr[-2000:]
    execs, deep = (int(x) for x in found[-1])
    edges, features = covs[-1] if covs else ("?", "?")
    record("figure", f"fuzz {harness.stem} {execs:>7} execs, {deep:>7} {deepest} "
           f"({100 * deep / max(1, execs):4.1f} %), libFuzzer coverage "
           f"{edges} edges / {features} features")
    assert execs >= runs
    assert deep >= min_deep * execs, f"too few inputs {deepest}"
