"""Unit tests of the MCP2515 simulator at the SPI-instruction level."""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid

import can
import pytest

from ivshmem_virtio.hwsim import mcp2515 as m
from ivshmem_virtio.hwsim.mcp2515 import Mcp2515, pack_id, unpack_id
from ivshmem_virtio.hwsim.spisock import SPIP_MAGIC, SPIP_VERSION, SpiSocketServer


class Spi:
    """The instructions a driver would send, one CS window each."""

    def __init__(self, chip: Mcp2515) -> None:
        self.chip = chip

    def reset(self) -> None:
        self.chip.transfer(bytes([m.INSTR_RESET]))

    def read(self, addr: int, n: int = 1) -> bytes:
        return self.chip.transfer(bytes([m.INSTR_READ, addr]) + bytes(n))[2:]

    def write(self, addr: int, *vals: int) -> None:
        self.chip.transfer(bytes([m.INSTR_WRITE, addr, *vals]))

    def modify(self, addr: int, mask: int, val: int) -> None:
        self.chip.transfer(bytes([m.INSTR_BIT_MODIFY, addr, mask, val]))

    def status(self) -> int:
        return self.chip.transfer(bytes([m.INSTR_READ_STATUS, 0]))[1]

    def rx_status(self) -> int:
        return self.chip.transfer(bytes([m.INSTR_RX_STATUS, 0]))[1]

    def read_rxb(self, op: int, n: int = 13) -> bytes:
        return self.chip.transfer(bytes([op]) + bytes(n))[1:]

    def load_txb(self, op: int, *vals: int) -> None:
        self.chip.transfer(bytes([op, *vals]))

    def rts(self, mask: int = 1) -> None:
        self.chip.transfer(bytes([m.INSTR_RTS_BASE | mask]))

    def mode(self, mode: int) -> None:
        self.modify(m.CANCTRL, 0xE0, mode)

    def opmode(self) -> int:
        return self.read(m.CANSTAT)[0] & 0xE0


def setup_chip(
    mode: int = m.MODE_NORMAL, rx_mode: str = "wire", inte: int = m.INT_RX0
) -> tuple[Mcp2515, Spi, list[can.Message]]:
    sent: list[can.Message] = []
    chip = Mcp2515(rx_mode=rx_mode, tx_sink=sent.append)
    spi = Spi(chip)
    spi.reset()
    # 16 MHz, 500 kbit/s; accept everything via RXM = 11; RXB0 rollover
    spi.write(m.CNF3, 0x01, 0xB5, 0x00, inte)
    spi.write(0x60, 0x60 | m.RXB0_BUKT)
    spi.write(0x70, 0x60)
    spi.mode(mode)
    assert spi.opmode() == mode
    return chip, spi, sent


def std(arb_id: int, data: bytes = b"", rtr: bool = False, dlc: int | None = None) -> can.Message:
    return can.Message(
        arbitration_id=arb_id,
        is_extended_id=False,
        is_remote_frame=rtr,
        dlc=len(data) if dlc is None else dlc,
        data=None if rtr else data,
    )


def ext(arb_id: int, data: bytes = b"", rtr: bool = False) -> can.Message:
    return can.Message(
        arbitration_id=arb_id, is_extended_id=True, is_remote_frame=rtr, dlc=len(data), data=data
    )


# ---------------------------------------------------------------- basics


def test_reset_state_and_probe() -> None:
    chip = Mcp2515()
    spi = Spi(chip)
    spi.write(m.CNF3, 0x05)  # config mode after power-up: accepted
    spi.reset()
    assert spi.read(m.CANSTAT)[0] & 0xE0 == m.MODE_CONFIG
    ctrl = spi.read(m.CANCTRL)[0]
    assert ctrl == 0x87 and ctrl & 0x17 == 0x07  # the Linux probe
    assert spi.read(m.CNF3, 3) == b"\x00\x00\x00"
    assert not chip.int_asserted


