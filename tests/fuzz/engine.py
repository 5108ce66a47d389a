"""The seeded structure-aware driver: N cases per target, counted by how deep they got.

Each case is a valid input with 0..3 mutations (a sixth unmutated, so the valid path is always
exercised; most carry one or two changes, close enough to valid to get past the first checks).
Every exception out of a target is a crash and keeps its input as a reproducer. Logs are
captured (and dropped) while the cases run: peer-triggered warnings are expected here.

    python -m tests.fuzz.engine [TARGET ...] [--cases N] [--seed S] [--save-crashes DIR]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from .targets import Target, fd_count, make_targets

CORPUS = Path(__file__).parent / "corpus"
MUTATIONS = (0, 1, 1, 1, 2, 2, 3)
RING_TARGETS = ("ring", "blk", "can_tx", "can_ctrl")


@dataclass
class Stats:
    target: str
    stage: str
    execs: int = 0
    deep: int = 0
    seconds: float = 0.0
    crashes: list[tuple[bytes, str]] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.deep / self.execs if self.execs else 0.0

    def line(self) -> str:
        return (f"fuzz {self.target:<10} {self.execs:>6} execs in {self.seconds:5.1f} s, "
                f"{self.deep:>6} reached '{self.stage}' ({100 * self.share:4.1f} %), "
                f"{len(self.crashes)} crashes")


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Peer-triggered warnings are the point here; keep them out of the output."""
    with structlog.testing.capture_logs() as logs:
        yield
        logs.clear()


def corpus_inputs(name: str) -> list[bytes]:
    d = CORPUS / name
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def run_target(target: Target, cases: int, seed: int, *, corpus: bool = True) -> Stats:
    """Corpus files first (replayed as they are), then ``cases`` generated cases."""
    stats = Stats(target.name, target.stage)
    rng = random.Random(f"{seed}:{target.name}")
    inputs: list[bytes] = corpus_inputs(target.name) if corpus else []
    t0 = time.perf_counter()
    with quiet_logs() as _:
        for k in range(len(inputs) + cases):
            data = inputs[k] if k < len(inputs) else target.case(rng, rng.choice(MUTATIONS))
            stats.execs += 1
            try:
                if target.run(data):
                    stats.deep += 1
            except Exception as e:  # noqa: BLE001 - every escape is a finding
                stats.crashes.append((data, f"{type(e).__name__}: {e}"))
    stats.seconds = time.perf_counter() - t0
    return stats


def campaign(names: list[str] | None, cases: int, seed: int) -> list[Stats]:
    targets, close = make_targets()
    try:
        fds = fd_count()
        out = [run_target(t, cases, seed) for t in targets if not names or t.name in names]
        leaked = fd_count() - fds
        if leaked > 0:
            out[-1].crashes.append((b"", f"{leaked} file descriptors leaked by the campaign"))
        return out
    finally:
        close()


def write_corpus(names: list[str] | None, n: int, seed: int) -> None:
    """Seeds for atheris and for replay: valid inputs, trailing zeros trimmed (the ring
    targets pad a short image with zeros, so the files stay small)."""
    targets, close = make_targets()
    try:
        for t in targets:
            if names and t.name not in names:
                continue
            rng = random.Random(f"{seed}:{t.name}:corpus")
            d = CORPUS / t.name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                data = t.case(rng, 0)
                if t.name in RING_TARGETS:
                    data = data.rstrip(b"\0")
                (d / f"seed-{i}").write_bytes(data)
    finally:
        close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*")
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--save-crashes", type=Path)
    ap.add_argument("--write-corpus", type=int, metavar="N",
                    help="write N valid (unmutated) seeds per target to tests/fuzz/corpus/")
    args = ap.parse_args(argv)
    if args.write_corpus:
        write_corpus(args.targets, args.write_corpus, args.seed)
        return 0
    print(f"seed {args.seed}")
    bad = 0
    for s in campaign(args.targets, args.cases, args.seed):
        print(s.line(), flush=True)
        for i, (data, why) in enumerate(s.crashes[:5]):
            print(f"  crash: {why}\n  input: {data.hex()}")
            if args.save_crashes:
                args.save_crashes.mkdir(parents=True, exist_ok=True)
                (args.save_crashes / f"{s.target}-{i}").write_bytes(data)
        bad += len(s.crashes)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
