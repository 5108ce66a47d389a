"""As a library we are silent: a python-can bus on ``interface="ivshmem"`` writes nothing to
stderr unless the application configures logging (then our events reach its handlers)."""

from __future__ import annotations

import subprocess
import sys

CAN_HUB = ("--protocols", "0xC024,0x8024", "--vectors", "4")

SCRIPT = """
import sys
import can

with can.Bus(interface="ivshmem", channel=sys.argv[1]) as bus:
    bus.send(can.Message(arbitration_id=0x123, data=b"hi", is_extended_id=False))
print("sent")
"""

CONFIGURED = """
import logging
logging.basicConfig(level=logging.INFO)
""" + SCRIPT


def _bus_process(tmp_path, sock: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script, f"sim:{sock}"], cwd=tmp_path,
                          capture_output=True, timeout=60)


def test_python_can_bus_is_silent_without_logging_config(procs, tmp_path):
    sock = str(tmp_path / "can.sock")
    procs.hub(sock, *CAN_HUB)
    procs.start("can", "can", "--link", f"sim:{sock}", "--bus", f"virtual:quiet-{tmp_path.name}",
                wait="backend ready")
    r = _bus_process(tmp_path, sock, SCRIPT)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().strip() == "sent"
    assert r.stderr == b"", r.stderr.decode()
    # the events are there for an application that asks: stdlib logging shows "device up"
    r = _bus_process(tmp_path, sock, CONFIGURED)
    assert r.returncode == 0, r.stderr.decode()
    assert "INFO:ivshmem_virtio.frontend" in r.stderr.decode() and "device up" in \
        r.stderr.decode(), r.stderr.decode()
