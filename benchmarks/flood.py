"""A hostile frontend process:
``python -m ivshmem_virtio.benchmarks.flood SOCKET avail|doorbell SECONDS``.

It brings the virtio-blk device up like any driver, then misbehaves until SECONDS pass:
``avail`` keeps the avail index a ring's worth ahead of the used index with one valid 512 B read
chain named over and over (the backend always has work from it); ``doorbell`` rings the
backend's doorbell as fast as it can without adding any request. It prints ``flooding`` when it
starts and, at the end, ``served N`` (used-index progress: how much work it got). The bench's
``fairness`` suite and tests/test_fairness.py run it against one disk of a ``serve`` daemon.
"""

from __future__ import annotations

import asyncio
import sys
import time

from ivshmem_virtio.frontend.blk import BlkClient
from ivshmem_virtio.ivshmem.sim import SimIvshmem
from ivshmem_virtio.spec import blk as B


def chain_in_every_slot(client: BlkClient) -> tuple[int, int, int]:
    """One valid 512 B read chain, named by every slot of the avail ring (not yet published):
    (avail index offset, used index offset, ring size)."""
    vq = client.vqs[0]
    mem = client.transport.hdr
    alloc = client.transport.allocator
    assert alloc is not None
    base = alloc.alloc(1024)
    mem.pack(B.OUTHDR, base, B.T_IN, 0, 0)
    head = vq.add([(base, B.OUTHDR_SIZE)], [(base + 64, 512), (base + 16, 1)], "flood")
    for i in range(vq.size):
        mem.set_u16(vq.avail + 4 + 2 * i, head)
    return vq.avail + 2, vq.used + 2, vq.size


async def main(sock: str, how: str, seconds: float) -> None:
    dev = SimIvshmem(sock, 1)
    client = BlkClient(dev, event_idx=False, indirect=False, mode="block", timeout=10.0)
    await client.start(timeout=10.0)
    await client.read(0, 512)  # a normal request first: the device works
    # from here on we are no driver: nobody reaps completions or recovers the device
    assert client._irq_task is not None and client._waiter is not None
    client._irq_task.cancel()
    client._waiter.close()
    mem = client.transport.hdr
    avail_idx, used_idx, size = chain_in_every_slot(client)
    start_used = mem.u16(used_idx)
    kick = client.transport.kick
    print("flooding", flush=True)
    end = time.monotonic() + seconds
    served = 0
    last = start_used
    if how == "avail":
        mem.set_u16(avail_idx, (start_used + size - 1) & 0xFFFF)
        kick(0)
        while time.monotonic() < end:
            for _ in range(256):  # a tight loop: the ring is never allowed to run dry
                now_used = mem.u16(used_idx)
                if now_used != last:
                    served += (now_used - last) & 0xFFFF
                    last = now_used
                    mem.set_u16(avail_idx, (now_used + size - 1) & 0xFFFF)
                    kick(0)
    else:
        while time.monotonic() < end:
            for _ in range(1000):
                kick(0)
            await asyncio.sleep(0)
    print(f"served {served}", flush=True)
    dev.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
