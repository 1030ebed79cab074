"""The base / control / adapted table printed at the end of ``dapt train`` and by ``dapt finetune``.

One row per task: the primary test metric of each model as mean ± std over seeds with every per-seed
value under it, then for the adapted model's difference from the base and from the control one cell
each: the difference, its confidence interval, the minimum detectable effect (MDE: the smallest true
difference the seeds could detect with 80% power) and a short verdict. The interval and the MDE are shown because
with 3-5 seeds "not significant" usually means "could not tell", not "no effect"; the full sentence
of each verdict stays in ``results.json``. Fits a ~100-column terminal with three models.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.table import Table

ROLES = ("before", "control", "after", "model")
LABELS = {"before": "base", "control": "control", "after": "adapted", "model": "model"}
# (key in the task entry, column header); "" = the entry's own after - before keys.
COMPARISON_COLUMNS = (("", "Δ vs base"), ("vs_control", "Δ vs control"))
_SEEDS_PER_LINE = 2  # per-seed scores wrap two to a line so three model columns fit in 100 columns


def _cell(summary: Mapping[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    text = f"{summary['mean']:.3f} ± {summary['std']:.3f}"
    values = summary.get("values") or []
    if len(values) > 1:
        lines = [" ".join(f"{v:.3f}" for v in values[i : i + _SEEDS_PER_LINE]) for i in range(0, len(values), _SEEDS_PER_LINE)]
        text += "\n[dim]" + "\n".join(lines) + "[/dim]"
    return text


def _signed(x: float) -> str:
    return f"{0.0 if round(x, 3) == 0 else x:+.3f}"


def short_verdict(entry: Mapping[str, Any]) -> tuple[str, str]:
    """A word or two and a colour for one comparison (``paired_comparison`` keys)."""
    n, delta, ci = entry.get("n", 0), entry.get("delta") or 0.0, entry.get("delta_ci")
    if n < 2:
        return "1 seed: no test", "yellow"
    if entry.get("p_value") is None or ci is None:
        return ("no difference" if delta == 0 else "same Δ every seed"), "yellow"
    if entry.get("significant"):
        return ("gain", "green") if delta > 0 else ("loss", "red")
    margin = entry.get("margin", 0.01)
    if -margin <= ci[0] and ci[1] <= margin:
        return f"none > {margin:g}", "cyan"
    return "inconclusive", "yellow"


def _delta_cell(comparison: Mapping[str, Any] | None) -> str:
    """Δ, then (dim) its CI and MDE, then the coloured short verdict: one comparison per cell."""
    if not comparison or comparison.get("delta") is None:
        return "-"
    lines = [_signed(comparison["delta"])]
    ci, mde = comparison.get("delta_ci"), comparison.get("mde")
    if ci:
        lines.append(f"[dim]{_signed(ci[0])}..{_signed(ci[1])}[/dim]")
    if mde is not None:
        lines.append(f"[dim]MDE {mde:.3f}[/dim]")
    words, style = short_verdict(comparison)
    lines.append(f"[{style}]{words}[/{style}]")
    return "\n".join(lines)


def _comparison(entry: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    node = entry.get(key) if key else entry
    return node if isinstance(node, Mapping) and "delta" in node else None


def format_downstream_table(results: Mapping[str, Any], *, title: str | None = None) -> Table:
    """A rich table of ``{task: {"before"/"control"/"after"/"model": ..., "delta", "delta_ci", "mde",
    "p_holm", "verdict", "vs_control": {...}}}``."""
    entries = {name: e for name, e in results.items() if isinstance(e, Mapping)}
    roles = [r for r in ROLES if any(r in e for e in entries.values())]
    comparisons = [c for c in COMPARISON_COLUMNS if any(_comparison(e, c[0]) for e in entries.values())]
    default_title = "Downstream test scores: mean ± std over seeds, per-seed below"
    if comparisons:
        default_title += "; Δ: difference, 95% CI, MDE, verdict (paired t, Holm-corrected)"
    table = Table(
        title=title or default_title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        min_width=72,  # keeps title and caption (model sources) on few lines when there is one role
    )
    table.add_column("task", no_wrap=True)
    for role in roles:
        table.add_column(LABELS[role], justify="right", no_wrap=True)
    for _, header in comparisons:
        table.add_column(header, justify="right", no_wrap=True)
    models: dict[str, str] = {}
    budgets: set[str] = set()
    for name, entry in entries.items():
        metric = entry.get("metric", "f1")
        row = [f"[bold]{name}[/bold]\n{metric}"]
        for role in roles:
            block = entry.get(role)
            if isinstance(block, Mapping):
                models.setdefault(LABELS[role], str(block.get("model")))
                row.append(_cell(block.get(f"test_{metric}")))
            else:
                row.append("-")
        for key, _ in comparisons:
            row.append(_delta_cell(_comparison(entry, key)))
        if entry.get("budget"):
            budgets.add(str(entry["budget"]))
        table.add_row(*row)
    caption = [f"{role} = {src}" for role, src in models.items()]
    if comparisons:
        caption.append("MDE: smallest Δ these seeds detect with 80% power; 'inconclusive': CI too wide to tell")
    if budgets:
        caption.append(f"budget: {', '.join(sorted(budgets))}")
    if caption:
        table.caption = "; ".join(caption)
        table.caption_justify = "left"
    return table


def print_downstream_table(results: Mapping[str, Any], console: Console | None = None, **kwargs: Any) -> None:
    if not results:
        return
    if console is None:  # not a terminal (a log file, CI): rich would assume 80 columns and cut cells
        console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(format_downstream_table(results, **kwargs))
