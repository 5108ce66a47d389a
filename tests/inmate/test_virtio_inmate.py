"""The whole CAN cell end to end over the simulated ivshmem link (issue 4 acceptance).

Real processes: the sim hub (``ivshmem-virtio hub``), the Python virtio-can backend
(``ivshmem-virtio can``, bridged to a ``sockbus`` python-can bus that stands for the root cell's
bus and that this test also opens), and the hosted C inmate (``build/virtio/hosted_inmate``: the
portable core on the hosted HALs). The MCP2515 simulator runs in this process on a python-can
``virtual`` channel that stands for the physical wire. A second link of the same backend carries
a Python virtio-can driver: the Linux side that must see a physical bus-off as virtio-can BUSOFF.

Every process is started with a deadline and ended by its pid; sockets live in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import can
import pytest

from ivshmem_virtio.hwsim.mcp2515 import Mcp2515
from ivshmem_virtio.hwsim.spisock import SpiSocketServer
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.procs import Child, cli
from ivshmem_virtio.spec import can as wire
from ivshmem_virtio.spec import ivshmem as H
from ivshmem_virtio.spec.can import CanFrame
from ivshmem_virtio.transport.device import DeviceTransport

# the virtio-can backend, its Python driver and the cross-process test bus
from tests import can_helpers as helpers  # noqa: E402

from .lines import Lines

CAN_PROTOCOLS, RW_SIZE = helpers.CAN_PROTOCOLS, helpers.RW_SIZE
Observer, SockBus, plugin_env = helpers.Observer, helpers.SockBus, helpers.plugin_env
frontend, close_frontend, wait_until = helpers.frontend, helpers.close_frontend, helpers.wait_until

REPO = Path(__file__).resolve().parents[2]
INMATE_DIR = REPO / "rtos_inmate"
# INMATE_SANITIZE=1 runs everything against an AddressSanitizer/UBSan build
SANITIZE = os.environ.get("INMATE_SANITIZE") == "1"
BINARY = INMATE_DIR / "build" / ("virtio-asan" if SANITIZE else "virtio") / "hosted_inmate"
OSC, BITRATE = 16_000_000, 500_000
# one fast-reply rule: a data frame 0x100 starting with 0x11 is answered with 0x101 [0x22, byte0]
RULE = "100:11->101:22$0"


@pytest.fixture(scope="module")
def inmate_binary() -> Path:
    args = ["make", "-C", str(INMATE_DIR), "-f", "virtio.mk", "virtio-hosted"]
    if SANITIZE:
        args.append("SANITIZE=1")
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return BINARY


# --- the pieces --------------------------------------------------------------------------------
class Inmate:
    """The hosted inmate: stdout lines in a queue, stopped by its pid."""

    def __init__(self, binary: Path, args: list[str], log: Path) -> None:
        self._err = open(log, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen([str(binary), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, text=True,
                                     bufsize=1)
        self.log = log
        assert self.proc.stdout is not None
        self.out = Lines(self.proc.stdout, lambda: f"stderr tail:\n{self.stderr()}")

    @property
    def history(self) -> list[str]:
        return self.out.history

    def expect(self, prefix: str, timeout: float = 10.0) -> str:
        """The next stdout line starting with ``prefix`` (others go to the history)."""
        return self.out.expect(prefix, timeout)

    def event(self, name: str, timeout: float = 10.0) -> str:
        return self.expect(f"EV {name}", timeout)

    def stderr(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])

    def stats(self) -> dict[str, str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return dict(kv.split("=", 1) for kv in self.expect("STATS").split()[1:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._err.close()
        return self.proc.returncode


class Wire:
    """The physical CAN bus: the simulated MCP2515 plus this test's node on a virtual channel."""

    def __init__(self, spi_sock: Path) -> None:
        channel = f"phys-{uuid.uuid4().hex}"
        self.chip = Mcp2515(osc_hz=OSC, rx_mode="backpressure")
        self._chip_bus = can.Bus(interface="virtual", channel=channel)
        self.chip.attach_bus(self._chip_bus)
        self.node = can.Bus(interface="virtual", channel=channel)
        self.server = SpiSocketServer(self.chip, spi_sock)
        self.server.start()
        self._observer = Observer(self.node)  # drains the node on a thread

    def send(self, can_id: int, data: bytes, *, extended: bool = False) -> None:
        self.node.send(can.Message(arbitration_id=can_id, data=data, is_extended_id=extended))

    def wait_count(self, n: int, timeout: float = 10.0) -> list[can.Message]:
        return self._observer.wait_messages(n, timeout)

    def close(self) -> None:
        self._observer.close()  # shuts the node down too
        self.server.stop()
        self.chip.close()
        self._chip_bus.shutdown()