def test_canstat_canctrl_mirrors() -> None:
    chip, spi, _ = setup_chip(m.MODE_CONFIG)
    for base in range(0, 0x80, 0x10):
        assert spi.read(base + 0x0E)[0] & 0xE0 == m.MODE_CONFIG
        assert spi.read(base + 0x0F)[0] == spi.read(m.CANCTRL)[0]
    spi.write(0x3F, 0x40)  # CANCTRL through its mirror in the TXB0 block
    assert spi.opmode() == m.MODE_LOOPBACK


def test_read_write_autoincrement() -> None:
    chip, spi, _ = setup_chip(m.MODE_CONFIG)
    spi.write(0x00, *range(1, 13))  # RXF0..RXF2
    assert spi.read(0x00, 12) == bytes(range(1, 13))
    assert chip.violations == []


def test_config_only_registers_protected() -> None:
    chip, spi, _ = setup_chip(m.MODE_NORMAL)
    before = spi.read(m.CNF3, 3)
    spi.write(m.CNF3, 0x07, 0xFF, 0x3F)
    spi.write(0x20, 0xFF)  # RXM0SIDH
    assert spi.read(m.CNF3, 3) == before
    assert spi.read(0x20)[0] == 0
    assert len(chip.violations) == 4  # 3 CNF bytes + 1 mask byte
    spi.mode(m.MODE_CONFIG)
    spi.write(m.CNF1, 0x41)
    assert spi.read(m.CNF1)[0] == 0x41


def test_bit_modify_and_forced_mask() -> None:
    chip, spi, _ = setup_chip(m.MODE_CONFIG)
    spi.write(m.CANINTE, 0xF0)
    spi.modify(m.CANINTE, 0x30, 0x0F)  # bit-modifiable: only bits 4,5 change
    assert spi.read(m.CANINTE)[0] == 0xC0
    spi.write(0x01, 0xF0)  # RXF0SIDL is not bit-modifiable: mask forced to 0xFF
    spi.modify(0x01, 0x01, 0x5A)
    assert spi.read(0x01)[0] == 0x5A


def test_bitrate_decoding() -> None:
    chip, _, _ = setup_chip()
    t = chip.bit_timing()
    assert t is not None
    assert (t["brp"], t["ntq"], t["bitrate"], t["sample_point_permille"]) == (0, 16, 500_000, 875)


def test_mode_change_delay() -> None:
    chip = Mcp2515(mode_change_reads=3)
    spi = Spi(chip)
    spi.reset()
    spi.mode(m.MODE_NORMAL)
    assert [spi.opmode() for _ in range(3)] == [m.MODE_CONFIG, m.MODE_CONFIG, m.MODE_NORMAL]


# ---------------------------------------------------------------- TX


def test_tx_std_ext_rtr_via_load_and_rts() -> None:
    chip, spi, sent = setup_chip()
    spi.load_txb(0x40, *pack_id(0x123, False), 3, 0xDE, 0xAD, 0xBE)
    spi.rts()
    spi.load_txb(0x40, *pack_id(0x18DAF110, True), 0x40 | 4)  # extended RTR, DLC 4
    spi.rts()
    spi.load_txb(0x40, *pack_id(0x7FF, False), 8, *range(8))
    spi.rts()
    assert [(f.arbitration_id, f.is_extended_id, f.is_remote_frame, f.dlc) for f in sent] == [
        (0x123, False, False, 3),
        (0x18DAF110, True, True, 4),
        (0x7FF, False, False, 8),
    ]
    assert bytes(sent[0].data) == b"\xde\xad\xbe"
    assert bytes(sent[2].data) == bytes(range(8))
    st = spi.status()
    assert st & 0x04 == 0 and st & 0x08  # TXB0 TXREQ clear, TX0IF set
    # load only the data (header unchanged) with 0x41
    spi.load_txb(0x41, 9, 9, 9, 9, 9, 9, 9, 9)
    spi.rts()
    assert sent[-1].arbitration_id == 0x7FF and bytes(sent[-1].data) == bytes([9] * 8)


