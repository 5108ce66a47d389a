"""``ivshmem-virtio bench [SUITE ...] [--quick] [--json FILE|-] [--plots DIR]``.

Runs the selected suites (all by default) and the baselines they are compared with, in one run
on one machine, then prints a results table and the targets of issue 5. ``--json -`` writes the
JSON document to stdout and moves the tables to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .core import CPUS_ENV, Context, Progress, machine_info, two_cpus


@dataclass(frozen=True)
class Suite:
    name: str
    run: Callable[[Context], None]
    help: str
    needs: tuple[str, ...] = ()  # baselines its targets are ratios against


def _suites() -> dict[str, Suite]:
    from . import baselines, blk, can, cfront, console, doorbell, fairness, inmate, vhostuser

    table = [
        Suite("pingpong", baselines.run_pingpong,
              "two-process ping-pong, C and Python, eventfd and busy-poll"),
        Suite("minring", baselines.run_minring,
              "the least a 512 B virtio-blk read costs: a bare ring in Python and C"),
        Suite("doorbell", doorbell.run_doorbell, "doorbell round trip over the sim link"),
        Suite("blk-latency", blk.run_latency, "blk 512 B read QD1 in block/poll/adaptive",
              ("pingpong", "minring")),
        Suite("cfront", cfront.run_cfront, "blk 512 B read QD1 from a blocking C frontend",
              ("pingpong",)),
        # after the QD1 suite: the latency floors are measured right before it, not 20 s earlier
        Suite("idle", blk.run_idle, "the adaptive backend's CPU with its frontend idle (10 s)"),
        Suite("disk", baselines.run_disk, "os.preadv of the image from page cache, fio psync"),
        Suite("blk-seq", blk.run_seq, "blk 128 KiB sequential read/write, QD 1..32", ("disk",)),
        Suite("blk-rand", blk.run_rand, "blk 4 KiB random read/write IOPS, QD 1..32",
              ("disk",)),
        Suite("fairness", fairness.run_fairness,
              "one serve, two disks: reads on b while a is flooded (vs a CPU hog)"),
        Suite("rss", blk.run_rss, "backend RSS serving 4 devices, flat over many requests"),
        Suite("vhost-user", vhostuser.run_vhost_user,
              "the same disk over ivshmem and over vhost-user: QD1 latency, QD32 IOPS"),
        Suite("can", can.run_can, "virtio-can frames/s one way and round trip", ("pingpong",)),
        Suite("inmate", inmate.run_inmate, "the RTOS inmate's fast reply (SPI bytes, time)"),
        Suite("console", console.run_console,
              "virtio-console output MB/s and keystroke echo vs a bare pty, same run"),
    ]
    return {s.name: s for s in table}


def select(names: list[str], suites: dict[str, Suite]) -> list[str]:
    """The suites to run, in canonical order, with the baselines their targets need."""
    unknown = [n for n in names if n not in suites]
    if unknown:
        raise ValueError(f"unknown suite(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(suites)}")
    wanted = set(names or suites)
    for n in list(wanted):
        wanted.update(suites[n].needs)
    return [n for n in suites if n in wanted]


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmarks; 0 when every suite ran (targets are reported, not enforced)."""
    suites = _suites()
    if getattr(args, "list", False):
        for s in suites.values():
            needs = f" (with {', '.join(s.needs)})" if s.needs else ""
            print(f"{s.name:12s} {s.help}{needs}")
        return 0
    try:
        chosen = select(list(args.suites or []), suites)
    except ValueError as e:
        print(f"ivshmem-virtio bench: error: {e}", file=sys.stderr)
        return 2
    to_stdout = args.json_out == "-"
    out = sys.stderr if to_stdout else sys.stdout
    progress = Progress()
    workdir = Path(tempfile.mkdtemp(prefix="ivshmem-virtio-bench-"))
    ctx = Context(workdir, bool(args.quick), progress)
    cpus = two_cpus()
    saved_env = os.environ.get(CPUS_ENV)
    if cpus is not None:  # the floors' two processes on two CPUs, like two cells (core.pinned)
        os.environ[CPUS_ENV] = f"{cpus[0]},{cpus[1]}"
        ctx.params["latency_cpus"] = list(cpus)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    errors: dict[str, str] = {}
    load_start = _loadavg()
    if load_start[0] > 0.7:
        ctx.notes.append(f"the machine was busy when the run started (load average "
                         f"{load_start[0]:.2f}): expect noisy tails")
    timings: dict[str, float] = {}
    try:
        for name in chosen:
            progress.update(f"{name}: starting")
            t_suite = time.monotonic()
            try:
                suites[name].run(ctx)
            except Exception as e:  # noqa: BLE001 - one failed suite must not hide the others
                errors[name] = f"{type(e).__name__}: {e}"
                progress.done()
                print(f"bench: suite {name} failed: {errors[name]}", file=sys.stderr)
                if getattr(args, "log_level", "info") == "debug":
                    traceback.print_exc()
            finally:
                ctx.stop_all()
                timings[name] = round(time.monotonic() - t_suite, 1)
    except KeyboardInterrupt:
        errors["interrupted"] = "KeyboardInterrupt"
    finally:
        ctx.stop_all()
        progress.done()
        shutil.rmtree(workdir, ignore_errors=True)
        if saved_env is None:
            os.environ.pop(CPUS_ENV, None)
        else:
            os.environ[CPUS_ENV] = saved_env

    from . import report, targets

    goals = targets.evaluate(ctx)
    params = {"quick": ctx.quick, "suites": chosen, "suite_seconds": timings,
              "started": started.isoformat(timespec="seconds"),
              "duration_s": round(time.monotonic() - t0, 1), "loadavg_start": load_start,
              "loadavg_end": _loadavg(), **ctx.params}
    mach = machine_info()
    print(f"machine: {mach['cpu_model']}, {mach['cores']} cores, kernel {mach['kernel']}, "
          f"Python {mach['python']}, numpy {mach['numpy']}"
          f"{' (quick run)' if ctx.quick else ''}", file=out)
    print(f"data path: backend {mach['blk_data_path']}, frontend {mach['blk_frontend_path']}",
          file=out)
    if ctx.results:
        print(report.results_table(ctx.results), file=out)
        print(file=out)
    print(report.targets_table(goals), file=out)
    for suite, why in ctx.unavailable.items():
        print(f"not available: {suite}: {why}", file=out)
    for note in ctx.notes:
        print(f"note: {note}", file=out)
    if args.plots:
        made = report.plots(ctx.results, Path(args.plots))
        if isinstance(made, str):
            ctx.notes.append(made)
            print(f"plots: {made}", file=out)
        else:
            print(f"plots: {', '.join(str(p) for p in made) or 'nothing to plot'}", file=out)
    print(f"bench finished in {params['duration_s']} s"
          + (f" with failed suites: {', '.join(errors)}" if errors else ""), file=out)
    if args.json_out:
        doc = report.document(mach, params, ctx.results, goals, ctx.unavailable,
                              ctx.notes, errors)
        text = json.dumps(doc, indent=2)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(text + "\n")
    return 1 if errors else 0
