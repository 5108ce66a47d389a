"""The bench machinery: CLI, JSON schema, targets, baselines programs, plots. Never timing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ivshmem_virtio.benchmarks import baselines, report, targets
from ivshmem_virtio.benchmarks.cli import _suites, select
from ivshmem_virtio.benchmarks.core import Context, Measurement, Progress, summarize_ns
from ivshmem_virtio.procs import run_cli

LAT_KEYS = {"n", "min", "mean", "p50", "p90", "p99", "p999", "max"}
TARGET_KEYS = {"name", "value", "goal", "unit", "met"}


def _ctx(tmp_path: Path) -> Context:
    return Context(tmp_path, True, Progress(open("/dev/null", "w")))  # noqa: SIM115


def test_bench_doorbell_quick_json_to_stdout():
    r = run_cli(["bench", "doorbell", "--quick", "--json", "-"], timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    doc = json.loads(r.stdout)
    assert doc["schema"] == report.SCHEMA
    for key in ("cpu_model", "cores", "kernel", "python", "numpy"):
        assert key in doc["machine"]
    assert doc["parameters"]["quick"] is True
    assert doc["parameters"]["suites"] == ["doorbell"]
    ids = {m["id"] for m in doc["results"]}
    assert {"doorbell.raw", "doorbell.irqwaiter"} <= ids
    for m in doc["results"]:
        assert LAT_KEYS <= set(m["latency_us"])
        lat = m["latency_us"]
        assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert doc["targets"], "the targets list is always there"
    for t in doc["targets"]:
        assert TARGET_KEYS <= set(t)
        assert t["met"] is None  # nothing the targets need was measured
    assert doc["errors"] == {}
    # the tables went to stderr, so stdout held nothing but the JSON
    assert b"measurement" in r.stderr and b"target" in r.stderr


def test_bench_vhost_user_measures_both_transports():
    """The same disk over ivshmem and vhost-user in one run: both measured, both ratios there."""
    r = run_cli(["bench", "vhost-user", "--quick", "--json", "-"], timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    doc = json.loads(r.stdout)
    got = {m["id"]: m for m in doc["results"]}
    for transport in ("ivshmem", "vhost-user"):
        assert got[f"vhost-user.{transport}.qd1"]["latency_us"]["p50"] > 0
        assert got[f"vhost-user.{transport}.qd32"]["ops_per_s"] > 0
    ratios = [t for t in doc["targets"] if "vhost-user /" in t["name"]]
    assert len(ratios) == 2 and all(t["value"] for t in ratios), ratios
    assert doc["errors"] == {}


def test_unknown_suite_is_a_usage_error():
    r = run_cli(["bench", "no-such-suite"], timeout=60)
    assert r.returncode == 2
    assert b"unknown suite" in r.stderr


def test_select_adds_the_baselines_targets_need():
    suites = _suites()
    assert select(["blk-latency"], suites) == ["pingpong", "minring", "blk-latency"]
    assert select(["blk-rand", "blk-seq"], suites) == ["disk", "blk-seq", "blk-rand"]
    assert select([], suites) == list(suites)
    with pytest.raises(ValueError):
        select(["nope"], suites)


def test_summarize_ns_percentiles():
    s = summarize_ns(np.arange(1, 1001, dtype=np.uint64) * 1000)  # 1..1000 us
    assert s["n"] == 1000 and s["min"] == 1.0 and s["max"] == 1000.0
    assert s["p50"] == pytest.approx(500.5) and s["p999"] == pytest.approx(999.001)
    assert summarize_ns([]) == {"n": 0}


def _lat(p50: float) -> dict[str, float]:
    return {"n": 1, "min": p50, "mean": p50, "p50": p50, "p90": p50, "p99": p50, "p999": p50,
            "max": p50}


def test_targets_from_synthetic_measurements(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.add(Measurement("baseline.pingpong.py.spin", "pingpong", "py spin", latency_us=_lat(1.0)))
    ctx.add(Measurement("baseline.pingpong.c.eventfd", "pingpong", "c efd", latency_us=_lat(2.0)))
    ctx.add(Measurement("blk-latency.adaptive", "blk-latency", "a", latency_us=_lat(10.0)))
    ctx.add(Measurement("blk-latency.block", "blk-latency", "b", latency_us=_lat(4.0)))
    ctx.add(Measurement("blk-rand.read.qd32", "blk-rand", "r", ops_per_s=50_000.0,
                        extra={"device_resets": 1}))
    by_name = {t["name"]: t for t in targets.evaluate(ctx)}
    adaptive = by_name["blk 512 B read QD1 adaptive p50 / Python busy-poll ping-pong p50"]
    assert adaptive["value"] == 10.0 and adaptive["met"] is True
    block = by_name["blk 512 B read QD1 block p50 / C eventfd ping-pong p50"]
    assert block["value"] == 2.0 and block["met"] is False and block["off_by"] == pytest.approx(
        2.0 / 1.3, rel=1e-3)
    iops = by_name["blk 4 KiB random read QD32 IOPS"]
    assert iops["met"] is False and iops["off_by"] == 2.0 and "not valid" in iops["detail"]
    seq = by_name["blk 128 KiB sequential read QD8 / single-process preadv"]
    assert seq["value"] is None and seq["met"] is None and seq["missing"]
    text = report.targets_table(list(by_name.values()))
    assert "not measured" in text and "NO" in text and "yes" in text


def test_qd1_goals_use_the_floor_measured_around_them(tmp_path):
    """The QD1 ratios divide by the floor bracketing the measurement, and say when it moved."""
    ctx = _ctx(tmp_path)
    ctx.add(Measurement("baseline.pingpong.py.spin", "pingpong", "py spin", latency_us=_lat(0.6)))
    ctx.add(Measurement(
        "blk-latency.adaptive", "blk-latency", "a", latency_us=_lat(10.0),
        params={"floor": {"id": "baseline.pingpong.py.spin", "before_p50": 0.2,
                          "after_p50": 0.2, "attempts": 1, "stable": True}}))
    ctx.add(Measurement(
        "blk-latency.block", "blk-latency", "b", latency_us=_lat(20.0),
        params={"floor": {"id": "baseline.pingpong.c.eventfd", "before_p50": 4.0,
                          "after_p50": 12.0, "attempts": 3, "stable": False}}))
    by_name = {t["name"]: t for t in targets.evaluate(ctx)}
    adaptive = by_name["blk 512 B read QD1 adaptive p50 / Python busy-poll ping-pong p50"]
    assert adaptive["value"] == pytest.approx(50.0)  # against 0.2 around it, not the 0.6 before
    assert "two machine states" not in adaptive["detail"]
    block = by_name["blk 512 B read QD1 block p50 / C eventfd ping-pong p50"]
    assert block["value"] == pytest.approx(2.5) and "two machine states" in block["detail"]


def test_pingpong_programs_run(tmp_path):
    """The C program builds with the system compiler and both programs write their samples."""
    ctx = _ctx(tmp_path)
    exe = baselines.compile_pingpong(ctx)
    if exe is None:
        pytest.fail("no C compiler (Debian package gcc)")
    for argv in ([str(exe)], [sys.executable, "-m", "ivshmem_virtio.benchmarks.pingpong"]):
        for mode in ("eventfd", "spin"):
            out = tmp_path / "lat.u64"
            ctx.run("pp", [*argv, mode, "50", "5", str(out)], timeout=60)
            samples = np.fromfile(out, dtype=np.uint64)
            assert samples.size == 50 and (samples > 0).all()
    assert not ctx.children


def test_minring_reads_the_image(tmp_path):
    """Both bare rings (Python, C) move real bytes: the driver checks every sector against the
    image, and a wrong answer fails the run."""
    ctx = _ctx(tmp_path)
    image = tmp_path / "img"
    image.write_bytes(np.random.default_rng(3).bytes(64 << 10))
    exe = baselines.compile_c(ctx, "minring")
    if exe is None:
        pytest.fail("no C compiler (Debian package gcc)")
    for argv in ([sys.executable, "-m", "ivshmem_virtio.benchmarks.minring"], [str(exe)]):
        for mode in ("spin", "eventfd"):
            out = tmp_path / "lat.u64"
            ctx.run("minring", [*argv, mode, str(image), "200", "10", str(out)], timeout=60)
            samples = np.fromfile(out, dtype=np.uint64)
            assert samples.size == 200 and (samples > 0).all()
    assert not ctx.children


def test_plots_or_a_reason(tmp_path):
    rng = np.random.default_rng(0)
    ms = [Measurement("blk-latency.block", "blk-latency", "blk block",
                      samples_ns=rng.integers(1000, 5000, 500).astype(np.uint64))]
    ms += [Measurement(f"blk-seq.read.qd{q}", "blk-seq", "seq", params={"qd": q, "op": "read"},
                       ops_per_s=100.0 * q, mb_per_s=10.0 * q) for q in (1, 2, 4)]
    made = report.plots(ms, tmp_path / "plots")
    if isinstance(made, str):
        assert "matplotlib" in made
        return
    assert {p.name for p in made} == {"latency_cdf.png", "throughput_qd.png"}
    for p in made:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_bench_without_results_still_reports(tmp_path, capsys, monkeypatch):
    """A suite that raises is reported in ``errors`` and the run goes on (exit status 1)."""
    from ivshmem_virtio.benchmarks import cli

    def boom(ctx: Context) -> None:
        raise RuntimeError("broken on purpose")

    real = cli._suites()
    fake = {"doorbell": cli.Suite("doorbell", boom, "boom")}
    monkeypatch.setattr(cli, "_suites", lambda: fake)
    out = tmp_path / "r.json"
    args = argparse.Namespace(suites=["doorbell"], quick=True, json_out=str(out), plots=None)
    assert cli.run_bench(args) == 1
    doc = json.loads(out.read_text())
    assert "broken on purpose" in doc["errors"]["doorbell"]
    assert len(doc["targets"]) == len(targets.evaluate(_ctx(tmp_path)))
    assert real  # the real registry imports every suite module


@pytest.mark.parametrize("suite", ["can", "inmate"])
def test_suites_written_against_other_parts_run_or_say_why(suite):
    """The CAN and inmate suites either measure something or name what is missing."""
    r = run_cli(["bench", suite, "--quick", "--json", "-"], timeout=180)
    doc = json.loads(r.stdout)
    assert doc["errors"] == {}, doc["errors"]
    assert r.returncode == 0
    mine = [m for m in doc["results"] if m["suite"] == suite]
    assert mine or suite in doc["unavailable"]
    for m in mine:
        assert "latency_us" in m or "ops_per_s" in m