def test_tx_priority_order() -> None:
    chip, spi, sent = setup_chip(m.MODE_CONFIG)
    for buf, arb in ((0, 0x100), (1, 0x200), (2, 0x300)):
        spi.load_txb(0x40 + 2 * buf, *pack_id(arb, False), 0)
    spi.write(0x40, 0x03)  # TXB1 priority 3
    spi.rts(0x07)  # pending while in config mode
    assert sent == []
    assert spi.status() & 0x54 == 0x54
    spi.mode(m.MODE_NORMAL)
    # TXB1 (TXP 3) first; then equal priority: higher buffer number first
    assert [f.arbitration_id for f in sent] == [0x200, 0x300, 0x100]


def test_write_to_txb_while_txreq_is_ignored() -> None:
    chip, spi, sent = setup_chip(m.MODE_CONFIG)
    spi.load_txb(0x40, *pack_id(0x100, False), 1, 0x11)
    spi.rts()
    spi.load_txb(0x41, 0x22)
    assert spi.read(0x36)[0] == 0x11
    assert any("TXREQ" in v for v in chip.violations)


def test_abat_aborts_pending() -> None:
    chip, spi, sent = setup_chip(m.MODE_CONFIG)
    spi.load_txb(0x40, *pack_id(0x100, False), 0)
    spi.rts()
    spi.modify(m.CANCTRL, 0x10, 0x10)
    ctrl = spi.read(0x30)[0]
    assert ctrl & m.TXB_TXREQ == 0 and ctrl & m.TXB_ABTF
    spi.modify(m.CANCTRL, 0x10, 0x00)
    spi.mode(m.MODE_NORMAL)
    assert sent == []


def test_listen_only_does_not_transmit() -> None:
    chip, spi, sent = setup_chip(m.MODE_LISTEN)
    spi.load_txb(0x40, *pack_id(0x100, False), 0)
    spi.rts()
    assert sent == [] and spi.status() & 0x04


def test_loopback_receives_own_frame() -> None:
    chip, spi, sent = setup_chip(m.MODE_LOOPBACK)
    spi.load_txb(0x40, *pack_id(0x321, False), 2, 0xAB, 0xCD)
    spi.rts()
    assert sent == []
    assert chip.int_asserted
    b = spi.read_rxb(0x90)
    assert unpack_id(*b[:4]) == (0x321, False) and b[4] == 2 and b[5:7] == b"\xab\xcd"


# ---------------------------------------------------------------- RX


def test_rx_std_ext_rtr_and_int_pin() -> None:
    chip, spi, _ = setup_chip()
    assert not chip.int_asserted
    chip.receive(std(0x7DF, b"\x02\x01\x0d"))
    assert chip.int_asserted
    assert spi.rx_status() == 0x40  # RXB0, standard data frame, RXF0
    b = spi.read_rxb(0x90)
    assert unpack_id(*b[:4]) == (0x7DF, False) and b[4] == 3 and b[5:8] == b"\x02\x01\x0d"
    assert not chip.int_asserted  # READ RX BUFFER cleared RX0IF
    chip.receive(ext(0x18DB33F1, rtr=True))
    b = spi.read_rxb(0x90)
    assert unpack_id(*b[:4]) == (0x18DB33F1, True) and b[4] & m.DLC_RTR
    chip.receive(std(0x123, rtr=True, dlc=4))
    assert spi.rx_status() == 0x48  # standard remote
    b = spi.read_rxb(0x90)
    assert b[1] & m.SIDL_SRR and b[4] == 4
    assert spi.read(0x60)[0] & m.RXB_RXRTR


def test_read_rx_buffer_variants() -> None:
    chip, spi, _ = setup_chip()
    chip.receive(std(0x100, b"\x01\x02"))
    chip.receive(std(0x101, b"\x03\x04"))  # rolls over into RXB1
    assert spi.read_rxb(0x92, 2) == b"\x01\x02"  # RXB0 D0
    assert spi.read_rxb(0x96, 2) == b"\x03\x04"  # RXB1 D0
    assert spi.status() & 0x03 == 0


