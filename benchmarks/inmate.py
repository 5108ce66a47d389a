"""``inmate``: the RTOS inmate's fast reply, counted by the MCP2515 simulator."""

from __future__ import annotations

from .core import Context


def run_inmate(ctx: Context) -> None:
    """Not written yet."""
    ctx.unavailable["inmate"] = "inmate suite not written yet"
