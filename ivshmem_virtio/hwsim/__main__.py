"""``python -m ivshmem_virtio.hwsim --socket PATH --bus virtual:NAME``: a simulated MCP2515 served
on a UNIX socket for the hosted inmate, bridged to a python-can bus.

The program lives here, not in the chip module, so that the chip (:mod:`.mcp2515`) and its socket
server (:mod:`.spisock`, which drives the chip) do not import each other.
"""

from __future__ import annotations

import argparse
import signal
import threading

import can

from .mcp2515 import Mcp2515
from .simclock import SimClock
from .spisock import SpiSocketServer


def _parse_bus(spec: str) -> tuple[str, str]:
    interface, sep, channel = spec.partition(":")
    if not sep or not interface or not channel:
        raise argparse.ArgumentTypeError("bus must be INTERFACE:CHANNEL, e.g. virtual:can0")
    return interface, channel


def main(argv: list[str] | None = None) -> int:
    """Serve a simulated MCP2515 on a UNIX socket, bridged to a python-can bus."""
    ap = argparse.ArgumentParser(prog="python -m ivshmem_virtio.hwsim", description=__doc__)
    ap.add_argument("--socket", required=True, help="UNIX socket path for the hosted inmate")
    ap.add_argument(
        "--bus",
        type=_parse_bus,
        required=True,
        help="python-can INTERFACE:CHANNEL (virtual:NAME is in-process only)",
    )
    ap.add_argument("--osc", type=int, default=16_000_000, help="crystal frequency in Hz")
    ap.add_argument("--rx-mode", choices=("wire", "backpressure"), default="wire")
    ap.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0 = never)")
    ap.add_argument("--sim-time", action="store_true",
                    help="bus time on a simulated clock (hwsim.simclock) instead of host time")
    args = ap.parse_args(argv)
    interface, channel = args.bus
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    chip = Mcp2515(osc_hz=args.osc, rx_mode=args.rx_mode,
                   sim_clock=SimClock() if args.sim_time else None)
    with can.Bus(interface=interface, channel=channel) as bus:
        chip.attach_bus(bus)
        server = SpiSocketServer(chip, args.socket)
        server.start()
        try:
            stop.wait(args.seconds if args.seconds > 0 else None)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
            chip.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