def test_rollover_and_overflow() -> None:
    chip, spi, _ = setup_chip()
    chip.receive(std(0x1, b"\x01"))
    chip.receive(std(0x2, b"\x02"))
    assert spi.status() & 0x03 == 0x03
    assert spi.rx_status() & 0xC0 == 0xC0
    chip.receive(std(0x3, b"\x03"))  # both full: lost
    assert spi.read(m.EFLG)[0] & m.EFLG_RX1OVR
    assert spi.read(m.CANINTF)[0] & m.INT_ERR
    assert chip.rx_overflows == 1
    assert unpack_id(*spi.read_rxb(0x94)[:4])[0] == 0x2
    # without rollover a full RXB0 overflows into RX0OVR
    spi.mode(m.MODE_CONFIG)
    spi.write(0x60, 0x60)
    spi.mode(m.MODE_NORMAL)
    chip.receive(std(0x4))
    assert spi.read(m.EFLG)[0] & m.EFLG_RX0OVR
    # software clears OVR; writing 1 does not set it
    spi.modify(m.EFLG, 0xC0, 0x00)
    assert spi.read(m.EFLG)[0] & 0xC0 == 0
    spi.modify(m.EFLG, 0xC0, 0xC0)
    assert spi.read(m.EFLG)[0] & 0xC0 == 0


def test_backpressure_keeps_frames_and_order() -> None:
    chip, spi, _ = setup_chip(rx_mode="backpressure")
    for i in range(5):
        chip.receive(std(0x100 + i, bytes([i])))
    got = []
    for _ in range(5):
        assert spi.status() & 0x03 == 0x01  # only ever RXB0
        got.append(unpack_id(*spi.read_rxb(0x90)[:4])[0])
    assert got == [0x100, 0x101, 0x102, 0x103, 0x104]
    assert chip.rx_overflows == 0


def test_frames_ignored_outside_receiving_modes() -> None:
    chip, spi, _ = setup_chip(m.MODE_CONFIG)
    chip.receive(std(0x100))
    assert spi.status() & 0x03 == 0 and chip.rx_dropped_mode == 1
    fd = can.Message(arbitration_id=1, is_fd=True, data=bytes(12), is_extended_id=False)
    spi.mode(m.MODE_NORMAL)
    chip.receive(fd)
    assert chip.rx_ignored == 1


def test_filters_and_masks() -> None:
    chip, spi, _ = setup_chip(m.MODE_CONFIG)
    # RXB0: mask 0x7F0, RXF0 = 0x120 standard, RXF1 = extended 0x18DAF1xx (mask low byte 0)
    spi.write(0x20, *pack_id(0x7F0, False))  # RXM0 (EID bytes 0: data not compared)
    spi.write(0x00, *pack_id(0x120, False))  # RXF0
    spi.write(0x04, *pack_id(0x18DAF100, True))  # RXF1
    # RXB1: mask exact std id + data byte 0; RXF2 = 0x300 with data[0] = 0xAA
    spi.write(0x24, 0xFF, 0xE0, 0xFF, 0x00)
    spi.write(0x08, 0x60, 0x00, 0xAA, 0x00)
    spi.write(0x10, 0, m.SIDL_IDE, 0, 0)  # RXF3..5: extended, never match with mask
    spi.write(0x14, 0, m.SIDL_IDE, 0, 0)
    spi.write(0x18, 0, m.SIDL_IDE, 0, 0)
    spi.write(0x60, 0x00)  # RXM = 00: use filters, no rollover
    spi.write(0x70, 0x00)
    spi.mode(m.MODE_NORMAL)

    chip.receive(std(0x12F))  # matches RXF0 under mask 0x7F0
    assert spi.status() & 0x03 == 0x01 and spi.read(0x60)[0] & 0x01 == 0
    spi.read_rxb(0x90)
    chip.receive(std(0x130))  # no
    assert spi.status() & 0x03 == 0
    chip.receive(ext(0x18DAF1FF))  # RXF1 (mask EID0 bits are 0, ext mask SID 0x7F0)
    assert spi.status() & 0x03 == 0x01 and spi.read(0x60)[0] & 0x01 == 1
    assert spi.rx_status() & 0x07 == 1
    spi.read_rxb(0x90)
    chip.receive(std(0x300, b"\xaa\x01"))  # RXF2 via data byte 0
    assert spi.status() & 0x03 == 0x02 and spi.read(0x70)[0] & 0x07 == 2
    spi.read_rxb(0x94)
    chip.receive(std(0x300, b"\xab"))  # data byte 0 differs
    assert spi.status() & 0x03 == 0
    assert chip.rx_filtered == 2


