"""Mutation check: remove each protection in turn and require a test to fail by an assertion.

A protection nobody would miss is one a refactoring can drop silently (issue 13 found the
FLUSH's fdatasync, the device model's read-only check and the DISCARD range check removable with
the whole suite green). This script copies the source tree to a temporary directory, plants one
protection's removal at a time by exact text replacement, runs the few tests that guard it
(with a per-mutant time limit) and reports each mutant as

* killed: a selected test failed on an assertion (AssertionError, ``pytest.raises`` that did not
  raise or matched the wrong message);
* SURVIVED: the tests passed, failed only otherwise (an IndexError, an import error) or hung
  into the time limit.

It exits non-zero unless every mutant is killed, and fails loudly when a pattern no longer
occurs exactly once in the file it patches (the code changed: update the pattern). Run by
``tests/test_mutants.py``; by hand: ``.venv/bin/python tests/mutants.py [NAME...]``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ("ivshmem_virtio", "backend", "frontend", "benchmarks", "tests", "pyproject.toml")
WORKERS = 2  # mutants run at a time, each in its own copy of the tree
LIMIT = 45.0  # seconds per mutant (the tests kill in a few; a hang is a survivor)
TEST_TIMEOUT = 20  # pytest-timeout per test inside a mutant run

REGION = "tests/test_ring_protections.py::test_region_refuses_every_access_outside"
LOOPS = ["tests/test_ring_protections.py::test_chain_that_loops_is_a_ring_error",
         "tests/test_ring_protections.py::test_loop_inside_an_indirect_table_is_a_ring_error"]
AVAIL = "tests/test_ring_protections.py::test_avail_index_jump_is_a_ring_error"
USED = "tests/test_ring_protections.py::test_used_index_beyond_what_is_in_flight_is_a_ring_error"
EDGES = "tests/test_blk_edges.py"
GATE = "tests/test_durability.py::test_flush_completes_only_after_fdatasync_returned"
STRACE = "tests/test_durability.py::test_backend_process_syncs_the_image_before_completing_flush"
POLL_WATCH = ("tests/test_native_poll.py::"
              "test_a_register_write_hands_the_turn_to_the_control_path")
SLICES = "tests/test_fairness.py::test_a_turn_is_cut_in_time_slices_while_another_device_is_active"
WORKER = ("tests/test_fairness.py::"
          "test_a_busy_device_beside_an_active_one_is_served_from_its_worker_thread")
LEFT_TO_WORKER = "tests/test_fairness.py::test_an_offloaded_device_is_left_to_its_worker"
STRETCH_RING = ("tests/test_native_poll.py::"
                "test_a_worker_stretch_serves_publishes_and_rings_an_eventfd")
STRETCH_REG = "tests/test_native_poll.py::test_a_worker_stretch_rings_a_doorbell_register"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    native: bool = False  # a C source of the compiled data path: rebuilt after planting


NATIVE = "tests/test_native.py"
VQBLK = "ivshmem_virtio/_native/vqblk.c"

MUTANTS = [
    Mutant("region-check", "ivshmem_virtio/shm.py",
           "        if not (0 <= off and 0 <= length and off + length <= self.size):\n"
           "            raise MemoryAccessError(\n",
           "        if False:\n            raise MemoryAccessError(\n", (REGION,)),
    Mutant("region-view-inline-check", "ivshmem_virtio/shm.py",
           "        if not (0 <= off and 0 <= length and off + length <= self.size):\n"
           "            self.check(off, length)\n        return self._mv[off:off + length]\n",
           "        return self._mv[off:off + length]\n", (REGION,)),
    Mutant("chain-length-bound", "ivshmem_virtio/virtqueue/device.py",
           "            if budget <= 0:\n", "            if False:\n", tuple(LOOPS)),
    Mutant("avail-index-check", "ivshmem_virtio/virtqueue/device.py",
           "        if n > size:\n            raise RingError(f\"avail index jumped",
           "        if False:\n            raise RingError(f\"avail index jumped", (AVAIL,)),
    Mutant("avail-index-check-pending", "ivshmem_virtio/virtqueue/device.py",
           "        if n > self.size:\n            raise RingError(f\"avail index jumped",
           "        if False:\n            raise RingError(f\"avail index jumped", (AVAIL,)),
    Mutant("used-index-check", "ivshmem_virtio/virtqueue/driver.py",
           "        if n > self.size - len(self._free_idx):\n", "        if False:\n", (USED,)),
    Mutant("used-batch-partial", "ivshmem_virtio/virtqueue/driver.py",
           "                if out:  # the completions",
           "                if False:  # the completions",
           ("tests/test_ring_protections.py::"
            "test_completions_before_a_bad_used_element_reach_their_callers",)),
    Mutant("many-waits-in-flight", "frontend/blk.py",
           "                while group.left:  # what is in the ring ends first",
           "                while False:  # what is in the ring ends first",
           ("tests/test_blk_many.py::test_a_cancel_waits_for_what_is_in_flight",)),
    Mutant("many-depth", "frontend/blk.py",
           "while bad is None and group.left < depth:", "while bad is None:",
           ("tests/test_blk_many.py::test_fills_every_buffer_within_depth",)),
    Mutant("zerocopy-ends-at-bring-up", "frontend/blk.py",
           "        self._invalidate_lent()  # the new bring-up",
           "        pass  # the new bring-up",
           ("tests/test_blk_zerocopy.py::test_a_backend_restart_ends_the_lent_views",)),
    Mutant("zerocopy-ends-at-reset", "frontend/blk.py",
           "    async def reset_device(self, queue_size: int | None = None) -> None:\n"
           "        self._invalidate_lent()",
           "    async def reset_device(self, queue_size: int | None = None) -> None:\n"
           "        pass", ("tests/test_blk_zerocopy.py::test_a_reset_ends_the_lent_views",)),
    Mutant("zerocopy-release-frees", "frontend/blk.py",
           "        self._alloc.free(self._base)", "        pass",
           ("tests/test_blk_zerocopy.py::test_lends_the_data_until_released",)),
    Mutant("zerocopy-not-to-a-cancelled-caller", "frontend/blk.py",
           "and status == _S_OK and not fut.done() and alloc", "and status == _S_OK and alloc",
           ("tests/test_blk_zerocopy.py::test_a_cancelled_caller_leaves_no_buffer_lent",)),
    Mutant("storm-while-awake", "backend/runner.py",
           "                    waiter.woke_for_nothing()\n", "",
           ("tests/test_fairness.py::"
            "test_a_doorbell_storm_while_the_device_is_awake_is_muted",)),
    Mutant("storm-window", "ivshmem_virtio/link.py",
           "STORM_S = 0.05  #", "STORM_S = 1e-3  #",
           ("tests/test_poll_window.py::test_a_storm_turned_over_slowly_is_still_a_storm",)),
    Mutant("storm-mute-backoff", "ivshmem_virtio/link.py",
           "MUTE_MAX_S) if going_on else MUTE_S", "MUTE_MAX_S) if False else MUTE_S",
           ("tests/test_poll_window.py::test_a_storm_that_goes_on_is_muted_longer_each_time",)),
    Mutant("read-only-out", "backend/devices/blk.py",
           "        if rtype == B.T_OUT:\n            if self.read_only:\n",
           "        if rtype == B.T_OUT:\n            if False:\n", (EDGES,)),
    Mutant("read-only-out-fast-path", "backend/devices/blk.py",
           "            elif rtype == _T_OUT and not self.read_only:\n",
           "            elif rtype == _T_OUT:\n", (EDGES,)),
    Mutant("read-only-discard-write-zeroes", "backend/devices/blk.py",
           "        if rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):\n            if self.read_only:\n",
           "        if rtype in (B.T_DISCARD, B.T_WRITE_ZEROES):\n            if False:\n",
           (EDGES,)),
    Mutant("discard-write-zeroes-range", "backend/devices/blk.py",
           "            if count > self.max_discard_sectors or sector >= self.capacity \\\n"
           "                    or sector + count > self.capacity:\n",
           "            if False:\n", (EDGES,)),
    Mutant("discard-write-zeroes-flags", "backend/devices/blk.py",
           "            if flags & ~B.DWZ_F_UNMAP or (req.type == B.T_DISCARD and flags & "
           "B.DWZ_F_UNMAP):\n",
           "            if False:\n", (EDGES,)),
    Mutant("seg-max", "backend/devices/blk.py",
           "        if len(data) > self.seg_max:", "        if False:", (EDGES,)),
    Mutant("short-read", "backend/devices/blk.py",
           "                if got != req.data_len:\n",
           "                if False:\n", (EDGES,)),
    Mutant("short-write-fast-path", "backend/devices/blk.py",
           "                if done != n:\n                    raise OSError(28",
           "                if False:\n                    raise OSError(28", (EDGES,)),
    Mutant("flush-without-fdatasync", "backend/resources/image.py",
           "        os.fdatasync(self.fd)\n", "        pass\n", (EDGES, GATE, STRACE)),
    Mutant("flush-not-called", "backend/devices/blk.py",
           "                image.flush()\n", "                pass\n", (EDGES, GATE)),
    Mutant("flush-completes-before-fdatasync", "backend/resources/image.py",
           "        os.fdatasync(self.fd)\n",
           "        __import__('threading').Thread(target=os.fdatasync, args=(self.fd,)).start()\n",
           (GATE,)),
    Mutant("image-lock", "backend/resources/image.py",
           "        fcntl.fcntl(fd, F_OFD_SETLK, flock)\n", "        pass\n",
           ("tests/test_image_lock.py::test_writer_excludes_everyone",)),
    Mutant("turn-early-end", "backend/runner.py",
           "        return any(p is not self and p._has_work() for p in peers)\n",
           "        return False\n",
           ("tests/test_fairness.py::test_a_turn_ends_early_when_another_device_waits",)),
    Mutant("idle-wake-loop-pass", "backend/runner.py",
           "                if not busy:\n", "                if False:\n",
           ("tests/test_fairness.py::test_a_wake_up_for_nothing_still_lets_the_loop_run",)),
    Mutant("turn-time-slices", "backend/runner.py",
           "        return any(p is not self and p.active_at > since for p in peers)\n",
           "        return False\n", (SLICES + "[compiled]", SLICES + "[pure]")),
    # the compiled data path: each check it makes before it serves a chain without Python
    Mutant("native-read-only", VQBLK,
           "    else if (t == T_OUT && !b->read_only)\n", "    else if (t == T_OUT)\n",
           (NATIVE,), native=True),
    Mutant("native-capacity", VQBLK,
           "s < b->capacity\n          && s + (n >> 9) <= b->capacity))",
           "s < b->capacity))", (NATIVE,), native=True),
    Mutant("native-short-io", VQBLK,
           "    if (done != (ssize_t)data.len) {", "    if (done < 0) {", (NATIVE,), native=True),
    Mutant("native-avail-jump", VQBLK,
           "    if (n > q->size) {\n        *stop = 1;", "    if (0) {\n        *stop = 1;",
           (NATIVE,), native=True),
    Mutant("native-indirect-length", VQBLK,
           "            if (d.len == 0 || d.len % 16 || d.len / 16 > VQ_MAX_QUEUE_SIZE)",
           "            if (d.len == 0 || d.len / 16 > VQ_MAX_QUEUE_SIZE)", (NATIVE,),
           native=True),
    Mutant("native-poll-watch", VQBLK,
           "        if (watch) {\n            *why = POLL_WATCH;",
           "        if (0) {\n            *why = POLL_WATCH;", (POLL_WATCH,), native=True),
    # a busy device in its own worker thread (backend/runner.py _offload)
    Mutant("offload-never", "backend/runner.py",
           "        if (self._others_active(time.perf_counter()) and self._service_worker",
           "        if (False and self._service_worker", (WORKER,)),
    Mutant("offload-nice", "backend/runner.py",
           "        os.setpriority(os.PRIO_PROCESS, 0, WORKER_NICE)", "        pass", (WORKER,)),
    Mutant("offload-handler-guard", "backend/runner.py",
           "if self._stopping or self._offloaded or not t.idle()",
           "if self._stopping or not t.idle()", (LEFT_TO_WORKER,)),
    Mutant("offload-pause", "backend/runner.py", "        waiter.pause()\n", "",
           (LEFT_TO_WORKER,)),
    Mutant("offload-paused-unmute", "ivshmem_virtio/link.py",
           "if not self._fds and not self._closed and not self._paused:",
           "if not self._fds and not self._closed:", (LEFT_TO_WORKER,)),
    Mutant("offload-join", "backend/runner.py",
           "                concurrent.futures.wait([done])\n", "                pass\n",
           ("tests/test_fairness.py::test_a_cancelled_runner_waits_for_its_worker",)),
    Mutant("offload-ring", VQBLK,
           "            ring_driver(q, ring);\n", "", (STRETCH_RING, STRETCH_REG), native=True),
    Mutant("offload-ring-event", VQBLK,
           "    __atomic_store_n(q->mem + r->event_off, (uint8_t)1, __ATOMIC_RELAXED);\n", "",
           (STRETCH_RING,), native=True),
    Mutant("native-time-slice", VQBLK,
           "        if (until_ns && now_ns() >= until_ns)\n", "        if (0)\n",
           (SLICES + "[compiled]",), native=True),
]

# what a failure by assertion looks like in pytest's short summary (-rf)
_ASSERTION = re.compile(r"^FAILED .+? - (AssertionError|Failed: DID NOT RAISE|assert )", re.M)


def copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "fuzz", ".hypothesis")
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            # links kept as links: ivshmem_virtio/backend must stay the mutated backend/
            shutil.copytree(src, dst / name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(src, dst / name)


def pytest_run(tree: Path, tests: tuple[str, ...], limit: float) -> tuple[str, str]:
    """('passed'|'failed'|'timeout', output) of the tests in ``tree``."""
    env = dict(os.environ)
    env.pop("IVSHMEM_VIRTIO_PURE", None)  # the compiled path's mutants need it loaded
    env["HYPOTHESIS_PROFILE"] = "mutants"  # no shrinking (tests/conftest.py)
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["COLUMNS"] = "1000"  # the short summary keeps each failure's reason
    argv = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
            "-o", "addopts=", f"--timeout={TEST_TIMEOUT}", *tests]
    try:
        r = subprocess.run(argv, cwd=tree, env=env, capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired as e:  # subprocess.run ended the pytest it started
        out = (e.stdout or b"").decode(errors="replace")
        return "timeout", out
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    return ("passed" if r.returncode == 0 else "failed"), out


def native_build(tree: Path) -> str | None:
    """Compile the tree's ``_native`` extension in place (as setup.py does); the error text, or
    None when it built."""
    import sysconfig

    nat = tree / "ivshmem_virtio" / "_native"
    out = nat / f"_fastpath{sysconfig.get_config_var('EXT_SUFFIX')}"
    cc = os.environ.get("CC", "cc")
    argv = [cc, "-shared", "-fPIC", "-O2", "-std=gnu11",
            f"-I{sysconfig.get_paths()['include']}", str(nat / "_fastpath.c"),
            str(nat / "vqblk.c"), "-o", str(out)]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else r.stderr.strip()[-2000:]


def plant(tree: Path, m: Mutant) -> str:
    """Apply ``m`` in ``tree``; returns the original text to restore."""
    f = tree / m.path
    text = f.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutant {m.name}: the pattern occurs {count} times in {m.path} "
                         f"(expected exactly once): the code changed, update tests/mutants.py\n"
                         f"pattern:\n{m.old}")
    f.write_text(text.replace(m.old, m.new))
    return text


def run_mutant(tree: Path, m: Mutant, limit: float) -> tuple[str, str, float]:
    """Plant ``m`` in ``tree``, run its tests, restore: (state, output, seconds)."""
    original = plant(tree, m)
    t0 = time.monotonic()
    try:
        err = native_build(tree) if m.native else None
        if err is not None:
            state, out = "failed", f"the mutant does not compile:\n{err}"
        else:
            state, out = pytest_run(tree, m.tests, limit)
    finally:
        (tree / m.path).write_text(original)
        if m.native:
            native_build(tree)
    return state, out, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="only these mutants (default: all)")
    ap.add_argument("--limit", type=float, default=LIMIT, help="seconds per mutant")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    if not chosen:
        raise SystemExit(f"no mutant named {args.names}; known: {[m.name for m in MUTANTS]}")
    sys.path.insert(0, str(ROOT))
    from ivshmem_virtio import _native

    if _native.native() is None:  # as tests/test_native.py skips: nothing compiled to mutate
        skipped = [m.name for m in chosen if m.native]
        chosen = [m for m in chosen if not m.native]
        if skipped:
            print(f"skipped {len(skipped)} mutants of the compiled data path: "
                  f"{_native.data_path()}")
        if not chosen:
            return 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        # two copies, two mutants at a time (the machine's two cores): each run is mostly a
        # pytest start-up, and one copy holds one mutant at a time
        trees = [Path(tmp) / f"tree{k}" for k in range(WORKERS)]
        for tree in trees:
            tree.mkdir()
            copy_tree(tree)
            if any(m.native for m in chosen):
                err = native_build(tree)  # the copy's own build of the unmutated source
                if err is not None:
                    print(f"the compiled data path does not build here, so its mutants "
                          f"cannot run:\n{err}")
                    return 1
        for m in chosen:  # every pattern checked before anything runs
            (trees[0] / m.path).write_text(plant(trees[0], m))
        everything = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        state, out = pytest_run(trees[0], everything, 2 * args.limit)
        if state != "passed":
            print(out[-4000:])
            print(f"baseline: the selected tests do not pass unmutated ({state})")
            return 1
        free: queue.Queue[Path] = queue.Queue()
        for tree in trees:
            free.put(tree)

        def one(m: Mutant) -> tuple[Mutant, str, str, float]:
            tree = free.get()
            try:
                return (m, *run_mutant(tree, m, args.limit))
            finally:
                free.put(tree)

        survivors = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for m, state, out, took in pool.map(one, chosen):
                if state == "failed" and _ASSERTION.search(out):
                    print(f"killed    {m.name:36s} {took:5.1f} s")
                    continue
                why = {"passed": "tests passed", "timeout": f"hung past {args.limit:.0f} s",
                       "failed": "failed, but not by an assertion"}[state]
                print(f"SURVIVED  {m.name:36s} {took:5.1f} s  ({why})")
                print("\n".join("    " + ln for ln in out[-2500:].splitlines()))
                survivors.append(m.name)
    print(f"{len(chosen) - len(survivors)}/{len(chosen)} mutants killed in "
          f"{time.monotonic() - start:.0f} s")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
