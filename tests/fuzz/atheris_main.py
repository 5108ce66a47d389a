"""Coverage-guided runs of the Python targets with atheris (libFuzzer for Python).

    python -m tests.fuzz.atheris_main TARGET [libFuzzer options] [CORPUS_DIR ...]

The product modules are instrumented for coverage; the mutator is structure-aware half of the
time (a fresh valid case from the target's generator with one or two field mutations) and
libFuzzer's byte mutations of the current input the other half, so the corpus grows towards new
coverage without losing the valid structure that reaches depth. Every 1,000 executions a line gives
the executions so far and how many reached the target's deepest stage (libFuzzer ends the
process with exit(), so the last such line is the total).
"""

from __future__ import annotations

import random
import sys

import atheris

with atheris.instrument_imports(include=["ivshmem_virtio", "backend", "frontend"]):
    from .engine import quiet_logs
    from .targets import make_targets


def main(argv: list[str]) -> None:
    targets, _close = make_targets()
    by_name = {t.name: t for t in targets}
    if len(argv) < 2 or argv[1] not in by_name:
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer options]; targets: {', '.join(by_name)}")
    target = by_name[argv[1]]
    runs = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("-runs=")), 0)
    stats = {"execs": 0, "deep": 0}
    logs = quiet_logs()
    logs.__enter__()  # for the life of the process: libFuzzer ends it with exit()

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return target.case(rng, rng.choice((1, 1, 2)))[:max_size]
        return atheris.Mutate(data, max_size)

    def one(data: bytes) -> None:
        stats["execs"] += 1
        if target.run(data):
            stats["deep"] += 1
        n = stats["execs"]
        if n % 1000 == 0 or n == runs:  # libFuzzer exits without Python's atexit: the last
            print(f"atheris {target.name}: {n} execs, {stats['deep']} reached "  # line counts
                  f"'{target.stage}' ({100 * stats['deep'] / n:.1f} %)", flush=True)

    atheris.Setup([argv[0], *argv[2:]], one, custom_mutator=mutate)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