def test_accept_all_through_zero_masks() -> None:
    """The driver's default: RXM = 00, masks 0, one std + one ext filter each."""
    chip, spi, _ = setup_chip(m.MODE_CONFIG)
    spi.write(0x00, 0, 0, 0, 0, 0, m.SIDL_IDE, 0, 0, 0, 0, 0, 0)
    spi.write(0x20, *bytes(8))
    spi.write(0x60, m.RXB0_BUKT)
    spi.mode(m.MODE_NORMAL)
    for msg in (std(0x000), std(0x7FF, b"\xff\xff"), ext(0), ext(0x1FFFFFFF, b"\x01")):
        chip.receive(msg)
        b = spi.read_rxb(0x90)
        assert unpack_id(*b[:4]) == (msg.arbitration_id, msg.is_extended_id)
    assert chip.rx_filtered == 0


# ---------------------------------------------------------------- errors


def test_tx_errors_to_bus_off_and_config_clears() -> None:
    chip, spi, sent = setup_chip(inte=m.INT_RX0 | m.INT_ERR)
    chip.inject_tx_errors(13)  # TEC 104: warning
    spi.load_txb(0x40, *pack_id(0x100, False), 0)
    spi.rts()
    assert len(sent) == 1 and chip.tec == 103  # 13 * 8, then -1 for the success
    eflg = spi.read(m.EFLG)[0]
    assert eflg & m.EFLG_TXWAR and eflg & m.EFLG_EWARN and not eflg & m.EFLG_TXEP
    assert chip.int_asserted  # ERRIF, enabled
    spi.modify(m.CANINTF, m.INT_ERR, 0)
    chip.set_bus_fault(True)
    spi.rts()
    assert chip.bus_off
    assert spi.read(m.EFLG)[0] & m.EFLG_TXBO
    assert spi.read(m.TEC)[0] == 255
    assert spi.status() & 0x04  # still pending
    assert len(sent) == 1
    # the driver parks the chip in config mode: counters and flags reset
    spi.modify(m.CANCTRL, 0xF0, 0x90)
    assert not chip.bus_off and spi.read(m.EFLG)[0] & 0x3F == 0 and chip.tec == 0
    assert spi.read(0x30)[0] & m.TXB_ABTF


def test_bus_off_recovers_in_normal_mode() -> None:
    now = [0]
    chip = Mcp2515(clock_ns=lambda: now[0])
    spi = Spi(chip)
    spi.reset()
    spi.write(m.CNF3, 0x01, 0xB5, 0x00)  # 500 kbit/s at 16 MHz
    spi.mode(m.MODE_NORMAL)
    chip.force_bus_off()
    assert chip.bus_off
    now[0] += 1408 * 2000 - 1  # 128 * 11 bits at 2 us
    spi.status()
    assert chip.bus_off
    now[0] += 1
    spi.status()
    assert not chip.bus_off


def test_rx_errors_passive() -> None:
    chip, spi, _ = setup_chip()
    chip.add_rx_errors(128)
    eflg = spi.read(m.EFLG)[0]
    assert eflg & m.EFLG_RXEP and eflg & m.EFLG_RXWAR and spi.read(m.REC)[0] == 128


