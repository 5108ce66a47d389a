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
    decide = np.array([w.rts_ns - w.observed_ns for w in seen], dtype=np.uint64)
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
