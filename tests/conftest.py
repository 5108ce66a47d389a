"""Shared fixtures: a sim hub process, backend processes, and an asyncio runner with a deadline."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from ivshmem_virtio.procs import Child, cli


def run(coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
    """Run a coroutine on a fresh loop with a deadline (tests never hang)."""

    async def guarded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


class Procs:
    """Processes a test started; every one is ended by pid at teardown."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: list[Child] = []

    def start(self, name: str, *args: str, wait: str | None = None,
              timeout: float = 15.0) -> Child:
        child = Child(name, cli(*args), self.work)
        self.children.append(child)
        if wait:
            child.wait_for(wait, timeout)
        return child

    def hub(self, sock: str, *extra: str, protocols: str = "0xC002,0x8002") -> Child:
        return self.start("hub-" + Path(sock).stem, "hub", "--socket", sock, "--protocols",
                          protocols, *extra, wait="hub listening")

    def blk(self, sock: str, image: str, *extra: str, name: str = "blk") -> Child:
        return self.start(name, "blk", "--link", f"sim:{sock}", "--image", image, *extra,
                          wait="backend ready")

    def stop_all(self) -> None:
        for c in reversed(self.children):
            c.stop(10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
    leftovers = [f for f in os.listdir(tmp_path) if f.endswith(".sock")]
    assert not leftovers, f"sockets left behind: {leftovers}"


@pytest.fixture
def image_factory(tmp_path: Path) -> Callable[..., str]:
    def make(size: int = 16 << 20, name: str = "disk.img", data: bytes | None = None) -> str:
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(size)
            if data:
                f.write(data)
        return str(path)

    return make


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The figures tests record (``record_property("figure", ...)``: the fuzzers' executions
    and depth), printed at the end of the run, also when xdist's workers ran the tests."""
    lines = [str(value) for outcome in ("passed", "failed")
             for report in terminalreporter.stats.get(outcome, [])
             if getattr(report, "when", "") == "call"
             for key, value in getattr(report, "user_properties", []) if key == "figure"]
    if lines:
        terminalreporter.section("figures")
        for line in sorted(lines):
            terminalreporter.write_line(line)


# tests/mutants.py runs the guarding tests with HYPOTHESIS_PROFILE=mutants: a mutant is killed by
# the first failing example; shrinking it (many more runs) only risks the per-test time limit
if os.environ.get("HYPOTHESIS_PROFILE") == "mutants":
    from hypothesis import Phase, settings

    settings.register_profile("mutants", phases=[Phase.explicit, Phase.reuse, Phase.generate])
    settings.load_profile("mutants")