def test_unknown_instruction_is_recorded() -> None:
    chip, spi, _ = setup_chip()
    assert chip.transfer(b"\x55\x00") == b"\xff\xff"
    assert chip.violations and "0x55" in chip.violations[-1]


def test_transfer_length_checked() -> None:
    chip = Mcp2515()
    with pytest.raises(ValueError):
        chip.transfer(b"")
    with pytest.raises(ValueError):
        chip.transfer(bytes(65))


# ---------------------------------------------------------------- counting


def test_spi_counting_and_int_windows() -> None:
    chip, spi, sent = setup_chip()
    total0 = chip.stats.total_bytes
    chip.receive(std(0x7DF, bytes(8)))
    chip.note_int_observed()
    spi.read_rxb(0x90)  # 14
    spi.load_txb(0x40, *pack_id(0x7E8, False), 8, *bytes(8))  # 14
    spi.rts()  # 1
    w = chip.stats.fast_reply_windows()[-1]
    assert w.bytes_from_assert == 29 and w.bytes_from_observed == 29 and w.transactions == 3
    assert chip.stats.total_bytes - total0 == 29
    assert chip.stats.by_opcode[0x90] == 1 and chip.stats.by_opcode[0x81] == 1
    assert chip.stats.log[-1].opcode == 0x81
    # a window without RTS stays open-ended
    chip.receive(std(0x100))
    spi.read_rxb(0x90)
    assert chip.stats.windows[-1].rts_ns is None


# ---------------------------------------------------------------- bus + socket


def test_attach_virtual_bus() -> None:
    channel = f"hwsim-{uuid.uuid4().hex}"
    with (
        can.Bus(interface="virtual", channel=channel) as chip_bus,
        can.Bus(interface="virtual", channel=channel) as peer,
    ):
        chip, spi, _ = setup_chip()
        chip.attach_bus(chip_bus)
        try:
            peer.send(std(0x555, b"\x55"))
            assert chip.wait_int(2.0)
            assert unpack_id(*spi.read_rxb(0x90)[:4])[0] == 0x555
            spi.load_txb(0x40, *pack_id(0x556, False), 1, 0x66)
            spi.rts()
            got = peer.recv(timeout=2.0)
            assert got is not None and got.arbitration_id == 0x556 and bytes(got.data) == b"\x66"
        finally:
            chip.close()


