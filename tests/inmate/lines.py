"""A child's stdout read line by line in a thread, for the inmate tests' harnesses."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable


class Lines:
    """Lines of ``stream`` as they come; :meth:`expect` waits for one with a prefix.

    Every line taken (matching or not) goes to :attr:`history`, so a test can also assert on
    what passed by. ``describe`` adds context (the child's stderr) to a timeout's message.
    """

    def __init__(self, stream: Iterable[str], describe: Callable[[], str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.history: list[str] = []
        self._describe = describe
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Iterable[str]) -> None:
        for line in stream:
            self.queue.put(line.rstrip("\n"))

    def expect(self, prefix: str | tuple[str, ...], timeout: float) -> str:
        """The next line starting with ``prefix`` (or with one of several)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} within {timeout}s; stdout tail "
                                     f"{self.history[-20:]}\n{self._describe()}")
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            self.history.append(line)
            if line.startswith(prefix):
                return line

    def drain(self, settle: float) -> list[str]:
        """Every line that arrives within ``settle`` seconds."""
        out = []
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=0.02)
            except queue.Empty:
                continue
            self.history.append(line)
            out.append(line)
        return out
