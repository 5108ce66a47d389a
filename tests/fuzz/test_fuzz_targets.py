"""Every Python fuzz target, 20,000 structure-aware cases each, depth counted and printed.

A target whose generator stops reaching its deepest stage (a request executed, a frame
accepted, a transaction applied) fails here, as does any crash: the input is printed as hex
for ``tests/fuzz/corpus/<target>/`` or a regression test. FUZZ_SEED picks another set of cases
(the seed is printed); FUZZ_CASES runs more of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from . import Record
from .engine import quiet_logs, run_target
from .targets import Target, fd_count, make_targets

CASES = int(os.environ.get("FUZZ_CASES", "20000"))
SEED = int(os.environ.get("FUZZ_SEED", "20240613"))
MIN_DEPTH = 0.20  # share of cases that must reach the deepest stage
NAMES = ["ring", "blk", "can_tx", "can_ctrl", "transport", "hub", "nbd"]


@pytest.fixture(scope="module")
def targets() -> Iterator[dict[str, Target]]:
    ts, close = make_targets()
    try:
        yield {t.name: t for t in ts}
    finally:
        close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", NAMES)
def test_target_reaches_depth_without_crashes(name: str, targets: dict[str, Target],
                                              record_property: Record) -> None:
    fds = fd_count()
    stats = run_target(targets[name], CASES, SEED)
    record_property("figure", f"{stats.line()} (seed {SEED})")
    assert not stats.crashes, "\n".join(f"{why}\ninput: {data.hex()}"
                                        for data, why in stats.crashes[:3])
    assert stats.execs >= CASES
    assert stats.share >= MIN_DEPTH, f"only {stats.share:.1%} reached '{stats.stage}'"
    assert fd_count() <= fds, "file descriptors leaked"


def test_every_target_is_run_and_has_a_corpus(targets: dict[str, Target]) -> None:
    from .engine import corpus_inputs

    assert sorted(targets) == sorted(NAMES)
    for name in NAMES:
        inputs = corpus_inputs(name)
        assert inputs, f"tests/fuzz/corpus/{name}/ is empty"
        with quiet_logs():
            assert any(targets[name].run(d) for d in inputs), f"no {name} seed reaches depth"