def _msg(op: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BBH", op, 0, len(payload)) + payload


def _recv_reply(s: socket.socket) -> tuple[int, bytes]:
    hdr = b""
    while len(hdr) < 4:
        chunk = s.recv(4 - len(hdr))
        assert chunk
        hdr += chunk
    op, zero, n = struct.unpack("<BBH", hdr)
    body = b""
    while len(body) < n:
        chunk = s.recv(n - len(body))
        assert chunk
        body += chunk
    return op, body


def test_socket_protocol(tmp_path) -> None:
    chip, spi, _ = setup_chip()
    path = tmp_path / "spi.sock"
    with SpiSocketServer(chip, path) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(_msg(0x01, struct.pack("<IH", SPIP_MAGIC, SPIP_VERSION)))
            assert _recv_reply(s) == (0x81, struct.pack("<H", SPIP_VERSION))
            s.sendall(_msg(0x02, bytes([0x03, 0x0E, 0x00])))
            assert _recv_reply(s) == (0x82, b"\xff\xff\x00")  # CANSTAT: normal mode
            s.sendall(_msg(0x03))
            assert _recv_reply(s) == (0x83, b"\x01")
            # WAIT returns early when a frame arrives
            timer = threading.Timer(0.1, chip.receive, args=(std(0x42),))
            timer.start()
            t0 = time.monotonic()
            s.sendall(_msg(0x04, struct.pack("<I", 900_000)))
            assert _recv_reply(s) == (0x84, b"\x00")
            assert time.monotonic() - t0 < 0.8
            assert chip.stats.windows[-1].observed_ns is not None
            # WAIT times out with INT high
            spi.read_rxb(0x90)
            s.sendall(_msg(0x04, struct.pack("<I", 20_000)))
            assert _recv_reply(s) == (0x84, b"\x01")
            # a bad request closes the connection
            s.sendall(_msg(0x7E))
            assert s.recv(16) == b""
        # a bad HELLO too; the server keeps serving new clients
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(_msg(0x01, struct.pack("<IH", 0xDEADBEEF, 1)))
            assert s.recv(16) == b""
        deadline = time.monotonic() + 2
        while server.protocol_errors < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.protocol_errors == 2 and server.clients_served == 2
    assert not path.exists()


# ---------------------------------------------------------------- bus faults a driver must survive


def test_lone_node_stays_error_passive_with_txreq_set() -> None:
    """No ACK: TEC climbs to 128 and stops there (ISO 11898-1), never bus-off."""
    chip, spi, sent = setup_chip(inte=m.INT_RX0 | m.INT_ERR)
    chip.set_no_ack(True)
    spi.load_txb(0x40, *pack_id(0x100, False), 0)
    spi.rts()
    for _ in range(50):  # the chip keeps retrying; nothing changes
        assert spi.status() & 0x04
    assert chip.tec == 128 and not chip.bus_off and sent == []
    eflg = spi.read(m.EFLG)[0]
    assert eflg & m.EFLG_TXEP and not eflg & m.EFLG_TXBO
    assert spi.read(0x30)[0] & m.TXB_TXERR
    # a higher-priority buffer gets its attempts too, and fails the same way
    spi.write(0x40, 0x03)
    spi.load_txb(0x42, *pack_id(0x7E8, False), 0)
    spi.rts(2)
    assert spi.status() & 0x14 == 0x14 and chip.tec == 128
    # clearing TXREQ aborts it (ABTF); with an ACK again the other one goes out
    spi.modify(0x30, m.TXB_TXREQ, 0)
    assert spi.read(0x30)[0] & m.TXB_ABTF
    chip.set_no_ack(False)
    assert [s.arbitration_id for s in sent] == [0x7E8]


def test_stalled_id_lets_the_other_buffer_through() -> None:
    chip, spi, sent = setup_chip()
    chip.set_stalled_ids({0x123})
    spi.load_txb(0x40, *pack_id(0x123, False), 0)
    spi.rts(1)
    assert spi.status() & 0x04 and spi.read(0x30)[0] & m.TXB_MLOA
    spi.load_txb(0x42, *pack_id(0x7E8, False), 0)
    spi.rts(2)
    assert [s.arbitration_id for s in sent] == [0x7E8]
    assert spi.status() & 0x14 == 0x04  # TXB0 still pending, TXB1 done
    chip.set_stalled_ids(set())
    assert [s.arbitration_id for s in sent] == [0x7E8, 0x123]


def test_forced_int_low_has_no_flag_behind_it() -> None:
    chip, spi, _ = setup_chip()
    chip.force_int_low(True)
    assert chip.int_asserted and chip.wait_int(0.0)
    assert spi.status() & 0x03 == 0
    chip.force_int_low(False)
    assert not chip.int_asserted


def test_uart_bytes_counted_inside_rx_handling() -> None:
    chip, spi, _ = setup_chip()
    chip.uart_write(b"idle\n")
    chip.receive(std(0x100, b"\x01"))
    chip.uart_write(b"pending\n")  # a frame waits, the driver has not started
    spi.read_rxb(0x90)
    chip.uart_write(b"in rx\n")  # between the RX read and the status read after it
    spi.status()  # nothing more: handling ends
    chip.uart_write(b"after\n")
    assert bytes(chip.uart) == b"idle\npending\nin rx\nafter\n"
    assert chip.uart_bytes_in_rx == len(b"in rx\n")
    assert chip.uart_bytes_int_pending == len(b"pending\n")
