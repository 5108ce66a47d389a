"""The MCP2515 simulator with bus time (``sim_clock``): frames take their bit time.

Everything here runs on simulated time only (``SimClock``), so nothing depends on how fast
the host is: a frame's transmission, arbitration, error frames and mode changes are checked
against the bit counts of :mod:`ivshmem_virtio.hwsim.canbits` at 500 kbit/s.
"""

from __future__ import annotations

import can

from ivshmem_virtio.hwsim import mcp2515_regs as m
from ivshmem_virtio.hwsim.canbits import frame_time_ns
from ivshmem_virtio.hwsim.mcp2515 import Mcp2515, arbitration_key
from ivshmem_virtio.hwsim.simclock import SimClock

from .test_hwsim_mcp2515 import Spi, std

BIT_NS = 2000  # 500 kbit/s


def timed_chip(inte: int = m.INT_RX0) -> tuple[Mcp2515, Spi, SimClock, list[tuple[int, int]]]:
    """A chip at 16 MHz / 500 kbit/s in normal mode; the sink notes (time, id) per frame."""
    clock = SimClock()
    sent: list[tuple[int, int]] = []
    chip = Mcp2515(sim_clock=clock, tx_sink=lambda msg: sent.append((clock.now_ns(),
                                                                     msg.arbitration_id)))
    spi = Spi(chip)
    spi.reset()
    spi.write(m.CNF3, 0x01, 0xB5, 0x00, inte)
    spi.write(0x60, 0x60 | m.RXB0_BUKT)
    spi.write(0x70, 0x60)
    spi.mode(m.MODE_NORMAL)
    clock.advance(100 * BIT_NS)
    assert spi.opmode() == m.MODE_NORMAL
    return chip, spi, clock, sent


def load(spi: Spi, txb: int, arb_id: int, data: bytes, txp: int = 0) -> None:
    sidh, sidl, _, _ = m.pack_id(arb_id, False)
    spi.write(m.TXB_BASE[txb], txp)
    spi.load_txb(0x40 | (2 * txb), sidh, sidl, 0, 0, len(data), *data)


def test_transmission_takes_its_bit_time() -> None:
    chip, spi, clock, sent = timed_chip()
    load(spi, 0, 0x123, b"\x11\x22\x33\x44\x55\x66\x77\x88")
    spi.rts(1)
    t_rts = clock.now_ns()
    dur = frame_time_ns(500_000, 0x123, b"\x11\x22\x33\x44\x55\x66\x77\x88")
    assert spi.read(m.TXB_BASE[0])[0] & m.TXB_TXREQ, "TXREQ is set while the frame is sent"
    assert not spi.status() & 0x08 and sent == []
    chip.wait_int(0.01)  # INT is only RX0: this sleeps simulated time to the deadline
    assert sent == [(t_rts + dur, 0x123)]
    assert not spi.read(m.TXB_BASE[0])[0] & m.TXB_TXREQ
    assert spi.read(m.CANINTF)[0] & m.INT_TX0
    assert chip.violations == []


def test_own_buffers_by_priority_and_other_nodes_by_id() -> None:
    chip, spi, clock, sent = timed_chip(inte=0)
    # a frame from another node is on the bus: the chip's buffers wait for it
    t0 = clock.now_ns()
    chip.schedule([(t0, std(0x050, b"\x00" * 8)), (t0 + 10, std(0x400, b"\x01"))])
    load(spi, 0, 0x100, b"\xaa", txp=0)
    load(spi, 1, 0x700, b"\xbb", txp=3)
    load(spi, 2, 0x200, b"\xcc", txp=3)
    spi.rts(7)
    chip.wait_int(0.01)
    # 0x050 first (already on the bus); then TXP 3 in buffer order TXB2 > TXB1 (the chip's
    # own priority, not the id), each against the other node's 0x400 (lower id wins)
    assert [i for _, i in sent] == [0x200, 0x700, 0x100]
    assert chip.rx_count == 2  # 0x050 and 0x400 were received
    assert chip.arbitration_lost >= 1, "0x700 and 0x400: the other node won once"
    assert chip.bus_busy_ns > 0 and chip.violations == []


