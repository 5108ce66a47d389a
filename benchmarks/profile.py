"""Profile the blk hot paths: py-spy on the backend process, pyinstrument on the frontend.

``python -m ivshmem_virtio.benchmarks.profile blk-latency|blk-rand|blk-seq [--mode M]
[--seconds S] [--out DIR]``
runs one workload (512 B reads at QD1, 4 KiB random reads at QD32 or 128 KiB sequential reads
at QD8) against a backend process,
samples the backend with ``py-spy record --nonblocking`` and the frontend (this process) with
pyinstrument, then prints the top self-time functions and lines of each side with file:line and
their cost per request in microseconds. Needs ``pip install py-spy pyinstrument``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .blk import BIG_RW, DEFAULT_RW, connect, disconnect, start_backend
from .core import Context, Progress

ROOT = str(Path(__file__).resolve().parent.parent) + "/"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    if path.startswith(ROOT):
        return path[len(ROOT):]
    cut = path.find("site-packages/")
    if cut >= 0:
        return path[cut + len("site-packages/"):]
    return path.rsplit("/lib/python3", 1)[-1] if "/lib/python3" in path else path


def parse_collapsed(text: str) -> tuple[int, collections.Counter, collections.Counter,
                                         collections.Counter]:
    """py-spy raw output -> (samples, self by function, self by line, inclusive by function)."""
    total = 0
    self_fn: collections.Counter = collections.Counter()
    self_line: collections.Counter = collections.Counter()
    incl_fn: collections.Counter = collections.Counter()
    for row in text.splitlines():
        stack, _, count = row.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = []
        for f in stack.split(";"):
            m = _FRAME.match(f)
            frames.append((m["func"], _short(m["file"]), m["line"] or "?") if m else (f, "?", "?"))
        func, file, line = frames[-1]
        self_fn[f"{func} ({file})"] += n
        self_line[f"{file}:{line} {func}"] += n
        for key in {f"{fn} ({fl})" for fn, fl, _ in frames}:
            incl_fn[key] += n
    return total, self_fn, self_line, incl_fn


def pyinstrument_self(session: Any) -> tuple[float, collections.Counter]:  # noqa: ANN401
    """Self time (s) per function from a pyinstrument session's frame tree.

    pyinstrument keeps a frame's own time in a synthetic ``[self]`` child; it is credited to the
    parent here, so the result reads like py-spy's leaf counts.
    """
    root = session.root_frame()
    by_fn: collections.Counter = collections.Counter()
    stack = [root] if root is not None else []
    while stack:
        fr = stack.pop()
        for child in fr.children:
            if child.is_synthetic:
                where = f"{_short(fr.file_path or '?')}:{fr.line_no}"
                by_fn[f"{fr.function} ({where})"] += child.time
            else:
                stack.append(child)
    return (root.time if root is not None else 0.0), by_fn


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _top(counter: collections.Counter, scale: float, n: int, unit: str) -> list[str]:
    return [f"  {v * scale:9.2f} {unit}  {k}" for k, v in counter.most_common(n)]


async def _workload(link: str, mode: str, which: str, seconds: float, size: int) -> int:
    client = await connect(link, mode)
    try:
        done = 0
        stop_at = time.monotonic() + seconds
        if which == "blk-latency":
            while time.monotonic() < stop_at:
                for _ in range(100):
                    await client.read((done * 4096) % size, 512)
                    done += 1
            return done
        if which == "blk-seq":  # 128 KiB sequential reads, QD8
            bs, qd = 128 << 10, 8
            table = [(i * bs) % (size - size % bs) for i in range(1 << 16)]
        else:  # 4 KiB random reads, QD32
            bs, qd = 4096, 32
            table = (np.random.default_rng(5).integers(0, size // bs, 1 << 16) * bs).tolist()
        count = [0]

        async def worker() -> None:
            buf = bytearray(bs)
            while time.monotonic() < stop_at:
                i = count[0]
                count[0] = i + 1
                await client.readinto(table[i & 0xFFFF], buf)

        await asyncio.gather(*[worker() for _ in range(qd)])
        return count[0]
    finally:
        await disconnect(client)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ivshmem_virtio.benchmarks.profile",
                                description=__doc__)
    p.add_argument("workload", choices=("blk-latency", "blk-rand", "blk-seq"))
    p.add_argument("--mode", choices=("block", "poll", "adaptive"), default="block")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=2000, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--out", help="keep the raw profiles in this directory")
    args = p.parse_args(argv)
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("pyinstrument is not installed (pip install pyinstrument)", file=sys.stderr)
        return 2
    import uvloop

    work = Path(tempfile.mkdtemp(prefix="ivshmem-virtio-profile-"))
    out = Path(args.out) if args.out else work
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(work, True, Progress())
    try:
        image = ctx.image()
        rw = DEFAULT_RW if args.workload == "blk-latency" else BIG_RW
        link, backend = start_backend(ctx, "profile", image, mode=args.mode, rw_size=rw)
        raw = out / f"backend-{args.workload}-{args.mode}.pyspy.txt"
        # --native needs py-spy to stop the process while it unwinds C frames
        how = ["--native"] if args.native else ["--nonblocking"]
        spy = ctx.child("py-spy", [pyspy, "record", "--pid", str(backend.pid), *how,
                                   "--rate", str(args.rate), "--format", "raw", "--output",
                                   str(raw), "--duration", str(int(args.seconds + 3))])
        time.sleep(1.0)  # py-spy attaches
        prof = Profiler(interval=0.0002, async_mode="disabled")
        be0, fe0 = cpu_seconds(backend.pid), time.process_time()
        prof.start()
        t0 = time.monotonic()
        requests = uvloop.run(_workload(link, args.mode, args.workload, args.seconds,
                                        ctx.image_size))
        wall = time.monotonic() - t0
        session = prof.stop()
        be_cpu, fe_cpu = cpu_seconds(backend.pid) - be0, time.process_time() - fe0
        spy.proc.wait(args.seconds + 30)
        spy_log = spy.log()
        ctx.stop(spy)
        if not raw.exists():
            print(f"py-spy wrote no profile:\n{spy_log}", file=sys.stderr)
            return 1
        (out / f"frontend-{args.workload}-{args.mode}.pyinstrument.txt").write_text(
            prof.output_text(unicode=False, color=False, show_all=False))
        total, self_fn, self_line, incl_fn = parse_collapsed(raw.read_text())
        per_req = 1e6 / args.rate / max(1, requests)  # us of backend CPU per sample per request
        n = max(1, requests)
        print(f"{args.workload}, mode {args.mode}: {requests} requests in {wall:.2f} s "
              f"({requests / wall:,.0f}/s, {wall / n * 1e6:.1f} us each); CPU per request: "
              f"backend {be_cpu / n * 1e6:.1f} us, frontend {fe_cpu / n * 1e6:.1f} us "
              "(frontend includes the profiler's own overhead)")
        print(f"\nbackend (py-spy, {total} active samples at {args.rate}/s = "
              f"{total * per_req:.1f} us of backend CPU per request), self time:")
        print("\n".join(_top(self_fn, per_req, args.top, "us/req")))
        print("\nbackend, hottest lines:")
        print("\n".join(_top(self_line, per_req, args.top, "us/req")))
        print("\nbackend, inclusive time:")
        print("\n".join(_top(incl_fn, per_req, args.top, "us/req")))
        fe_total, fe_self = pyinstrument_self(session)
        scale = 1e6 / max(1, requests)
        print(f"\nfrontend (pyinstrument, {fe_total:.2f} s sampled = "
              f"{fe_total * scale:.1f} us per request, waiting included), self time:")
        print("\n".join(_top(fe_self, scale, args.top, "us/req")))
        if args.out:
            print(f"\nraw profiles in {out}")
    finally:
        ctx.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
