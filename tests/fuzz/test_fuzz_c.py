"""The inmate's libFuzzer harnesses (ASan + UBSan): built and run by ``make -C rtos_inmate fuzz``.

Each harness runs 20,000 inputs from its seed corpus (tests/fuzz/corpus/fuzz_*) and prints its
executions and how many reached the deepest stage (a frame delivered by the MCP2515 driver, a
frame from the virtio-can RX ring handed to the bridge). A sanitizer report or a broken
invariant makes libFuzzer exit non-zero with the input saved next to the binaries. Skipped only
when clang or its libFuzzer runtime is missing (.ci/apt-packages installs both).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from . import Record

INMATE = Path(__file__).resolve().parents[2] / "rtos_inmate"
RUNS = 20000
MIN_DEPTH = 0.20
LINE = re.compile(r"^(fuzz_\w+): (\d+) execs, (\d+) reached '([^']+)'.*$", re.M)


def _make(build: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-s", "-C", str(INMATE), f"BUILD={build}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_inmate_fuzzers_reach_depth_without_findings(tmp_path: Path,
                                                    record_property: Record) -> None:
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (see .ci/apt-packages)")
    build = _make(tmp_path, "fuzz-build", timeout=240)
    if build.returncode != 0:
        if "libclang_rt.fuzzer" in build.stderr or "fsanitize=fuzzer" in build.stderr:
            pytest.skip("clang's libFuzzer runtime is missing (libclang-rt-14-dev)")
        pytest.fail(f"fuzz harnesses do not build:\n{build.stderr[-3000:]}")
    run = _make(tmp_path, "fuzz", f"FUZZ_RUNS={RUNS}", timeout=240)
    found = LINE.findall(run.stdout)
    for name, execs, deep, stage in found:
        record_property("figure", f"fuzz {name:<20} {execs:>6} execs, {deep:>6} reached "
                        f"'{stage}' ({100 * int(deep) / max(1, int(execs)):4.1f} %)")
    assert run.returncode == 0, (f"a harness found something (input saved in {tmp_path}):\n"
                                 + run.stderr[-4000:])
    assert {name for name, *_ in found} == {"fuzz_mcp2515", "fuzz_virtio_can_rx"}, run.stdout
    for name, execs, deep, stage in found:
        assert int(execs) >= RUNS, (name, execs)
        assert int(deep) >= MIN_DEPTH * int(execs), f"{name}: too few reached '{stage}'"
