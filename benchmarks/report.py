"""Turning a finished run into a terminal table, a JSON document and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .core import Measurement

SCHEMA = "ivshmem-virtio-bench/1"


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    if abs(v) >= 10_000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def results_table(results: list[Measurement]) -> str:
    """One line per measurement: latency percentiles in microseconds, then throughput."""
    head = ("measurement", "p50", "p90", "p99", "p99.9", "max", "ops/s", "MB/s")
    rows: list[tuple[str, ...]] = [head]
    for m in results:
        lat = m.latency_us or {}
        title = m.title + (" [DEVICE RESET]" if m.invalid else "")
        rows.append((title, _fmt(lat.get("p50"), 2), _fmt(lat.get("p90"), 2),
                     _fmt(lat.get("p99"), 2), _fmt(lat.get("p999"), 2), _fmt(lat.get("max"), 1),
                     _fmt(m.ops_per_s, 0), _fmt(m.mb_per_s, 1)))
    return _grid(rows, "latency in us")


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = [("target", "value", "goal", "met", "off by")]
    for t in targets:
        goal = "-" if t["goal"] is None else f"{t['op']} {_fmt(t['goal'], 2)}"
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        value = "not measured" if t["value"] is None else f"{_fmt(t['value'], 2)} {t['unit']}"
        off = f"{t['off_by']:.2f}x" if t.get("off_by") is not None and t["met"] is False else ""
        rows.append((t["name"], value, goal, met, off))
    return _grid(rows)


def _grid(rows: list[tuple[str, ...]], note: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if note:
        lines.append(f"({note})")
    return "\n".join(lines)


def document(machine: dict[str, Any], parameters: dict[str, Any], results: list[Measurement],
             targets: list[dict[str, Any]], unavailable: dict[str, str], notes: list[str],
             errors: dict[str, str]) -> dict[str, Any]:
    """The JSON result: machine, parameters, every measurement with its percentiles, targets."""
    return {"schema": SCHEMA, "machine": machine, "parameters": parameters,
            "results": [m.as_dict() for m in results], "targets": targets,
            "unavailable": unavailable, "notes": notes, "errors": errors}


#: what the CDF title says for each suite that contributed curves, in this order
CDF_SUITES = {"pingpong": "ping-pong baselines", "minring": "bare rings",
              "doorbell": "doorbell", "blk-latency": "blk 512 B reads at QD1", "can": "CAN echo"}


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours: tab10 while it lasts, then tab20 (never a colour twice up to 20)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plots(results: list[Measurement], out_dir: Path) -> list[Path] | str:
    """latency_cdf.png and throughput_qd.png; a reason string when matplotlib is missing.

    Only what ran is drawn: the CDF title names the suites that gave curves, the throughput
    figure has a panel per sweep that ran. Every curve has its own colour (and a line style
    past 20 curves); legends sit outside the axes so they never cover a line.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (./scripts/setup --bench installs it): no plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    cdf = [m for m in results if m.samples_ns is not None and m.samples_ns.size
           and m.suite in CDF_SUITES]
    if cdf:
        fig, ax = plt.subplots(figsize=(11, 5.5))
        styles = ("-", "--", ":", "-.")
        for k, (m, rgba) in enumerate(zip(cdf, _colours(len(cdf)))):
            assert m.samples_ns is not None  # cdf holds only measurements with samples
            x = np.sort(m.samples_ns.astype(np.float64)) / 1e3
            idx = np.unique(np.linspace(0, x.size - 1, min(x.size, 4000)).astype(int))
            ax.plot(x[idx], (idx + 1) / x.size, label=m.title, linewidth=1.2, color=rgba,
                    linestyle=styles[(k // 20) % len(styles)])
        ax.set_xscale("log")
        ax.set_xlabel("round trip (us, log scale)")
        ax.set_ylabel("fraction of requests")
        ran = [label for suite, label in CDF_SUITES.items() if any(m.suite == suite for m in cdf)]
        ax.set_title("Latency CDF: " + ", ".join(ran))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        path = out_dir / "latency_cdf.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    sweeps = {s: ms for s in ("blk-seq", "blk-rand")
              if (ms := [m for m in results if m.suite == s])}
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4.5),
                                 squeeze=False)
        for ax, (suite, ms) in zip(axes[0], sweeps.items()):
            seq = suite == "blk-seq"
            for op, colour in (("read", "tab:blue"), ("write", "tab:orange")):
                pts = sorted((m.params["qd"], m.mb_per_s if seq else m.ops_per_s)
                             for m in ms if m.params.get("op") == op)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=colour, label=f"blk {op}")
            base = [m for m in results if m.suite == "disk" and (
                m.id in ("baseline.preadv.seq128k", "baseline.fio.read.128k.j1") if seq
                else m.id.startswith(("baseline.preadv.rand4k", "baseline.fio.randread")))]
            for m, colour in zip(base, ("tab:green", "tab:purple", "tab:brown", "tab:olive")):
                value = (m.mb_per_s if seq else m.ops_per_s) or 0
                ax.axhline(value, color=colour, linestyle="--", linewidth=1, label=m.title)
            if not seq:
                ax.axhline(100_000, color="tab:red", linestyle=":", label="target 100,000 IOPS")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("queue depth")
            ax.set_ylabel("MB/s" if seq else "IOPS")
            ax.set_title("128 KiB sequential" if seq else "4 KiB random")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        fig.suptitle("virtio-blk throughput against queue depth (page-cache image)")
        path = out_dir / "throughput_qd.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