@dataclass
class Cell:
    work: Path
    wire: Wire
    root: helpers.Observer
    inmate: Inmate
    hubs: list[Child]
    backend: Child | None
    links: list[str]
    backends: list[Child]

    def start_backend(self, name: str = "can-backend") -> Child:
        link_args = [a for link in self.links for a in ("--link", link)]
        child = Child(name, cli("can", *link_args, "--bus", f"sockbus:{self.work / 'bus'}"),
                      self.work, env=plugin_env(self.work))
        deadline = time.monotonic() + 20
        while child.log().count("backend ready") < len(self.links):
            if child.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"backend not ready:\n{child.log()}")
            time.sleep(0.02)
        self.backend = child
        self.backends.append(child)
        return child


def start_hub(work: Path, name: str) -> Child:
    sock = work / f"{name}.sock"
    hub = Child(name, cli("hub", "--socket", str(sock), "--protocols", CAN_PROTOCOLS,
                          "--rw-size", hex(RW_SIZE)), work)
    hub.wait_for("hub listening")
    return hub


@contextlib.contextmanager
def cell(work: Path, binary: Path, *, nlinks: int = 1, backend: bool = True,
         extra: tuple[str, ...] = ()) -> Iterator[Cell]:
    """Hubs, the backend (optional), the wire with its chip, the root bus and the inmate."""
    (work / "bus").mkdir(exist_ok=True)
    hubs: list[Child] = []
    wire_: Wire | None = None
    root: helpers.Observer | None = None
    inmate: Inmate | None = None
    c: Cell | None = None
    try:
        for i in range(nlinks):
            hubs.append(start_hub(work, f"l{i}"))
        links = [f"sim:{work / f'l{i}.sock'}" for i in range(nlinks)]
        root = Observer(SockBus(str(work / "bus"), faults=False))
        wire_ = Wire(work / "spi.sock")
        c = Cell(work, wire_, root, None, hubs, None, links, [])  # type: ignore[arg-type]
        if backend:
            c.start_backend()
        inmate = Inmate(binary, ["--spi", str(work / "spi.sock"), "--link",
                                 str(work / "l0.sock"), "--osc", str(OSC), "--bitrate",
                                 str(BITRATE), "--rule", RULE, "--max-ms", "120000", *extra],
                        work / "inmate.log")
        c.inmate = inmate
        inmate.expect("READY")
        yield c
    finally:
        if inmate is not None:
            assert inmate.stop() == 0, inmate.stderr()
        for b in reversed(c.backends if c is not None else []):
            b.stop(10)
        for h in reversed(hubs):
            h.stop(10)
        if root is not None:
            root.close()
        if wire_ is not None:
            wire_.close()


def root_ids(root: helpers.Observer) -> list[int]:
    return [f.can_id for f in root.frames()]


