"""The CAN round trip of ``ivshmem-virtio demo``: hubs, backend and two frontends as processes.

Two sim links, one ``ivshmem-virtio can`` backend serving both on one software CAN switch, and
two python-can programs on the ``ivshmem`` interface: an echo node that answers every frame
with ``id + 1`` and the same payload, and a pinger that sends classic, extended, CAN FD and RTR
frames, checks every answer and times the round trips. ``ivshmem-virtio demo`` runs it after the
blk part; ``python -m ivshmem_virtio.app.can_demo echo|ping`` runs one of the two frontends.

Like the CLI, this module reaches into the frontend only lazily, inside the child programs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..procs import Child, cli

if TYPE_CHECKING:
    import can

TITLE = "CAN round trip"
RESULT = "RESULT "
PROTOCOLS = "0xC024,0x8024"  # virtio-can backend / frontend (device ID 36)


# --- the two frontends (child processes) ---------------------------------------------------------
def _open(link: str) -> can.BusABC:
    from ivshmem_virtio.frontend.can_bus import IvshmemCanBus

    return IvshmemCanBus(channel=link, fd=True)


def _answer(m: can.Message) -> can.Message:
    import can

    limit = 0x1FFFFFFF if m.is_extended_id else 0x7FF
    return can.Message(arbitration_id=(m.arbitration_id + 1) & limit,
                       is_extended_id=m.is_extended_id, is_remote_frame=m.is_remote_frame,
                       is_fd=m.is_fd, dlc=m.dlc, data=None if m.is_remote_frame else m.data)


def echo(link: str) -> int:
    """Answer every frame with ``id + 1`` until SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    bus = _open(link)
    print("echo ready", flush=True)
    try:
        while not stop.is_set():
            m = bus.recv(0.2)
            if m is not None:
                bus.send(_answer(m))
    finally:
        bus.shutdown()
    return 0


def _probe(i: int) -> can.Message:
    import can

    seq = i.to_bytes(4, "little")
    kind = i % 4
    if kind == 0:
        return can.Message(arbitration_id=0x100, data=seq, is_extended_id=False)
    if kind == 1:
        return can.Message(arbitration_id=0x18DA00F1, data=seq * 2, is_extended_id=True)
    if kind == 2:
        return can.Message(arbitration_id=0x200, data=seq * 16, is_fd=True, is_extended_id=False)
    return can.Message(arbitration_id=0x300, is_remote_frame=True, dlc=i % 9,
                       is_extended_id=False)


def ping(link: str, count: int) -> int:
    """Send ``count`` frames one at a time; every answer must match. Prints one JSON line."""
    bus = _open(link)
    rtts: list[float] = []
    bad = 0
    try:
        for i in range(count):
            sent = _probe(i)
            t0 = time.perf_counter()
            bus.send(sent)
            got = bus.recv(5.0)
            rtts.append(time.perf_counter() - t0)
            want = _answer(sent)
            if got is None or (got.arbitration_id, got.is_extended_id, got.is_remote_frame,
                               got.is_fd, got.dlc, bytes(got.data)) != (
                    want.arbitration_id, want.is_extended_id, want.is_remote_frame, want.is_fd,
                    want.dlc, bytes(want.data)):
                bad += 1
    finally:
        bus.shutdown()
    us = sorted(r * 1e6 for r in rtts)
    print(RESULT + json.dumps({
        "frames": count, "mismatches": bad,
        "rtt_p50_us": round(statistics.median(us), 1),
        "rtt_p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1)}), flush=True)
    return 0 if bad == 0 else 1


# --- the demo step ---------------------------------------------------------------------------
def can_round_trip(work: str, count: int = 200) -> dict[str, Any]:
    """Start hubs, backend and echo; run the pinger; stop everything by pid."""
    children: list[Child] = []
    here = [sys.executable, "-m", "ivshmem_virtio.app.can_demo"]
    result: dict[str, Any] = {"ok": False}
    try:
        socks = [os.path.join(work, f"can{i}.sock") for i in range(2)]
        hubs = [Child(f"can-hub{i}", cli("hub", "--socket", s, "--protocols", PROTOCOLS,
                                         "--rw-size", "0x40000"), work)
                for i, s in enumerate(socks)]
        children += hubs
        for hub in hubs:
            hub.wait_for("hub listening")
        backend = Child("can-backend", cli("can", "--link", f"sim:{socks[0]}", "--link",
                                           f"sim:{socks[1]}", "--bus", "virtual:demo", "--fd"),
                        work)
        children.append(backend)
        backend.wait_for("virtio-can backend", 20)
        echo_node = Child("can-echo", [*here, "echo", "--link", f"sim:{socks[1]}"], work)
        children.append(echo_node)
        echo_node.wait_for("echo ready", 20)
        pinger = Child("can-ping", [*here, "ping", "--link", f"sim:{socks[0]}", "--count",
                                    str(count)], work)
        children.append(pinger)
        code = pinger.proc.wait(120)
        lines = [ln for ln in pinger.log().splitlines() if ln.startswith(RESULT)]
        if code != 0 or not lines:
            raise RuntimeError(f"CAN pinger failed ({code}):\n{pinger.log()}")
        result = json.loads(lines[-1][len(RESULT):])
        result["ok"] = result["mismatches"] == 0
        result["pids"] = {c.name: c.pid for c in children}
    finally:
        codes = {c.name: c.stop() for c in reversed(children)}
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        result["ok"] = False
        result["exit_codes"] = bad
    result["summary"] = (
        f"2 hubs, the can backend and 2 python-can frontends (echo pid "
        f"{result.get('pids', {}).get('can-echo')}, ping pid "
        f"{result.get('pids', {}).get('can-ping')}) as processes: {result.get('frames', 0)} "
        f"classic/extended/FD/RTR round trips, {result.get('mismatches', '?')} mismatches; "
        f"RTT p50 {result.get('rtt_p50_us')} us, p99 {result.get('rtt_p99_us')} us"
        + (f"; bad exits {bad}" if bad else ""))
    return result



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ivshmem_virtio.app.can_demo")
    sub = p.add_subparsers(dest="role", required=True)
    e = sub.add_parser("echo", help="answer every frame with id + 1")
    e.add_argument("--link", required=True)
    q = sub.add_parser("ping", help="send frames and time the answers")
    q.add_argument("--link", required=True)
    q.add_argument("--count", type=int, default=200)
    args = p.parse_args(argv)
    from ..log import setup_logging

    setup_logging(level="warning")
    if args.role == "echo":
        return echo(args.link)
    return ping(args.link, args.count)


if __name__ == "__main__":
    sys.exit(main())
