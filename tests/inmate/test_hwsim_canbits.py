"""The wire length of classic CAN frames (``ivshmem_virtio.hwsim.canbits``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ivshmem_virtio.hwsim import canbits


def test_unstuffed_lengths_follow_the_frame_layout() -> None:
    """Standard: 1 + 11 + 3 + 4 + 8n + 15 = 34 + 8n; extended: 54 + 8n (before stuffing)."""
    for n in range(9):
        data = bytes(n)
        assert len(canbits.frame_bits_unstuffed(0x123, data)) == 34 + 8 * n
        assert len(canbits.frame_bits_unstuffed(0x123, data, extended=True)) == 54 + 8 * n
    assert len(canbits.frame_bits_unstuffed(0x7DF, b"", rtr=True, dlc=8)) == 34


def test_stuffing_inserts_after_five_equal_bits_and_counts_stuff_bits() -> None:
    assert canbits.stuff([0] * 5) == [0, 0, 0, 0, 0, 1]
    # the stuff bit starts a run: 0000 0 (1) 1111 -> after four more ones a fifth is needed
    assert canbits.stuff([0] * 5 + [1] * 4) == [0] * 5 + [1] * 5 + [0]
    assert canbits.stuff([0, 1] * 6) == [0, 1] * 6


def test_all_dominant_frame_has_the_hand_counted_length() -> None:
    """id 0, no data: SOF..DLC are 19 zeros and the CRC of zeros is 0, so 34 zeros, stuffed
    after every five (6 stuff bits) = 40, plus the 13-bit tail: 53."""
    assert canbits.crc15([0] * 19) == 0
    assert canbits.frame_bit_count(0, b"") == 53


def test_bounds_of_an_8_byte_standard_frame() -> None:
    """111 bits without stuffing (34 + 64 + 13); at most one stuff bit per four bits after the
    first five of the 98-bit stuffed region (the usual worst-case bound)."""
    for can_id, data in ((0x555, bytes([0x55] * 8)), (0, bytes(8)), (0x7FF, b"\xff" * 8)):
        n = canbits.frame_bit_count(can_id, data)
        assert 111 <= n <= 111 + (98 - 1) // 4


@given(st.integers(0, 0x7FF), st.binary(max_size=8))
def test_stuffed_stream_never_has_six_equal_bits(can_id: int, data: bytes) -> None:
    out = canbits.stuff(canbits.frame_bits_unstuffed(can_id, data))
    text = "".join(map(str, out))
    assert "000000" not in text and "111111" not in text


def test_frame_time_at_500_kbit() -> None:
    """2 us per bit at 500 kbit/s: the 53-bit frame holds the bus 106 us."""
    assert canbits.frame_time_ns(500_000, 0, b"") == 106_000
