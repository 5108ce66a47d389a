"""Bit-level length of classic CAN frames on the wire: the time a frame holds the bus.

The simulator's bus model needs how long a frame occupies the wire at a bitrate, stuff bits
included, because that is what decides whether a driver read its receive buffers in time. The
frame is built bit by bit as ISO 11898-1 lays it out (SOF, identifier, RTR/SRR, IDE, reserved
bits, DLC, data, CRC-15), stuffed (a complementary bit after five equal ones, stuff bits counting
toward the next run) from SOF to the end of the CRC, and followed by the fixed-form tail: CRC
delimiter, ACK slot and delimiter, 7 bits of EOF and 3 of intermission.
"""

from __future__ import annotations

from typing import Final

#: CRC-15/CAN generator polynomial (x^15 + x^14 + x^10 + x^8 + x^7 + x^4 + x^3 + 1).
CRC15_POLY: Final = 0x4599
#: CRC delimiter 1 + ACK slot 1 + ACK delimiter 1 + EOF 7 + intermission 3: never stuffed.
TAIL_BITS: Final = 13


def _bits(value: int, width: int) -> list[int]:
    return [(value >> (width - 1 - i)) & 1 for i in range(width)]


def crc15(bits: list[int]) -> int:
    """The CAN CRC over the destuffed bits from SOF to the end of the data field."""
    crc = 0
    for b in bits:
        nxt = b ^ ((crc >> 14) & 1)
        crc = (crc << 1) & 0x7FFF
        if nxt:
            crc ^= CRC15_POLY
    return crc


def frame_bits_unstuffed(can_id: int, data: bytes, *, extended: bool = False,
                         rtr: bool = False, dlc: int | None = None) -> list[int]:
    """SOF .. CRC of a classic data or remote frame, before stuffing."""
    n = len(data) if dlc is None else dlc
    if not 0 <= n <= 15:
        raise ValueError(f"dlc {n} out of range")
    payload = b"" if rtr else bytes(data)[:8]
    bits = [0]  # SOF
    if extended:
        bits += _bits(can_id >> 18, 11) + [1, 1] + _bits(can_id & 0x3FFFF, 18)  # SRR, IDE
        bits += [int(rtr), 0, 0]  # RTR, r1, r0
    else:
        bits += _bits(can_id, 11) + [int(rtr), 0, 0]  # RTR, IDE, r0
    bits += _bits(n, 4)
    for byte in payload:
        bits += _bits(byte, 8)
    return bits + _bits(crc15(bits), 15)


def stuff(bits: list[int]) -> list[int]:
    """Insert a complementary bit after every five equal bits (stuff bits start new runs)."""
    out: list[int] = []
    run_bit, run = -1, 0
    for b in bits:
        out.append(b)
        if b == run_bit:
            run += 1
        else:
            run_bit, run = b, 1
        if run == 5:
            out.append(1 - b)
            run_bit, run = 1 - b, 1
    return out


def frame_bit_count(can_id: int, data: bytes, *, extended: bool = False, rtr: bool = False,
                    dlc: int | None = None) -> int:
    """Bits the frame holds the bus, stuff bits, tail and intermission included."""
    bits = frame_bits_unstuffed(can_id, data, extended=extended, rtr=rtr, dlc=dlc)
    return len(stuff(bits)) + TAIL_BITS


def frame_time_ns(bitrate: int, can_id: int, data: bytes, *, extended: bool = False,
                  rtr: bool = False, dlc: int | None = None) -> int:
    """Nanoseconds the frame holds the bus at ``bitrate`` bit/s."""
    if bitrate <= 0:
        raise ValueError("bitrate must be > 0")
    nbits = frame_bit_count(can_id, data, extended=extended, rtr=rtr, dlc=dlc)
    return nbits * 1_000_000_000 // bitrate
