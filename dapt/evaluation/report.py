"""The before/after table printed at the end of ``dapt train`` and by ``dapt finetune``.

One row per task: the primary test metric as mean ± std over seeds with every per-seed value under
it, the paired difference, its p-value and the verdict in words, so a reader sees at once whether an
adaptation gain exceeds the seed spread.
"""

from __future__ import annotations

from typing import Any, Mapping

from rich import box
from rich.console import Console
from rich.table import Table

ROLES = ("before", "after", "model")


def _cell(summary: Mapping[str, Any] | None, per_seed: list[Any] | None = None) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    text = f"{summary['mean']:.3f} ± {summary['std']:.3f}"
    values = summary.get("values") or []
    if len(values) > 1:
        text += "\n[dim]" + " ".join(f"{v:.3f}" for v in values) + "[/dim]"
    return text


def short_verdict(entry: Mapping[str, Any]) -> tuple[str, str]:
    """A few words and a colour for the table; the full sentence stays in ``results.json``."""
    n, alpha = entry.get("n", 0), entry.get("alpha", 0.05)
    p, delta = entry.get("p_value"), entry.get("delta") or 0.0
    if n < 2:
        return "1 seed: no test", "yellow"
    if p is None:
        return ("no difference" if delta == 0 else "same Δ every seed"), "yellow"
    if entry.get("significant"):
        return (f"gain (p<{alpha:g})", "green") if delta > 0 else (f"loss (p<{alpha:g})", "red")
    return "within noise", "yellow"


def format_downstream_table(results: Mapping[str, Any], *, title: str | None = None) -> Table:
    """A rich table of ``{task: {"before"/"after"/"model": ..., "delta", "p_value", "verdict"}}``."""
    roles = [r for r in ROLES if any(isinstance(e, Mapping) and r in e for e in results.values())]
    paired = "before" in roles and "after" in roles
    default_title = "Downstream test scores: mean ± std over seeds, per-seed below" + ("; p: paired t-test" if paired else "")
    table = Table(
        title=title or default_title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        min_width=72,  # keeps title and caption (model sources) on few lines when there is one role
    )
    table.add_column("task", no_wrap=True)
    for role in roles:
        table.add_column(role, justify="right", no_wrap=True)
    if paired:
        table.add_column("Δ", justify="right", no_wrap=True)
        table.add_column("p", justify="right", no_wrap=True)
        table.add_column("verdict", min_width=7)  # the only column allowed to wrap on a narrow terminal
    models: dict[str, str] = {}
    budgets: set[str] = set()
    for name, entry in results.items():
        if not isinstance(entry, Mapping):
            continue
        metric = entry.get("metric", "f1")
        row = [f"[bold]{name}[/bold]\n{metric}"]
        for role in roles:
            block = entry.get(role)
            if isinstance(block, Mapping):
                models.setdefault(role, str(block.get("model")))
                row.append(_cell(block.get(f"test_{metric}")))
            else:
                row.append("-")
        if paired:
            delta, p = entry.get("delta"), entry.get("p_value")
            row.append("-" if delta is None else f"{delta:+.3f}")
            row.append("-" if p is None else f"{p:.3g}")
            verdict, style = short_verdict(entry)
            row.append(f"[{style}]{verdict}[/{style}]")
        if entry.get("budget"):
            budgets.add(str(entry["budget"]))
        table.add_row(*row)
    caption = [f"{role} = {src}" for role, src in models.items()]
    if budgets:
        caption.append(f"budget: {', '.join(sorted(budgets))}")
    if caption:
        table.caption = "; ".join(caption)
        table.caption_justify = "left"
    return table


def print_downstream_table(results: Mapping[str, Any], console: Console | None = None, **kwargs: Any) -> None:
    if not results:
        return
    (console or Console()).print(format_downstream_table(results, **kwargs))
