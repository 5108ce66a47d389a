"""``inmate``: the RTOS inmate's fast reply, counted by the simulated MCP2515.

The hosted build of ``rtos_inmate`` (``make hosted`` into the bench work dir) runs as a child
process against the MCP2515 simulator served from this process (SPI over a UNIX socket, CAN on a
python-can ``virtual`` bus). A peer on the bus sends an OBD request that a fast-reply rule
answers; the simulator's SPI accounting gives, per reply, the SPI bytes from the driver seeing
INT to the RTS that sends the answer (the budget the issue names), and the decision time between
the two. Hosted times include one socket round trip per SPI transaction, so they bound the
logic, not the RPi4's SPI bus.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from .core import Context, Measurement, PipedChild, summarize_ns

ROOT = Path(__file__).resolve().parent.parent
INMATE = ROOT / "rtos_inmate"
RULE = "7DF:02010D->7E8:03410D$cAAAAAAAA"
SPACING = 0.002  # a real reply needs >= 47 bit times on the wire; keep requests apart


def build_hosted(ctx: Context) -> tuple[Path | None, str]:
    """``make hosted`` into the work dir: (hosted_can path, or None with the reason)."""
    if not (INMATE / "Makefile").exists():
        return None, "rtos_inmate/Makefile is missing"
    if shutil.which("make") is None:
        return None, "make is not installed"
    build = ctx.workdir / "inmate-build"
    ctx.progress.update("inmate: building the hosted inmate (make hosted)")
    r = subprocess.run(["make", "-C", str(INMATE), "hosted", f"BUILD={build}"],
                       capture_output=True, text=True, timeout=300)
    exe = build / "hosted_can"
    if r.returncode != 0 or not exe.exists():
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        return None, f"make hosted failed: {' | '.join(tail)}"
    return exe, ""


def run_inmate(ctx: Context) -> None:
    """Fast replies: SPI bytes INT -> RTS and the decision time, per request."""
    try:
        import can

        from ivshmem_virtio.hwsim.mcp2515 import Mcp2515
        from ivshmem_virtio.hwsim.spisock import SpiSocketServer
    except Exception as e:  # noqa: BLE001 - the simulator is being written elsewhere
        ctx.unavailable["inmate"] = f"the MCP2515 simulator is not importable ({e})"
        return
    exe, why = build_hosted(ctx)
    if exe is None:
        ctx.unavailable["inmate"] = why
        return
    n = ctx.pick(50, 500)
    channel = f"bench-inmate-{uuid.uuid4().hex[:8]}"
    sock = ctx.workdir / "mcp.sock"
    chip = Mcp2515(osc_hz=16_000_000, rx_mode="backpressure")
    bus_rtt: list[int] = []
    with (can.Bus(interface="virtual", channel=channel) as chip_bus,
          can.Bus(interface="virtual", channel=channel) as peer,
          SpiSocketServer(chip, sock), ctx.children_scope()):
        chip.attach_bus(chip_bus)
        try:
            inmate = ctx.child("inmate", [str(exe), "--socket", str(sock), "--osc", "16000000",
                                          "--bitrate", "500000", "--max-ms", "600000",
                                          "--rules", RULE], stdin_pipe=True)
            inmate.wait_for("READY", timeout=15)
            ctx.progress.update(f"inmate: {n} fast replies")
            first = len(chip.stats.fast_reply_windows())
            request = can.Message(arbitration_id=0x7DF, is_extended_id=False,
                                  data=b"\x02\x01\x0d\x55\x55\x55\x55\x55")
            for _ in range(n):
                time.sleep(SPACING)
                t0 = time.perf_counter_ns()
                peer.send(request)
                while True:
                    reply = peer.recv(timeout=3.0)
                    if reply is None:
                        raise RuntimeError("the inmate did not answer a fast-reply request: "
                                           + " | ".join(inmate.log().splitlines()[-5:]))
                    if reply.arbitration_id == 0x7E8:
                        break
                bus_rtt.append(time.perf_counter_ns() - t0)
            windows = chip.stats.fast_reply_windows()[first:]
            assert isinstance(inmate, PipedChild)
            inmate.send("stats")
            inmate.wait_for("STATS", timeout=5)
            line = next(ln for ln in inmate.log().splitlines() if ln.startswith("STATS"))
            driver_stats = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            violations = list(chip.violations)
        finally:
            chip.close()
    seen = [w for w in windows if w.observed_ns is not None]
    spi_obs = np.array([w.bytes_from_observed for w in seen], dtype=np.float64)
    spi_raw = np.array([w.bytes_from_assert for w in windows], dtype=np.float64)
    decide = np.array([w.rts_ns - w.observed_ns for w in seen
                       if w.rts_ns is not None and w.observed_ns is not None], dtype=np.uint64)
    via = {v: sum(1 for w in seen if w.observed_via == v) for v in ("int", "status")}

    def stats(a: np.ndarray) -> dict[str, float]:
        if a.size == 0:
            return {"n": 0}
        return {"n": int(a.size), "min": float(a.min()), "p50": float(np.percentile(a, 50)),
                "p99": float(np.percentile(a, 99)), "max": float(a.max())}

    ctx.add(Measurement(
        "inmate.fast-reply.decision", "inmate",
        "inmate fast reply: driver saw INT -> RTS (hosted, SPI over a socket)",
        params={"replies": len(windows), "rule": RULE, "spacing_s": SPACING, "osc_hz": 16_000_000,
                "bitrate": 500_000, "build": "hosted"},
        latency_us=summarize_ns(decide),
        extra={"spi_bytes_from_int_seen": stats(spi_obs),
               "spi_bytes_from_int_fall": stats(spi_raw), "observed_via": via,
               "simulator_violations": violations,
               "driver_stats": {k: driver_stats.get(k) for k in
                                ("fast_last", "fast_max", "fast_timed", "rule0", "spi_bytes")}}))
    rtt = np.array(bus_rtt, dtype=np.uint64)
    ctx.add(Measurement(
        "inmate.fast-reply.bus-rtt", "inmate",
        "inmate fast reply: request on the bus -> reply on the bus (hosted)",
        params={"replies": len(bus_rtt)}, latency_us=summarize_ns(rtt)))
    if violations:
        ctx.notes.append(f"inmate: the MCP2515 simulator saw {len(violations)} protocol "
                         f"violations, first: {violations[0]}")
    run_inmate_load(ctx, exe)


SPI_HZ = 7_142_857  # 500 MHz core / CDIV 70: the deployed SCLK (docs/deploy.md)
LOADS = (50, 90)
REQUEST_PERIOD_NS = 5_000_000  # one fast-reply request every 5 ms of bus time


def budget_us(nbytes: float, spi_hz: int = SPI_HZ) -> float:
    """Wire time of ``nbytes`` SPI bytes at ``spi_hz``, 9 clocks per byte (BCM2711 SPI0)."""
    return nbytes * 9 * 1e6 / spi_hz


def load_schedule(start_ns: int, seconds: float, load_pct: int, seed: int
                  ) -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
    """Classic 8-byte frames of other nodes and the requests: ``load_pct`` % of 500 kbit/s in all.

    ``load_pct`` is the bus load as a bus analyser shows it: the requests (node "tester", one
    every REQUEST_PERIOD_NS) and the inmate's replies to them take their share of it, the
    other nodes' frames the rest (over 100 % offered, the lowest IDs, 0x7DF and 0x7E8, would
    wait without bound, as on a real bus). Each load frame is followed by idle time so that
    its bit time (stuffing included) is its share of the slot, the slot jittered +-20 % so
    nothing locks to the driver's polls.
    """
    import can

    from ivshmem_virtio.hwsim.canbits import frame_time_ns

    req = can.Message(arbitration_id=0x7DF, is_extended_id=False,
                      data=b"\x02\x01\x0d\x55\x55\x55\x55\x55")
    reply_data = bytes.fromhex("03410DAAAAAAAAAA")  # RULE's reply, padded with 0xAA
    pair_pct = 100 * (frame_time_ns(500_000, 0x7DF, bytes(req.data))
                      + frame_time_ns(500_000, 0x7E8, reply_data)) / REQUEST_PERIOD_NS
    background_pct = load_pct - pair_pct
    rng = np.random.default_rng(seed)
    end = start_ns + int(seconds * 1e9)
    load: list[tuple[int, Any]] = []
    t = start_ns
    while t < end:
        arb = int(rng.integers(0x100, 0x700))
        data = bytes(rng.integers(0, 256, 8, dtype=np.uint8))
        load.append((t, can.Message(arbitration_id=arb, is_extended_id=False, data=data)))
        slot = frame_time_ns(500_000, arb, data) * 100 / background_pct
        t += int(slot * rng.uniform(0.8, 1.2))
    first = start_ns + REQUEST_PERIOD_NS // 2
    requests: list[tuple[int, Any]] = [(t, req) for t in range(first, end, REQUEST_PERIOD_NS)]
    return load, requests


def run_inmate_load(ctx: Context, exe: Path) -> None:
    """Fast replies under 50 % and 90 % bus load, wire mode on simulated bus time.

    The simulator keeps bus time (``SimClock``: frames take their bit time at 500 kbit/s, the
    driver's SPI its bytes at 7.14 MHz), so the hosted inmate meets the load a Pi would,
    whatever the host's speed; the stats line is logged every 50 ms of bus time.
    """
    import can

    from ivshmem_virtio.hwsim.mcp2515 import Mcp2515
    from ivshmem_virtio.hwsim.simclock import SimClock
    from ivshmem_virtio.hwsim.spisock import SpiSocketServer

    seconds = ctx.pick(0.3, 1.5)
    for load_pct in LOADS:
        clock = SimClock(spi_hz=SPI_HZ)
        replies: list[can.Message] = []
        chip = Mcp2515(osc_hz=16_000_000, rx_mode="wire", sim_clock=clock,
                       tx_sink=replies.append)
        sock = ctx.workdir / f"mcp-load{load_pct}.sock"
        ctx.progress.update(f"inmate: {load_pct} % bus load, {seconds} s of bus time")
        with SpiSocketServer(chip, sock), ctx.children_scope():
            inmate = ctx.child(f"inmate-load{load_pct}",
                               [str(exe), "--socket", str(sock), "--osc", "16000000",
                                "--bitrate", "500000", "--max-ms", "600000", "--stats-ms", "50",
                                "--rules", RULE], stdin_pipe=True)
            inmate.wait_for("READY", timeout=15)
            # built from 0, then queued from "now" in one step: the idle inmate's waits move
            # bus time on while the schedule is built (a stale start made a burst of frames
            # "due" at once: the lost frames of earlier 90 % runs)
            load, requests = load_schedule(0, seconds, load_pct, seed=load_pct)
            start = chip.schedule_relative({"load": load, "tester": requests})
            end = start + int(seconds * 1e9) + 20_000_000
            deadline = time.monotonic() + 300
            while clock.now_ns() < end:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"inmate load {load_pct} %: bus time stuck at "
                                       f"{(clock.now_ns() - start) / 1e6:.1f} ms")
                time.sleep(0.05)
            assert isinstance(inmate, PipedChild)
            inmate.send("stats")
            inmate.wait_for("STATS", timeout=10)
            line = next(ln for ln in inmate.log().splitlines() if ln.startswith("STATS"))
            driver_stats = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
        # per request: SPI bytes from the frame landing in an RX buffer (INT for it) to the
        # RTS of TXB1 that sends its answer
        rts = [(b, t) for t, b, mask in chip.rts_log if mask & 0x02]
        per_req = []
        per_req_ns = []  # the same span in simulated bus time
        k = 0
        for t_rx, b_rx, arb in chip.rx_log:
            if arb != 0x7DF:
                continue
            while k < len(rts) and rts[k][0] < b_rx:
                k += 1
            if k < len(rts):
                per_req.append(rts[k][0] - b_rx)
                per_req_ns.append(max(0, rts[k][1] - t_rx))
                k += 1
        answered = sum(1 for msg in replies if msg.arbitration_id == 0x7E8)
        seen = [w.bytes_from_observed for w in chip.stats.fast_reply_windows()
                if w.bytes_from_observed is not None]
        arr = np.array(per_req, dtype=np.float64)
        spi = ({"n": int(arr.size), "p50": float(np.percentile(arr, 50)),
                "max": float(arr.max())} if arr.size else {"n": 0})
        bus_pct = 100.0 * chip.bus_busy_ns / max(1, clock.now_ns() - start)
        ctx.add(Measurement(
            f"inmate.fast-reply.load{load_pct}", "inmate",
            f"inmate fast reply at {load_pct} % bus load (wire mode, bus time, stats logging on)",
            params={"bitrate": 500_000, "load_pct": load_pct, "bus_seconds": seconds,
                    "requests": len(requests), "load_frames": len(load), "spi_hz": SPI_HZ,
                    "stats_ms": 50, "rule": RULE, "build": "hosted"},
            latency_us=summarize_ns(np.array(per_req_ns, dtype=np.uint64)),  # request -> RTS
            extra={"lost_frames": chip.rx_overflows,
                   "dropped_replies": len(requests) - answered,
                   "spi_bytes_int_to_rts": spi,
                   "spi_bytes_int_seen_to_rts_max": max(seen) if seen else None,
                   "fast_reply_budget_us": round(budget_us(spi.get("max", 0)), 1),
                   "bus_busy_pct": round(bus_pct, 1),
                   "arbitration_lost": chip.arbitration_lost,
                   "uart_bytes_in_rx": chip.uart_bytes_in_rx,
                   "uart_bytes": len(chip.uart),
                   "simulator_violations": list(chip.violations),
                   "driver_stats": {k2: driver_stats.get(k2) for k2 in
                                    ("rx", "relayed", "rule0", "rx_overflow", "urgent",
                                     "fast_max", "log_dropped")}}))
        ctx.notes.append(
            f"inmate load {load_pct} %: fast-reply SPI bytes INT -> RTS p50 {spi.get('p50')} max "
            f"{spi.get('max')} = {budget_us(spi.get('max', 0)):.1f} us at "
            f"{SPI_HZ / 1e6:.2f} MHz SCLK (9 clocks/byte; 26 B = {budget_us(26):.1f} us); "
            f"lost {chip.rx_overflows}, dropped replies {len(requests) - answered}, "
            f"bus {bus_pct:.0f} % busy")
