"""The adaptive-mode gate: spin only while no task waits for a CPU (kernel CPU pressure)."""

from __future__ import annotations

from pathlib import Path

from ivshmem_virtio.link import SpinGate


def _psi(path: Path, stall_us: int) -> None:
    path.write_text(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={stall_us}\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")


def test_spins_while_nothing_waits_for_a_cpu(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    _psi(psi, 1_000_000)
    gate = SpinGate(period=0.02, psi_path=str(psi))
    assert gate(10.0)
    _psi(psi, 1_000_500)  # 0.5 ms of stall in a 20 ms window: 2.5 %
    assert gate(10.02)


def test_stops_spinning_under_cpu_pressure_and_resumes(tmp_path: Path) -> None:
    psi = tmp_path / "cpu"
    _psi(psi, 0)
    gate = SpinGate(period=0.02, psi_path=str(psi))
    gate(1.0)
    _psi(psi, 10_000)  # tasks waited 10 ms of the 20 ms window: oversubscribed
    assert not gate(1.02)
    _psi(psi, 20_000)
    assert not gate(1.03)  # inside the window: the last decision holds, no file read
    assert not gate(1.04)
    _psi(psi, 20_100)
    assert gate(1.06)


def test_falls_back_to_the_run_queue_without_psi(tmp_path: Path) -> None:
    gate = SpinGate(psi_path=str(tmp_path / "missing"))
    gate(1.0)  # decided from /proc/loadavg; must not raise, and stops looking for PSI
    assert gate.psi_path == ""
