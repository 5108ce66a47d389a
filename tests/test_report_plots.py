"""Bench plots show what ran: the CDF title, one colour per curve, no empty panel, legends
outside the lines. Checked on the figures themselves (matplotlib from `setup --bench`)."""

from __future__ import annotations

import numpy as np
import pytest

from ivshmem_virtio.benchmarks import report
from ivshmem_virtio.benchmarks.core import Measurement

plt = pytest.importorskip("matplotlib.pyplot", reason="./scripts/setup --bench installs it")


def _cdf(suite: str, n: int) -> list[Measurement]:
    rng = np.random.default_rng(len(suite))
    return [Measurement(f"{suite}.{k}", suite, f"{suite} curve {k}",
                        samples_ns=rng.integers(1000, 50000, 300).astype(np.uint64))
            for k in range(n)]


def _sweep(suite: str) -> list[Measurement]:
    return [Measurement(f"{suite}.{op}.qd{q}", suite, f"{suite} {op}", params={"qd": q, "op": op},
                        ops_per_s=1000.0 * q, mb_per_s=10.0 * q)
            for op in ("read", "write") for q in (1, 4, 16)]


@pytest.fixture
def figures(monkeypatch):
    """The figures plots() made, kept open for inspection."""
    made: list = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: made.append(fig))
    yield made
    for fig in made:
        real_close(fig)


def _legend_outside(fig, ax) -> bool:
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    return not legend.overlaps(ax.get_window_extent())


def test_cdf_names_only_suites_that_ran_and_colours_every_curve(tmp_path, figures):
    results = _cdf("pingpong", 4) + _cdf("blk-latency", 9) + _sweep("blk-seq")
    written = report.plots(results, tmp_path)
    assert [p.name for p in written] == ["latency_cdf.png", "throughput_qd.png"]
    cdf_fig, tput_fig = figures
    (ax,) = cdf_fig.axes
    assert ax.get_title() == "Latency CDF: ping-pong baselines, blk 512 B reads at QD1"
    styles = [(line.get_color(), line.get_linestyle()) for line in ax.get_lines()]
    assert len(styles) == 13 and len(set(styles)) == 13
    assert len({c for c, _ in styles}) == 13  # up to 20 curves: colours alone tell them apart
    assert _legend_outside(cdf_fig, ax)
    # blk-rand did not run: one panel, no empty one
    (tax,) = [a for a in tput_fig.axes]
    assert tax.get_title() == "128 KiB sequential"
    assert len(tax.get_lines()) == 2
    assert _legend_outside(tput_fig, tax)
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_both_sweeps_give_two_panels(tmp_path, figures):
    report.plots(_sweep("blk-seq") + _sweep("blk-rand") + _cdf("can", 1), tmp_path)
    cdf_fig, tput_fig = figures
    assert cdf_fig.axes[0].get_title() == "Latency CDF: CAN echo"
    assert [a.get_title() for a in tput_fig.axes] == ["128 KiB sequential", "4 KiB random"]
    for a in tput_fig.axes:
        assert _legend_outside(tput_fig, a)
