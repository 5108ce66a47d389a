"""``can``: virtio-can frames per second one way, and the echo round trip.

One ``ivshmem-virtio can`` backend process serves two links on a python-can ``virtual`` bus (the
CAN switch joins them). One way: the bench process's CanDriver on link 0 keeps a window of
classic 8-byte frames in flight; each send completes once the device put the frame on the bus
(LATE_TX_ACK), so the rate is frontend -> backend -> bus. Round trip: an echo peer on link 1 (a
child process, ``python -m ivshmem_virtio.benchmarks.can --link L``) answers every frame with
ID + 1, and the bench process times send -> echo received, one frame at a time.

python-can's ``bus.send`` through ``can.Bus(interface="ivshmem")`` on link 0, with LATE_TX_ACK
negotiated off (returns once the request is on the ring) and on (returns once the backend put
the frame on the bus), one frame every ``PACE_US`` as on a real bus (the caller sleeps between
frames, see :func:`_pace`). One echo hop, measured in
the same run: a second bus on link 1 in the same process, the time from ``send`` on link 0 to
``recv`` returning the frame on link 1 (one clock, no halving of a round trip).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import numpy as np

from ivshmem_virtio.procs import cli

from .core import Context, Measurement, run_loop, summarize_ns

RW_SIZE = 0x40000
WINDOW = 64  # frames in flight one way (the TX queue holds 256)
PACE_US = 200  # python-can sends: one frame per 200 us (a 1 Mbit/s bus: ~110 us per 8 B frame)


def missing() -> str | None:
    """Why the CAN stack cannot be benchmarked here, or None."""
    try:
        import ivshmem_virtio.backend.can_daemon  # noqa: F401
        import ivshmem_virtio.frontend.can  # noqa: F401
        from ivshmem_virtio.spec import can as wire

        wire.CanFrame.data_frame(0x123, b"\0" * 8)
    except Exception as e:  # noqa: BLE001 - any import or API problem means "not available"
        return f"the virtio-can stack is not importable ({type(e).__name__}: {e})"
    return None


async def open_driver(link: str, **kw: Any) -> Any:  # noqa: ANN401 - frontend.can.CanDriver
    from ivshmem_virtio.frontend.can import CanDriver
    from ivshmem_virtio.link import open_link
    from ivshmem_virtio.spec import can as wire

    dev = open_link(link, backend=False, protocol=wire.IVSHMEM_PROTOCOL_CAN_FRONTEND)
    driver = CanDriver(dev, mode="adaptive", timeout=15.0, **kw)
    try:
        await driver.start(timeout=15.0)
    except BaseException:
        driver.transport.leave()
        dev.close()
        raise
    return driver


async def close_driver(driver: Any) -> None:  # noqa: ANN401
    await driver.close()
    driver.dev.close()


async def _one_way(link: str, frames: int) -> tuple[int, int, float]:
    from ivshmem_virtio.spec.can import CanFrame

    driver = await open_driver(link)
    try:
        frame = CanFrame.data_frame(0x100, bytes(range(8)))
        for _ in range(200):  # warm-up
            await driver.send(frame)
        left = [frames]
        failed = [0]

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                if await driver.send(frame) != 0:
                    failed[0] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(WINDOW)])
        return frames, failed[0], time.perf_counter() - t0
    finally:
        await close_driver(driver)


async def _echo_rtt(link: str, rounds: int, warmup: int) -> np.ndarray:
    """Send a frame, time until its echo arrives. The echo is taken in the driver's ``on_frame``
    callback, which resolves the round's future: ``asyncio.wait_for(driver.recv())`` added a
    task, a queue and a timer per round (~29 us of the bench's own Python after its wake-up,
    cold, in a ~250 us round trip)."""
    from ivshmem_virtio.spec.can import CanFrame

    driver = await open_driver(link)
    loop = asyncio.get_running_loop()
    try:
        out = np.empty(rounds + warmup, dtype=np.uint64)
        now = time.perf_counter_ns
        for i in range(rounds + warmup):
            frame = CanFrame.data_frame(0x200 + (i & 0xFF) * 2, i.to_bytes(8, "little"))
            want_id = frame.can_id + 1
            echoed: asyncio.Future[None] = loop.create_future()

            def on_frame(r: Any, want_id: int = want_id, frame: CanFrame = frame,  # noqa: ANN401
                         echoed: asyncio.Future[None] = echoed) -> None:
                if r.frame.can_id == want_id and r.frame.data == frame.data \
                        and not echoed.done():
                    echoed.set_result(None)

            driver.on_frame = on_frame
            t0 = now()
            sent = None if driver.send_nowait(frame) else asyncio.ensure_future(
                driver.send(frame))
            timer = loop.call_later(10.0, echoed.cancel)  # no echo: CancelledError ends it
            try:
                await echoed
                out[i] = now() - t0  # (when this task runs again, as after recv())
            finally:
                timer.cancel()
            if sent is not None:
                await sent
        return out[warmup:]
    finally:
        driver.on_frame = None
        await close_driver(driver)


def _bus(link: str, **kw: Any) -> Any:  # noqa: ANN401 - can.BusABC
    import can

    return can.Bus(interface="ivshmem", channel=link, timeout=15.0, **kw)


def _pace(t0_ns: int) -> None:
    """Sleep out the rest of one frame time after ``t0_ns``, as an application sending
    periodic frames does. (A caller spinning instead measured worse on this 2-core VM: having
    used its CPU, it is preempted by the backend it wakes with its kick, inside ``send``.)"""
    left = PACE_US * 1000 - (time.perf_counter_ns() - t0_ns)
    if left > 0:
        time.sleep(left / 1e9)


def _send_latency(link: str, late_tx_ack: bool, n: int, warmup: int) -> np.ndarray:
    """python-can ``bus.send`` times, one frame per PACE_US."""
    import can

    bus = _bus(link, late_tx_ack=late_tx_ack)
    try:
        msg = can.Message(arbitration_id=0x300, data=bytes(range(8)), is_extended_id=False)
        out = np.empty(n + warmup, dtype=np.uint64)
        now = time.perf_counter_ns
        for i in range(n + warmup):
            t0 = now()
            bus.send(msg, 5.0)
            out[i] = now() - t0
            _pace(t0)
        return out[warmup:]
    finally:
        bus.shutdown()


def _hop_latency(links: list[str], n: int, warmup: int) -> np.ndarray:
    """``send`` on link 0 (no LATE_TX_ACK) until ``recv`` on link 1 returns the frame."""
    import can

    tx = _bus(links[0], late_tx_ack=False)
    try:
        rx = _bus(links[1])
        try:
            out = np.empty(n + warmup, dtype=np.uint64)
            now = time.perf_counter_ns
            for i in range(n + warmup):
                msg = can.Message(arbitration_id=0x400 + (i & 0xFF),
                                  data=i.to_bytes(8, "little"), is_extended_id=False)
                t0 = now()
                tx.send(msg, 5.0)
                got = rx.recv(10.0)
                out[i] = now() - t0
                if got is None or got.arbitration_id != msg.arbitration_id \
                        or bytes(got.data) != bytes(msg.data):
                    raise RuntimeError(f"hop {i}: sent {msg}, received {got}")
                _pace(t0)
            return out[warmup:]
        finally:
            rx.shutdown()
    finally:
        tx.shutdown()


def run_can(ctx: Context) -> None:
    """Frames/s one way (link 0 -> bus) and the echo round trip through a second link."""
    why = missing()
    if why is not None:
        ctx.unavailable["can"] = why
        return

    from ivshmem_virtio.spec import can as wire

    frames = ctx.pick(20_000, 200_000)
    rounds = ctx.pick(1_000, 10_000)
    protocols = (f"{wire.IVSHMEM_PROTOCOL_CAN_BACKEND:#06x},"
                 f"{wire.IVSHMEM_PROTOCOL_CAN_FRONTEND:#06x}")
    with ctx.children_scope():
        socks = [str(ctx.workdir / f"can{i}.sock") for i in range(2)]
        for i, sock in enumerate(socks):
            hub = ctx.child(f"can-hub{i}", cli("hub", "--socket", sock, "--protocols", protocols,
                                               "--rw-size", hex(RW_SIZE)))
            hub.wait_for("hub listening")
        backend = ctx.child("can-backend", cli(
            "can", "--link", f"sim:{socks[0]}", "--link", f"sim:{socks[1]}",
            "--bus", f"virtual:ivshmem-bench-{os.getpid()}", "--mode", "adaptive"))
        deadline = time.monotonic() + 20
        while backend.log().count("backend ready") < 2:
            if backend.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"can backend not ready:\n{backend.log()}")
            time.sleep(0.02)
        ctx.progress.update(f"can: {frames} frames one way, {WINDOW} in flight")
        n, failed, elapsed = run_loop(_one_way(f"sim:{socks[0]}", frames),
                                      timeout=60 + frames / 1000)
        ctx.add(Measurement(
            "can.one-way", "can", "CAN classic 8 B frames, frontend -> backend -> bus",
            params={"frames": n, "window": WINDOW, "late_tx_ack": True, "bus": "virtual",
                    "mode": "adaptive", "seconds": round(elapsed, 2)},
            ops_per_s=n / elapsed, extra={"tx_not_ok": failed}))
        sends = ctx.pick(2_000, 10_000)
        warm = max(100, sends // 20)
        for late in (False, True):
            name = "on" if late else "off"
            ctx.progress.update(f"can: {sends} python-can sends, LATE_TX_ACK {name}")
            samples = _send_latency(f"sim:{socks[0]}", late, sends, warm)
            ctx.add(Measurement(
                f"can.send.late-ack-{name}", "can",
                f"python-can bus.send, LATE_TX_ACK {name}"
                + (" (frame on the bus)" if late else " (request on the ring)"),
                params={"sends": sends, "late_tx_ack": late, "pace_us": PACE_US,
                        "backend_mode": "adaptive", "bus": "virtual"},
                latency_us=summarize_ns(samples), samples_ns=samples))
        ctx.progress.update(f"can: {sends} hops link 0 -> link 1")
        samples = _hop_latency([f"sim:{s}" for s in socks], sends, warm)
        ctx.add(Measurement(
            "can.hop", "can", "CAN one hop: python-can send on link 0 -> recv on link 1",
            params={"frames": sends, "pace_us": PACE_US, "backend_mode": "adaptive",
                    "clock": "one process, send start to recv return"},
            latency_us=summarize_ns(samples), samples_ns=samples))
        echo = ctx.child("can-echo", [sys.executable, "-m", "ivshmem_virtio.benchmarks.can",
                                      "--link", f"sim:{socks[1]}"])
        echo.wait_for("echo ready", timeout=20)
        ctx.progress.update(f"can: {rounds} echo round trips")
        samples = run_loop(_echo_rtt(f"sim:{socks[0]}", rounds, max(50, rounds // 20)),
                           timeout=60 + rounds * 0.01)
        ctx.add(Measurement(
            "can.echo", "can", "CAN echo round trip (link 0 -> switch -> link 1 -> back)",
            params={"rounds": rounds, "mode": "adaptive", "processes": 3},
            latency_us=summarize_ns(samples), samples_ns=samples))


async def _echo_main(link: str) -> None:
    from ivshmem_virtio.spec.can import CanFrame

    driver = await open_driver(link)
    pending: set[asyncio.Task] = set()

    def answer(r: Any) -> None:  # noqa: ANN401 - frontend.can.Received
        reply = CanFrame.data_frame(r.frame.can_id + 1, r.frame.data)
        if driver.send_nowait(reply):  # no task, no completion interrupt
            return
        t = asyncio.ensure_future(driver.send(reply))
        pending.add(t)
        t.add_done_callback(pending.discard)

    driver.on_frame = answer
    print("echo ready", flush=True)
    try:
        await asyncio.Event().wait()  # until SIGTERM
    finally:
        await close_driver(driver)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ivshmem_virtio.benchmarks.can",
                                description="CAN echo peer")
    p.add_argument("--link", required=True)
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(_echo_main(args.link))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
