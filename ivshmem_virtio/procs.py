"""Child processes for the demo, the tests and the benchmarks.

Each child is started with a deadline, logs to its own file, and is ended by its pid (SIGTERM,
then SIGKILL after a grace period), never by name; nothing is left running or listening.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
_prctl: Callable[..., int] | None
try:  # resolved in the parent: nothing may be imported or looked up between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so no process outlives its owner."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def cli(*args: str) -> list[str]:
    """argv for ``ivshmem-virtio ARGS`` run by this interpreter (works without installing)."""
    return [sys.executable, "-m", "ivshmem_virtio.app.cli", *args]


class Child:
    """One started process with its log file."""

    def __init__(self, name: str, argv: list[str], log_dir: str | Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the child
        root = str(Path(__file__).resolve().parent.parent)
        child_env = dict(os.environ if env is None else env)
        child_env["PYTHONPATH"] = root + os.pathsep + child_env.get("PYTHONPATH", "")
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=child_env,
                                     preexec_fn=_die_with_parent)
        self.pid = self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until ``text`` shows ``count`` times in the log; fail early if the child dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before "
                                   f"{text!r}:\n{self.log()}")
            time.sleep(0.02)
        raise TimeoutError(f"{self.name}: {text!r} not seen {count}x within {timeout}s:\n"
                           f"{self.log()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(5)


def run_cli(args: list[str], timeout: float, log_dir: str | Path | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``ivshmem-virtio ARGS`` to completion with a deadline."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(cli(*args), capture_output=True, timeout=timeout, env=env,
                          input=input, preexec_fn=_die_with_parent)
