"""Views of one split virtqueue's areas, made once when the queue is set up.

Both roles touch the same fields per request; making the views (and checking their bounds) at
setup leaves only an index check per access on the hot path. ``desc`` and ``used_ring`` are byte
views for ``struct`` records, the rest aligned u16 arrays (one 16-bit access per item).
"""

from __future__ import annotations

from typing import NamedTuple

from ..shm import Region
from ..spec import ring as R


class RingViews(NamedTuple):
    desc: memoryview  # the descriptor table, 16 bytes per entry
    avail_ring: memoryview  # u16[size]
    avail_idx: memoryview  # u16[1]
    used_ring: memoryview  # 8 bytes per used element
    used_idx: memoryview  # u16[1]
    used_event: memoryview  # u16[1], at the end of the avail ring (EVENT_IDX)
    avail_event: memoryview  # u16[1], at the end of the used ring (EVENT_IDX)


def ring_views(mem: Region, size: int, desc: int, avail: int, used: int) -> RingViews:
    """The views of a queue whose areas lie in ``mem`` (raises MemoryAccessError if not)."""
    return RingViews(
        mem.view(desc, R.desc_table_size(size)),
        mem.u16_array(avail + R.AVAIL_RING, size),
        mem.u16_array(avail + R.AVAIL_IDX, 1),
        mem.view(used + R.USED_RING, R.USED_ELEM_SIZE * size),
        mem.u16_array(used + R.USED_IDX, 1),
        mem.u16_array(avail + R.used_event_off(size), 1),
        mem.u16_array(used + R.avail_event_off(size), 1),
    )
