"""One interface for an ivshmem 2.0 device, whatever reaches it (uio on Jailhouse, or the sim hub).

Mirrors the register page of virtio-ivshmem.md §1.2 plus the memory sections of §1.3, and the
way to wait for interrupts. The virtio transport sees only this interface, so it runs unchanged
on real hardware and on a plain Linux host (OpenAMP/libmetal's HAL split).
"""

from __future__ import annotations

import abc

from ..shm import Region


class IvshmemDevice(abc.ABC):
    """A peer's view of one ivshmem link."""

    id: int
    max_peers: int
    vectors: int
    protocol: int
    state_table: Region
    rw: Region
    name: str

    @property
    def peer_id(self) -> int:
        """The other end of a two-peer link (``!own_id``, §3.1)."""
        return 1 - self.id if self.id <= 1 else 0

    def peer_state(self, peer: int) -> int:
        return self.state_table.u32(4 * peer)

    @property
    def own_state(self) -> int:
        return self.state_table.u32(4 * self.id)

    @abc.abstractmethod
    def set_state(self, value: int) -> None:
        """Write STATE; the hypervisor raises vector 0 on every other peer if it changed."""

    @abc.abstractmethod
    def doorbell(self, peer: int, vector: int) -> None:
        """Write DOORBELL = ``(peer << 16) | vector``."""

    def native_doorbell(self, peer: int, vector: int) -> tuple[int, object | None, int, int] | None:
        """How compiled code rings ``(peer, vector)`` itself, as :meth:`doorbell` would:
        ``(eventfd, None, 0, 0)``, ``(-1, register page, offset, value)`` for a 32-bit store,
        or ``(-1, None, 0, 0)`` for a doorbell that goes nowhere. None: only from Python."""
        return None

    @abc.abstractmethod
    def set_int_control(self, enabled: bool) -> None:
        """Write INT_CONTROL; interrupts arriving while it is 0 are lost."""

    # bumped whenever interrupt_fds() changes: a waiter re-registers its fds when it moved
    fd_epoch = 0

    @abc.abstractmethod
    def interrupt_fds(self) -> list[int]:
        """File descriptors that become readable when an interrupt is pending."""

    @abc.abstractmethod
    def ack_interrupts(self) -> int:
        """Consume pending interrupts without blocking and re-arm; returns how many were seen."""

    def ack_fd(self, fd: int) -> int:
        """Consume the interrupt behind one readable fd (default: all of them)."""
        return self.ack_interrupts()

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the device (state returns to 0 for the peers, as closing /dev/uioN does)."""