# --- acceptance ---------------------------------------------------------------------------------
def test_reply_relay_and_root_to_wire(tmp_path: Path, inmate_binary: Path) -> None:
    with cell(tmp_path, inmate_binary) as c:
        c.inmate.event("LINK_UP")
        c.inmate.event("STARTED")
        # a request matching the rule is answered on the wire by the inmate alone
        c.wire.send(0x100, b"\x11")
        seen = c.wire.wait_count(1)
        assert (seen[0].arbitration_id, bytes(seen[0].data)) == (0x101, b"\x22\x11")
        # a frame no rule matches reaches the root cell's bus through the backend
        c.wire.send(0x200, b"\x01\x02\x03")
        frames = c.root.wait_count(1)
        assert frames == [CanFrame.data_frame(0x200, b"\x01\x02\x03")]
        # a frame sent on the root bus goes out on the wire through the inmate and the chip
        c.root.send(CanFrame.data_frame(0x300, b"\x09\x08"))
        c.root.send(CanFrame.data_frame(0x1ABCDE, b"\x07", extended=True))
        seen = c.wire.wait_count(3)
        assert [(m.arbitration_id, m.is_extended_id, bytes(m.data)) for m in seen[1:]] == [
            (0x300, False, b"\x09\x08"), (0x1ABCDE, True, b"\x07")]
        time.sleep(0.2)
        assert 0x100 not in root_ids(c.root), "the rule's request must not be relayed"
        stats = c.inmate.stats()
        assert stats["replied"] == "1" and stats["relay"] == "1" and stats["rx"] == "2", stats


def test_ten_thousand_mixed_frames_in_order(tmp_path: Path, inmate_binary: Path) -> None:
    """Wire -> root relays, root -> wire frames and fast replies, interleaved, windowed."""
    total, up_n, down_n, rule_n = 10_000, 20, 20, 4
    up_sent: list[bytes] = []
    down_sent: list[bytes] = []
    rules_sent = 0
    with cell(tmp_path, inmate_binary) as c:
        c.inmate.event("STARTED")
        t0 = time.monotonic()
        seq = 0
        while seq < total:
            for i in range(max(up_n, down_n, rule_n)):
                if i < up_n and seq < total:
                    data = seq.to_bytes(4, "little")
                    c.wire.send(0x200 + seq % 0x80, data)
                    up_sent.append(data)
                    seq += 1
                if i < down_n and seq < total:
                    data = seq.to_bytes(4, "little")
                    c.root.send(CanFrame.data_frame(0x600 + seq % 0x80, data))
                    down_sent.append(data)
                    seq += 1
                if i < rule_n and seq < total:
                    c.wire.send(0x100, b"\x11" + seq.to_bytes(4, "little"))
                    rules_sent += 1
                    seq += 1
            try:
                c.root.wait_count(len(up_sent), timeout=20)
                c.wire.wait_count(len(down_sent) + rules_sent, timeout=20)
            except AssertionError as e:
                raise AssertionError(f"{e}; inmate {c.inmate.stats()}; chip tx "
                                     f"{c.wire.chip.tx_count} rx {c.wire.chip.rx_count}; "
                                     f"backend log:\n{c.backend.log()[-3000:]}") from None
        elapsed = time.monotonic() - t0
        up_got = [f.data for f in c.root.frames()]
        assert up_got == up_sent  # none lost, none reordered, nothing else relayed
        assert [f.can_id for f in c.root.frames()] == [0x200 + int.from_bytes(d, "little")
                                                       % 0x80 for d in up_sent]
        seen = c.wire.wait_count(len(down_sent) + rules_sent)
        down_got = [bytes(m.data) for m in seen if m.arbitration_id != 0x101]
        replies = [m for m in seen if m.arbitration_id == 0x101]
        assert down_got == down_sent
        assert len(replies) == rules_sent
        assert all(bytes(m.data) == b"\x22\x11" for m in replies)
        stats = c.inmate.stats()
        assert stats["relay_dropped"] == "0" and stats["relay_fails"] == "0", stats
        assert int(stats["relay"]) == len(up_sent) and int(stats["rx"]) == len(down_sent)
        assert stats["overflows"] == "0", stats
        # the fast path keeps its SPI budget while the link is busy (issue 4: <= 30 bytes)
        assert 0 < int(stats["fast_max"]) <= 30, stats
        print(f"10000 mixed frames in {elapsed:.1f} s ({total / elapsed:.0f} frames/s)", stats)


