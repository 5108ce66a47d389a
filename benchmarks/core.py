"""What every suite shares: the run context, measurements, percentiles and machine facts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ivshmem_virtio._native import data_path, front_path
from ivshmem_virtio.procs import Child


def run_loop(coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:  # noqa: ANN401
    """Run a coroutine on a fresh uvloop, cancelled past ``timeout`` seconds (never hangs)."""
    import asyncio

    import uvloop

    async def guarded() -> Any:  # noqa: ANN401
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise TimeoutError(f"no result within {timeout:.0f} s") from None

    return uvloop.run(guarded())


PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def summarize_ns(samples_ns: np.ndarray | list[int]) -> dict[str, float]:
    """Latency statistics in microseconds: n, min, mean, p50/p90/p99/p999, max."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    if a.size == 0:
        return {"n": 0}
    out: dict[str, float] = {"n": int(a.size), "min": round(float(a.min()), 3),
                             "mean": round(float(a.mean()), 3)}
    for name, q in PERCENTILES:
        out[name] = round(float(np.percentile(a, q)), 3)
    out["max"] = round(float(a.max()), 3)
    return out


@dataclass
class Measurement:
    """One row of the results: an id, its parameters, latency and/or throughput figures."""

    id: str
    suite: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    latency_us: dict[str, float] | None = None
    ops_per_s: float | None = None
    mb_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    samples_ns: np.ndarray | None = None  # kept for plots, never written to JSON

    @property
    def invalid(self) -> bool:
        """A device reset happened during the measurement (and was not measured again)."""
        r = self.extra.get("device_resets")
        return any(r) if isinstance(r, list) else bool(r)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "suite": self.suite, "title": self.title,
                             "params": self.params}
        if self.latency_us is not None:
            d["latency_us"] = self.latency_us
        if self.ops_per_s is not None:
            d["ops_per_s"] = round(self.ops_per_s, 1)
        if self.mb_per_s is not None:
            d["mb_per_s"] = round(self.mb_per_s, 2)
        d.update(self.extra)
        return d


class Progress:
    """Progress lines on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.t0 = time.monotonic()
        self._open = False

    def update(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self._open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self._open:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._open = False


class PipedChild(Child):
    """A :class:`Child` whose stdin is a pipe (for programs that read commands and quit on EOF)."""

    def __init__(self, name: str, argv: list[str], log_dir: str | Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the child
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.PIPE)
        self.pid = self.proc.pid

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # EOF: the program's own clean exit
                self.proc.wait(min(timeout, 2.0))
            except (OSError, subprocess.TimeoutExpired):
                pass
        return super().stop(timeout)


CPUS_ENV = "IVSHMEM_BENCH_CPUS"


def two_cpus() -> tuple[int, int] | None:
    """The two CPUs the two sides of a round trip run on, as two cells always do (None: < 2)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


@contextmanager
def pinned(peer_pid: int) -> Iterator[None]:
    """This process on the first CPU of :func:`two_cpus`, ``peer_pid`` on the second, inside
    the block (the C and Python floors pin the same way, through IVSHMEM_BENCH_CPUS)."""
    cpus = two_cpus()
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        os.sched_setaffinity(peer_pid, {cpus[1]})
        yield
    finally:
        os.sched_setaffinity(0, saved)


@dataclass
class Context:
    """One bench run: where temp files go, how long to measure, what came out."""

    workdir: Path
    quick: bool
    progress: Progress
    results: list[Measurement] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)

    def add(self, m: Measurement) -> Measurement:
        self.results.append(m)
        return m

    def get(self, mid: str) -> Measurement | None:
        return next((m for m in self.results if m.id == mid), None)

    def child(self, name: str, argv: list[str], stdin_pipe: bool = False) -> Child:
        """Start a child logging into the work dir; stopped by pid at the end at the latest."""
        c = PipedChild(name, argv, self.workdir) if stdin_pipe else Child(name, argv, self.workdir)
        self.children.append(c)
        return c

    def stop(self, c: Child, timeout: float = 10.0) -> int:
        code = c.stop(timeout)
        if c in self.children:
            self.children.remove(c)
        return code

    def stop_all(self) -> None:
        for c in reversed(list(self.children)):
            self.stop(c, timeout=5.0)

    @contextmanager
    def children_scope(self) -> Iterator[None]:
        """Stop every child started inside the block when it ends, newest first."""
        before = len(self.children)
        try:
            yield
        finally:
            for c in reversed(self.children[before:]):
                self.stop(c, timeout=5.0)

    def run(self, name: str, argv: list[str], timeout: float) -> Child:
        """Run a child to completion within ``timeout`` (killed by pid past it), or raise."""
        c = self.child(name, argv)
        try:
            c.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(c, timeout=2.0)
            raise RuntimeError(f"{name}: no result within {timeout:.0f} s") from None
        code = self.stop(c)
        if code != 0:
            tail = c.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited with {code}: {tail}")
        return c

    def image(self) -> Path:
        """The disk image every disk benchmark uses: random data, written once, in page cache."""
        path = self.workdir / "disk.img"
        if not path.exists():
            size = self.image_size
            self.progress.update(f"writing a {size >> 20} MiB test image")
            rng = np.random.default_rng(1)
            with open(path, "wb") as f:
                for _ in range(0, size, 8 << 20):
                    f.write(rng.bytes(8 << 20))
                f.flush()
                os.fsync(f.fileno())  # no writeback may run during the measurements
            self.params["image_bytes"] = size
        return path

    @property
    def image_size(self) -> int:
        return (128 << 20) if self.quick else (512 << 20)

    def pick(self, quick: Any, full: Any) -> Any:  # noqa: ANN401 - any parameter type
        return quick if self.quick else full


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare runs: CPU, cores, kernel, Python, numpy."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": np.__version__,
        "blk_data_path": data_path(),  # compiled, or pure Python (IVSHMEM_VIRTIO_PURE, no build)
        "blk_frontend_path": front_path(),  # the same for the frontend's module
    }
    try:
        import uvloop

        info["uvloop"] = uvloop.__version__
    except ImportError:  # pragma: no cover - a declared dependency
        info["uvloop"] = None
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["mem_total_mb"] = int(mem[1]) // 1024
    except (OSError, IndexError, ValueError):
        pass
    try:
        info["hypervisor"] = "hypervisor" in Path("/proc/cpuinfo").read_text().split("flags", 2)[1]
    except (OSError, IndexError):
        pass
    return info


def rss_kb(pid: int) -> int:
    """VmRSS of a process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size in KiB: shared pages split between the processes mapping them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
