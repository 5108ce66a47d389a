"""``bench console``: virtio-console output throughput and keystroke echo latency, each against
a bare pty measured in the same run.

* ``console.output``: bytes the cell writes (console-client's stdin) until they arrive at a
  client of the backend's ``--socket``: pipe -> frontend -> transmitq -> backend -> socket.
  Baseline ``console.pty-output``: the same bytes through a bare pty pair (raw), one process.
* ``console.echo``: one byte written to the backend's socket, through the receiveq to a cell
  that echoes it (``console-client --echo``) and back through the transmitq; round trip.
  Baseline ``console.pty-echo``: one byte through a raw pty to a child process that echoes it.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
import tty

import numpy as np

from ivshmem_virtio.procs import cli
from ivshmem_virtio.spec import console as wire

from .core import Context, Measurement, summarize_ns

PROTOCOLS = (f"{wire.IVSHMEM_PROTOCOL_CONSOLE_BACKEND:#06x},"
             f"{wire.IVSHMEM_PROTOCOL_CONSOLE_FRONTEND:#06x}")
CHUNK = 64 << 10
ECHO_CHILD = ("import os,sys,tty\nfd=int(sys.argv[1])\ntty.setraw(fd)\nos.write(1,b'ready\\n')\n"
              "while True:\n d=os.read(fd,64)\n if not d: break\n os.write(fd,d)\n")


def _recv_exactly(fd: int, n: int, timeout: float) -> None:
    got = 0
    end = time.monotonic() + timeout
    while got < n:
        left = end - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"console bench: {got} of {n} bytes within {timeout:.0f} s")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"console bench: stream ended after {got} of {n} bytes")
            got += len(chunk)


def _pty_output(total: int) -> float:
    """Seconds to move ``total`` bytes through a bare raw pty (writer thread, reader here)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    data = os.urandom(CHUNK)

    def writer() -> None:
        left = total
        while left > 0:
            left -= os.write(master, data[:min(CHUNK, left)])

    try:
        t0 = time.perf_counter()
        th = threading.Thread(target=writer, daemon=True)
        th.start()
        _recv_exactly(slave, total, 60)
        elapsed = time.perf_counter() - t0
        th.join(10)
        return elapsed
    finally:
        os.close(master)
        os.close(slave)


def _echo_rounds(fd: int, rounds: int, warm: int) -> list[int]:
    samples = []
    for i in range(rounds + warm):
        t0 = time.perf_counter_ns()
        os.write(fd, b"k")
        _recv_exactly(fd, 1, 10)
        if i >= warm:
            samples.append(time.perf_counter_ns() - t0)
    return samples


def _pty_echo(ctx: Context, rounds: int, warm: int) -> list[int]:
    master, slave = os.openpty()
    tty.setraw(slave)
    os.set_inheritable(slave, True)
    try:
        import subprocess

        child = subprocess.Popen([sys.executable, "-c", ECHO_CHILD, str(slave)],
                                 stdout=subprocess.PIPE, pass_fds=(slave,))
        try:
            assert child.stdout is not None
            if child.stdout.readline() != b"ready\n":
                raise RuntimeError("pty echo child did not start")
            return _echo_rounds(master, rounds, warm)
        finally:
            if child.poll() is None:
                os.kill(child.pid, 15)
                child.wait(5)
            child.stdout.close()  # type: ignore[union-attr]
    finally:
        os.close(master)
        os.close(slave)


def run_console(ctx: Context) -> None:
    total = ctx.pick(8 << 20, 64 << 20)
    rounds = ctx.pick(500, 5000)
    warm = max(20, rounds // 20)
    hub_sock = str(ctx.workdir / "console-hub.sock")
    con_sock = str(ctx.workdir / "console.sock")
    with ctx.children_scope():
        hub = ctx.child("console-hub", cli("hub", "--socket", hub_sock, "--protocols",
                                            PROTOCOLS, "--rw-size", "0x40000"))
        hub.wait_for("hub listening", timeout=20)
        backend = ctx.child("console-backend", cli("console", "--link", f"sim:{hub_sock}",
                                                    "--socket", con_sock))
        backend.wait_for("backend ready", timeout=20)

        # -- output throughput -------------------------------------------------------------------
        ctx.progress.update(f"console: {total >> 20} MiB of output through the link")
        cell = ctx.child("console-cell", cli("console-client", "--link", f"sim:{hub_sock}"),
                         stdin_pipe=True)
        backend.wait_for("driver ok", timeout=20)
        data = os.urandom(CHUNK)
        with socket.socket(socket.AF_UNIX) as user:
            user.connect(con_sock)
            stdin = cell.proc.stdin
            assert stdin is not None

            def feed() -> None:
                left = total
                while left > 0:
                    n = min(CHUNK, left)
                    stdin.write(data[:n])
                    left -= n
                stdin.flush()

            t0 = time.perf_counter()
            th = threading.Thread(target=feed, daemon=True)
            th.start()
            _recv_exactly(user.fileno(), total, 300)
            link_s = time.perf_counter() - t0
            th.join(10)
        ctx.stop(cell)
        backend.wait_for("frontend left", timeout=20)
        ctx.progress.update(f"console: {total >> 20} MiB through a bare pty")
        pty_s = _pty_output(total)
        mb = total / 1e6
        ctx.add(Measurement("console.pty-output", "console",
                            "bare pty pair, raw, one process (baseline)",
                            params={"bytes": total}, mb_per_s=mb / pty_s))
        ctx.add(Measurement("console.output", "console",
                            "console output: cell stdin -> transmitq -> backend -> socket",
                            params={"bytes": total, "backend_mode": "adaptive"},
                            mb_per_s=mb / link_s, extra={"vs_pty": round(pty_s / link_s, 3)}))

        # -- keystroke echo --------------------------------------------------------------------
        ctx.progress.update(f"console: {rounds} keystroke echoes through the link")
        echo = ctx.child("console-echo", cli("console-client", "--link", f"sim:{hub_sock}",
                                             "--echo"))
        backend.wait_for("driver ok", timeout=20, count=2)
        with socket.socket(socket.AF_UNIX) as user:
            user.connect(con_sock)
            link = _echo_rounds(user.fileno(), rounds, warm)
        ctx.stop(echo)
        ctx.progress.update(f"console: {rounds} keystroke echoes through a bare pty")
        base = _pty_echo(ctx, rounds, warm)
        base_sum = summarize_ns(base)
        ctx.add(Measurement("console.pty-echo", "console",
                            "one byte through a raw pty to an echoing process and back "
                            "(baseline)", params={"rounds": rounds},
                            latency_us=base_sum, samples_ns=np.asarray(base, dtype=np.uint64)))
        link_sum = summarize_ns(link)
        ctx.add(Measurement("console.echo", "console",
                            "keystroke echo: socket -> receiveq -> cell -> transmitq -> socket",
                            params={"rounds": rounds, "backend_mode": "adaptive",
                                    "processes": 3},
                            latency_us=link_sum,
                            samples_ns=np.asarray(link, dtype=np.uint64),
                            extra={"p50_vs_pty": round(link_sum["p50"] / base_sum["p50"], 2)}))
