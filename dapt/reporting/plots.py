"""PNG plots of a comparison: held-out perplexity curves and downstream scores per run.

Legibility whatever the runs is the design constraint: runs are named by their short labels
(``table.run_labels``), never by every differing config key (long labels squeezed the axes to slivers),
legends sit outside the axes, and figures grow with the number of runs instead of cramming them.
``perplexity_figure`` / ``downstream_figure`` return the matplotlib figure so tests can measure it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

from dapt.io import atomic_write_file
from dapt.reporting.runs import CURVE_KEYS, Run
from dapt.reporting.table import downstream_scores, run_labels


def pyplot() -> Any:
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` atomically (a killed write leaves the previous file) in the format of the suffix."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
    finally:
        pyplot().close(fig)
    return path


def _log_y(ax: Any) -> None:
    """Log scale with plain numbers (``20``, ``30``) instead of ``2x10^1``; minor labels within one decade only."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if low > 0 and high / low < 10 else NullFormatter())


def _legend_columns(n: int, per_column: int = 18) -> int:
    return max(1, math.ceil(n / per_column))


def perplexity_figure(runs: Sequence[Run], keys: Sequence[str] = CURVE_KEYS) -> Any | None:
    """Held-out perplexity against step: one panel per held-out set, one line per run, legend at the right."""
    curves = [(run, run.history) for run in runs]
    keys = [k for k in keys if any(k in h.columns for _, h in curves if not h.empty)]
    if not keys:
        return None
    plt = pyplot()
    labels = run_labels(runs)
    shown = [run for run, h in curves if not h.empty and any(k in h.columns for k in keys)]
    ncol = _legend_columns(len(shown))
    height = max(4.0, 0.24 * math.ceil(len(shown) / ncol) + 1.0)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys) + 2.2 * ncol, height), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for ax, key in zip(axes[0], keys):
        for i, (run, hist) in enumerate(curves):
            if hist.empty or key not in hist.columns:
                continue
            part = hist[["step", key]].dropna()
            if not part.empty:
                style = ("-", "--", ":", "-.")[(i // cmap.N) % 4]  # more runs than colours: vary the line too
                ax.plot(part["step"], part[key], style, marker="o", markersize=3, color=cmap(i % cmap.N), label=labels[run.name])
        ax.set_title(key)
        ax.set_ylabel("perplexity")
        _log_y(ax)
        ends = [h["step"].max() for _, h in curves if not h.empty and key in h.columns and h["step"].max() > 0]
        if ends and max(ends) >= 10 * min(ends):  # 20-step and 2000-step runs: the short ones stay visible
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, max(ends) * 1.5)
            ax.set_xlabel("step (log scale)")
        else:
            ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8, ncols=ncol, title="run")
    return fig


def plot_perplexity(runs: Sequence[Run], path: str | Path, keys: Sequence[str] = CURVE_KEYS) -> Path | None:
    """``perplexity_figure`` saved as a PNG (None when no run logged a perplexity history)."""
    fig = perplexity_figure(runs, keys)
    return save_figure(fig, path) if fig is not None else None


def downstream_figure(runs: Sequence[Run]) -> Any | None:
    """Per task: bars per run (before = base model, after = adapted), error bars = std over seeds, dots = seeds."""
    rows = downstream_scores(runs)
    if not rows:
        return None
    plt = pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(r["run"] for r in rows))
    longest = max(len(n) for n in names)
    panel_width = max(4.5, 0.55 * len(names) + 1.5)
    height = 3.5 + 0.07 * longest  # room for the rotated labels under the axes, not taken from them
    fig, axes = plt.subplots(1, len(tasks), figsize=(panel_width * len(tasks) + 1.2, height), squeeze=False, layout="constrained")
    width = 0.38
    bars: dict[str, Any] = {}
    for ax, task in zip(axes[0], tasks):
        metric = next(r["metric"] for r in rows if r["task"] == task)
        for i, stage in enumerate(("before", "after")):
            cells = {r["run"]: r for r in rows if r["task"] == task and r["stage"] == stage}
            present = [n for n in names if n in cells]
            if not present:
                continue
            xs = [names.index(n) + (i - 0.5) * width for n in present]
            bars[stage] = ax.bar(xs, [cells[n]["mean"] for n in present], width, yerr=[cells[n]["std"] for n in present],
                                 capsize=3, label=stage, alpha=0.85, color=("tab:gray", "tab:blue")[i])
            for x, n in zip(xs, present):  # every seed as a dot
                ax.scatter([x] * len(cells[n]["values"]), cells[n]["values"], s=8, color="black", zorder=3)
        task_rows = [r for r in rows if r["task"] == task]
        lo = min(min([r["mean"] - r["std"], *r["values"]]) for r in task_rows)
        hi = max(max([r["mean"] + r["std"], *r["values"]]) for r in task_rows)
        pad = max((hi - lo) * 0.4, 0.01)
        ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)  # zoom on the differences
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35 if len(names) > 2 or longest > 12 else 0, ha="right" if len(names) > 2 or longest > 12 else "center", fontsize=8)
        ax.set_xlim(-0.7, len(names) - 0.3)
        ax.set_title(f"{task}: {metric}\n(mean ± std over seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(list(bars.values()), list(bars.keys()), loc="outside right upper", fontsize=8)
    return fig


def plot_downstream(runs: Sequence[Run], path: str | Path) -> Path | None:
    """``downstream_figure`` saved as a PNG (None when no run has downstream scores)."""
    fig = downstream_figure(runs)
    return save_figure(fig, path) if fig is not None else None