def test_arbitration_key_orders_as_the_wire() -> None:
    ext = can.Message(arbitration_id=0x123 << 18, is_extended_id=True)
    assert arbitration_key(std(0x123)) < arbitration_key(ext)
    assert arbitration_key(std(0x123)) < arbitration_key(std(0x123, rtr=True, dlc=0))
    assert arbitration_key(std(0x122, rtr=True, dlc=0)) < arbitration_key(std(0x123))


def test_no_ack_error_passive_takes_bus_time_and_never_bus_off() -> None:
    chip, spi, clock, sent = timed_chip()
    chip.set_no_ack(True)
    load(spi, 0, 0x123, b"\x01")
    spi.rts(1)
    chip.wait_int(0.0005)
    assert 0 < chip.tec < 128, "one attempt per frame time, not all at once"
    chip.wait_int(0.05)
    assert chip.tec == 128 and not chip.bus_off and sent == []
    assert spi.read(m.EFLG)[0] & m.EFLG_TXEP
    assert spi.read(m.TXB_BASE[0])[0] & m.TXB_TXREQ
    chip.set_no_ack(False)
    chip.wait_int(0.001)
    assert [i for _, i in sent] == [0x123]


def test_mode_change_waits_for_the_bus() -> None:
    chip, spi, clock, sent = timed_chip()
    load(spi, 0, 0x123, b"\x00" * 8)
    spi.rts(1)
    t_req = clock.now_ns()
    spi.mode(m.MODE_CONFIG)
    assert spi.opmode() == m.MODE_NORMAL, "the frame on the wire ends first"
    chip.wait_int(0.001)
    assert spi.opmode() == m.MODE_CONFIG
    assert sent and sent[0][0] > t_req
    assert chip.violations == []


def test_wire_mode_drops_what_the_driver_did_not_read_in_time() -> None:
    chip, spi, clock, _ = timed_chip()
    t0 = clock.now_ns()
    chip.schedule([(t0 + k, std(0x300 + k, b"\x00" * 8)) for k in range(3)])
    chip.wait_int(0.01)  # INT falls at the first frame's end
    assert chip.rx_count == 1
    # not read: the next one rolls over into RXB1, the third is lost (RX1OVR)
    chip.spend(2 * frame_time_ns(500_000, 0x300, b"\x00" * 8) + 100 * BIT_NS)
    assert chip.rx_count == 2 and chip.rx_overflows == 1
    assert spi.read(m.EFLG)[0] & m.EFLG_RX1OVR


def test_schedule_relative_counts_from_now_in_one_step() -> None:
    """A schedule built from 0 lands from "now + lead" whatever time passed while it was
    built (an idle driver's waits move bus time on meanwhile): frames one slot apart arrive
    one slot apart, none overflows."""
    chip, spi, clock, _ = timed_chip()
    slot = 2 * frame_time_ns(500_000, 0x300, b"\x00" * 8)
    frames = [(k * slot, std(0x300, b"\x00" * 8)) for k in range(4)]
    clock.advance(50_000_000)  # the bus time a slow host's build of the schedule would cost
    before = clock.now_ns()
    base = chip.schedule_relative({"load": frames}, lead_ns=1_000_000)
    assert base == before + 1_000_000
    got = []
    for _ in range(4):
        assert chip.wait_int(0.01)
        got.append(clock.now_ns())
        assert spi.status() & 0x01  # RX0IF
        spi.write(m.CANINTF, 0x00)
    assert chip.rx_overflows == 0
    assert [b - a for a, b in zip(got, got[1:])] == [slot] * 3
    assert got[0] == base + frame_time_ns(500_000, 0x300, b"\x00" * 8)
