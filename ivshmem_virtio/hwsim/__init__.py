"""Simulated hardware for tests without a board: the MCP2515 CAN controller
(SPI-instruction level, :mod:`.mcp2515`) and the UNIX-socket server that lends
its SPI bus and INT pin to the hosted build of the C inmate (:mod:`.spisock`).

Nothing is imported eagerly, so ``python -m ivshmem_virtio.hwsim`` (the simulator as a
process, ``__main__.py``) runs without a double-import warning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IntWindow": "ivshmem_virtio.hwsim.mcp2515",
    "Mcp2515": "ivshmem_virtio.hwsim.mcp2515",
    "SpiStats": "ivshmem_virtio.hwsim.mcp2515",
    "SpiTransaction": "ivshmem_virtio.hwsim.mcp2515",
    "SpiSocketServer": "ivshmem_virtio.hwsim.spisock",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