# --- a hostile backend, a lost backend ------------------------------------------------------
class RawBackend:
    """A device side written by hand: the real transport for the header, faults on demand."""

    def __init__(self, sock: Path, *, header: bool = True) -> None:
        self.dev = SimIvshmem(str(sock), 0)
        self.t = DeviceTransport(self.dev, device_features=wire.F_CAN_CLASSIC | wire.F_RTR_FRAMES,
                                 config=wire.CONFIG.pack(0), num_queues=wire.NUM_QUEUES,
                                 queue_max_size=64)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if header:
            self.t.start()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.lock:
                self.t.step()
                self.dev.ack_interrupts()
            time.sleep(0.0002)

    def wait_live(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if self.t.serving and all(vq is not None for vq in self.t.vqs):
                    return
            assert time.monotonic() < deadline, "the inmate did not bring the device up"
            time.sleep(0.005)

    def wait_avail(self, q: int, n: int, timeout: float = 5.0) -> None:
        """Until the driver has made ``n`` chains available on queue ``q``."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                if self.dev.rw.u16(self.t.queues[q].driver + 2) >= n:
                    return
            assert time.monotonic() < deadline, f"queue {q}: fewer than {n} chains available"
            time.sleep(0.002)

    def bad_used(self, q: int, *, delta: int = 1, elem: tuple[int, int] | None = None) -> None:
        """Publish a used entry (id, len) the driver never made available, or just bump idx."""
        with self.lock:
            rw, used = self.dev.rw, self.t.queues[q].device
            idx = rw.u16(used + 2)
            if elem is not None:
                slot = used + 4 + 8 * (idx % self.t.queues[q].size)
                rw.set_u32(slot, elem[0])
                rw.set_u32(slot + 4, elem[1])
            rw.set_u16(used + 2, (idx + delta) & 0xFFFF)
            self.t.notify_queue(q)

    def stop_serving(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        self.stop_serving()
        self.dev.close()


def test_survives_a_hostile_backend_then_attaches_to_a_real_one(
        tmp_path: Path, inmate_binary: Path) -> None:
    with cell(tmp_path, inmate_binary, backend=False) as c:
        raw = RawBackend(tmp_path / "l0.sock")
        try:
            faults = [
                (lambda: raw.bad_used(wire.TXQ), "queue 0: used idx ahead"),
                (lambda: raw.bad_used(wire.RXQ, elem=(1000, 24)),
                 "queue 1: used id out of range"),
                (lambda: raw.bad_used(wire.RXQ, elem=(0, 4096)), "queue 1: used len larger"),
                # START is in flight on the control queue as descriptors 0 (head) and 1
                (lambda: (raw.wait_avail(wire.CONTROLQ, 1),
                          raw.bad_used(wire.CONTROLQ, elem=(1, 1))),
                 "queue 2: used id not in flight"),
                (lambda: raw.bad_used(wire.RXQ, delta=1000), "queue 1: used idx ahead"),
            ]
            for inject, reason in faults:
                raw.wait_live()
                c.inmate.event("LINK_UP")
                inject()
                assert reason in c.inmate.event("LINK_RESET"), reason
            raw.wait_live()
            c.inmate.event("LINK_UP")
            with raw.lock:
                raw.t.mark_needs_reset("test: device broken")
            assert "device needs reset" in c.inmate.event("LINK_RESET")
            raw.wait_live()
            c.inmate.event("LINK_UP")
            # fast replies never depended on the link
            c.wire.send(0x100, b"\x11")
            assert bytes(c.wire.wait_count(1)[0].data) == b"\x22\x11"
            # the backend's state drops to 0 behind its header's back
            raw.stop_serving()
            raw.dev.set_state(H.STATE_RESET)
            assert "backend left READY" in c.inmate.event("LINK_DOWN")
        finally:
            raw.close()
        # a backend with an impossible header is refused at probe, without harm
        junk = RawBackend(tmp_path / "l0.sock", header=False)
        try:
            junk.dev.rw.set_u32(H.HDR_SIZE, 1 << 30)
            junk.dev.rw.set_u32(H.HDR_REVISION, 1)
            junk.dev.set_state(H.STATE_READY)
            assert "impossible backend header" in c.inmate.event("LINK_DOWN")
        finally:
            junk.close()
        # the real backend: the inmate attaches and everything flows again
        c.start_backend()
        c.inmate.event("LINK_UP")
        c.inmate.event("STARTED")
        c.wire.send(0x200, b"\x05")
        assert c.root.wait_count(1) == [CanFrame.data_frame(0x200, b"\x05")]
        c.root.send(CanFrame.data_frame(0x300, b"\x06"))
        assert bytes(c.wire.wait_count(2)[1].data) == b"\x06"
        stats = c.inmate.stats()
        assert int(stats["ring_faults"]) == 5 and int(stats["resets"]) == 6, stats
        assert stats["link"] == "live"


def test_reattaches_when_the_backend_restarts(tmp_path: Path, inmate_binary: Path) -> None:
    with cell(tmp_path, inmate_binary) as c:
        c.inmate.event("STARTED")
        assert c.backend is not None
        c.backend.kill()  # SIGKILL by pid: the hub sets its state to 0
        assert "backend left READY" in c.inmate.event("LINK_DOWN")
        # without the root cell the inmate still answers the rule ...
        c.wire.send(0x100, b"\x11")
        assert bytes(c.wire.wait_count(1)[0].data) == b"\x22\x11"
        # ... and drops (counts) what it cannot relay, rather than queueing stale frames
        c.wire.send(0x201, b"\x01")
        time.sleep(0.1)
        c.start_backend("can-backend-2")
        c.inmate.event("LINK_UP")
        c.inmate.event("STARTED")
        c.wire.send(0x202, b"\x02")
        assert c.root.wait_count(1) == [CanFrame.data_frame(0x202, b"\x02")]
        c.root.send(CanFrame.data_frame(0x302, b"\x03"))
        assert bytes(c.wire.wait_count(2)[1].data) == b"\x03"
        stats = c.inmate.stats()
        assert stats["relay_dropped"] == "1" and stats["attaches"] == "2", stats


# --- bus-off ------------------------------------------------------------------------------------
def test_mcp2515_bus_off_reaches_linux_as_virtio_can_busoff(
        tmp_path: Path, inmate_binary: Path) -> None:
    """The inmate reports the physical bus-off to the backend (README-virtio.md): a Linux
    virtio-can driver on another link of the same backend sees BUSOFF, restarts, and frames
    flow again once the inmate's MCP2515 is back on the bus."""
    with cell(tmp_path, inmate_binary, nlinks=2, extra=("--restart-ms", "300")) as c:
        up = c.inmate.event("LINK_UP")
        c.inmate.event("STARTED")

        async def main() -> None:
            loop = asyncio.get_running_loop()

            def inmate(name: str) -> asyncio.Future[str]:
                return loop.run_in_executor(None, c.inmate.event, name, 10.0)

            linux = await frontend(c.links[1], fd=False)
            try:
                assert not linux.bus_off
                # a shorted wire: the next frame the chip sends fails until TEC passes 255
                c.wire.chip.set_bus_fault(True)
                assert await linux.send(CanFrame.data_frame(0x3FF, b"\xEE")) == 0
                await inmate("CAN_BUSOFF")
                c.wire.chip.set_bus_fault(False)
                assert "busoff_ext=1" in up, "the backend must offer VCAN_F_IVV_BUSOFF_REPORT"
                await inmate("BUSOFF_REPORTED")
                await wait_until(lambda: linux.bus_off, 5)
                assert linux.metrics.bus_off_events >= 1
                # the inmate restarts its controller and clears the BUSOFF of its own link
                await inmate("CAN_RESTARTED")
                await inmate("STARTED")
                # Linux restarts its controller (`ip link set can0 up` / restart-ms)
                assert await linux.start_controller() == wire.VIRTIO_CAN_RESULT_OK
                assert not linux.bus_off
                c.wire.send(0x210, b"\x10")
                got = await asyncio.wait_for(linux.recv(), 10)
                assert got.frame == CanFrame.data_frame(0x210, b"\x10")
                assert await linux.send(CanFrame.data_frame(0x310, b"\x11")) == 0
                seen = await loop.run_in_executor(None, c.wire.wait_count, 1)
                assert (seen[0].arbitration_id, bytes(seen[0].data)) == (0x310, b"\x11")
            finally:
                await close_frontend(linux)

        asyncio.run(asyncio.wait_for(main(), 40))
        stats = c.inmate.stats()
        assert stats["busoff"] == "1" and stats["can_restarts"] == "1", stats


# --- error state (project extension, bit 22) ---------------------------------------------------
def _next_error_frame(bus: can.BusABC, crtl_bit: int, timeout: float = 10.0) -> can.Message:
    """The next error frame whose CAN_ERR_CRTL byte has ``crtl_bit`` (data frames skipped)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = bus.recv(left)
        if msg is not None and msg.is_error_frame and msg.data[1] & crtl_bit:
            return msg
    raise AssertionError(f"no error frame with CAN_ERR_CRTL bit {crtl_bit:#x}")


def test_error_passive_and_rx_overflow_reach_a_python_can_bus_on_linux(
        tmp_path: Path, inmate_binary: Path) -> None:
    """mcp251x's controller-error frames over virtio-can (docs/protocol.md, bit 22).

    The simulated chip goes error-passive (REC past 127) and overflows its receive buffers (the
    wire mode: frames the inmate did not read in time are lost); the inmate reports each to the
    backend, and a python-can bus on another link of the backend, standing for Linux, gets error
    frames (CAN_ERR_CRTL: RX_PASSIVE with the counters, RX_OVERFLOW) and ``bus.state`` PASSIVE.
    Fails if the inmate does not report error-passive or the overflow.
    """
    from ivshmem_virtio.frontend.can_bus import IvshmemCanBus

    with cell(tmp_path, inmate_binary, nlinks=2) as c:
        up = c.inmate.event("LINK_UP")
        assert "err_ext=1" in up, "the backend must offer the error-state extension (bit 22)"
        c.inmate.event("STARTED")
        chip = c.wire.chip
        chip.rx_mode = "wire"  # a frame the driver does not read in time is lost
        bus = IvshmemCanBus(c.links[1], fd=False, timeout=10.0)
        try:
            assert bus.state == can.BusState.ACTIVE
            chip.add_rx_errors(130)  # REC 130: EFLG RXEP, error-passive
            msg = _next_error_frame(bus, wire.CAN_ERR_CRTL_RX_PASSIVE)
            assert msg.arbitration_id & wire.CAN_ERR_CRTL
            assert msg.arbitration_id & wire.CAN_ERR_CNT and msg.data[7] == 130  # REC
            wait_until_sync(lambda: bus.state == can.BusState.PASSIVE, 5)
            # three frames while the inmate cannot read: two buffers, the third is lost
            with chip._lock:
                for i in range(3):
                    chip.receive(can.Message(arbitration_id=0x240 + i, data=bytes([i]),
                                             is_extended_id=False))
            _next_error_frame(bus, wire.CAN_ERR_CRTL_RX_OVERFLOW)
            assert bus.state == can.BusState.PASSIVE
        finally:
            bus.shutdown()
        stats = c.inmate.stats()
        assert int(stats["err_reports"]) >= 2 and int(stats["overflows"]) >= 1, stats
        assert stats["err_report_fails"] == "0", stats


def wait_until_sync(predicate: object, timeout: float) -> None:
    """Poll ``predicate`` (a callable) until true or fail after ``timeout`` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)
