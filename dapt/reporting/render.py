"""Showing a comparison: a terminal table that fits the terminal, and the files that keep everything.

The terminal gets what a person reads at a glance: one row per run under its short label, the
headline metrics (test perplexity after with its CI, changes against the control arm, downstream
means) as many as fit the width, and a separate table of config differences. Everything else goes to
``runs.csv`` / ``runs.md`` (every column) and the PNGs. A table wider than the terminal is never
handed to rich to squeeze: columns are chosen to fit, cells never wrap (a 40-column table once
printed one character per line).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from dapt.reporting.runs import Run
from dapt.reporting.table import LABEL_WIDTH, config_differences, config_table, fmt, to_markdown

NON_TTY_WIDTH = 120
# Metric columns the terminal shows first (the rest, in table order, while they fit).
HEADLINE = (
    "domain_ppl_after", "general_ppl_after", "domain_ppl_change_vs_control", "forgetting_vs_control",
    "domain_ppl_change", "forgetting", "domain_dev_ppl_after",
)
PERCENT = ("domain_ppl_change", "forgetting")  # relative changes, shown as +x.x%
COMPANIONS = ("_ci_low", "_ci_high", " std")


def terminal_width() -> int:
    """The terminal's width (``COLUMNS`` wins); ``NON_TTY_WIDTH`` when stdout is a file or pipe."""
    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return max(40, shutil.get_terminal_size((NON_TTY_WIDTH, 24)).columns)
    return NON_TTY_WIDTH


def _rank(column: str) -> tuple[int, int]:
    """Test perplexities and changes vs control first, then downstream means, then the other headlines."""
    if column in HEADLINE:
        return (0 if HEADLINE.index(column) < 4 else 2, HEADLINE.index(column))
    if column.startswith("downstream/") and column.endswith("/mean"):
        return (1, 0)
    return (3, 0)


def _header(column: str) -> str:
    """Display header: downstream keys read ``task metric stage`` (the CSV keeps the full key)."""
    if column.startswith("downstream/"):
        return " ".join(p for p in column.split("/")[1:] if p != "mean")
    return column


def _cells(table: pd.DataFrame, column: str) -> list[str]:
    """One metric with its CI (``[low, high]``) or std (``± s``) folded into the cell."""
    percent, ppl = column.startswith(PERCENT), "ppl" in column
    low, high, std = (table.get(f"{column}{s}") for s in COMPANIONS)
    if std is None and column.endswith("/mean"):  # downstream: <task>/after/<metric>/mean and .../std
        std = table.get(column.removesuffix("/mean") + "/std")

    def one(v: Any, bound: bool = False) -> str:
        if pd.isna(v):
            return ""
        if percent:
            return f"{v * 100:+.1f}" + ("" if bound else "%")
        if ppl:  # perplexities: two decimals while small, the CI bounds one less
            digits = 2 if abs(v) < 100 else 1 if abs(v) < 1000 else 0
            return f"{v:.{max(0, digits - 1) if bound else digits}f}"
        return fmt(float(v))

    out = []
    for i in range(len(table)):
        text = one(table[column].iloc[i])
        if text and low is not None and high is not None and not pd.isna(low.iloc[i]):
            text += f" [{one(low.iloc[i], True)}, {one(high.iloc[i], True)}]"
        elif text and std is not None and not pd.isna(std.iloc[i]):
            text += f" ± {one(std.iloc[i])}"
        out.append(text)
    return out


def _wrap_header(header: str, width: int) -> str:
    """A header on lines of at most ``width`` (breaking after ``_``, ``/`` or spaces where it can)."""
    lines, line = [], ""
    for piece in re.findall(r"[^_/ ]*[_/ ]?", header):
        while len(piece) > width:
            if line:
                lines.append(line)
                line = ""
            lines.append(piece[:width])
            piece = piece[width:]
        if len(line) + len(piece.rstrip()) > width:
            lines.append(line)
            line = ""
        line += piece
    return "\n".join(x.rstrip() for x in [*lines, line] if x.strip())


Column = tuple[str, str, list[str], int]  # key, header, cells, width


def _column(col: str, header: str, cells: list[str]) -> Column:
    cell_width = max([len(c) for c in cells] + [1])
    return col, header, cells, max(cell_width, min(len(header), max(cell_width, 14)))


def fit_columns(table: pd.DataFrame, key_columns: Sequence[str], width: int,
                exclude: Sequence[str] = ()) -> tuple[list[Column], list[str]]:
    """``(shown, left_out)``: key columns, then metric columns by importance while they fit ``width``."""
    shown = [_column(c, c, [fmt(v)[:LABEL_WIDTH] for v in table[c]]) for c in key_columns]
    metrics = [c for c in table.columns if c not in key_columns and c not in exclude and c != "error"
               and not c.endswith(COMPANIONS) and pd.api.types.is_numeric_dtype(table[c])]
    used = 1 + sum(w + 3 for *_, w in shown)
    left_out = []
    for col in sorted(metrics, key=_rank):  # stable: table order within a rank
        item = _column(col, _header(col), _cells(table, col))
        if used + item[3] + 3 <= width:
            shown.append(item)
            used += item[3] + 3
        else:
            left_out.append(col)
    return shown, left_out


def _rich_table(columns: Sequence[Column], numeric: set[str], title: str | None = None) -> Any:
    """Fixed-width columns: headers folded onto lines, cells never wrapped (cut with … at worst)."""
    from rich import box
    from rich.table import Table

    out = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col, header, _, width in columns:
        out.add_column(_wrap_header(header, width), justify="right" if col in numeric else "left",
                       no_wrap=True, overflow="ellipsis", width=width)
    for i in range(len(columns[0][2]) if columns else 0):
        out.add_row(*(cells[i] for _, _, cells, _ in columns))
    return out


def _console(width: int | None, console: Any = None) -> Any:
    from rich.console import Console

    return console or Console(width=width or terminal_width(), soft_wrap=False)


def print_table(table: pd.DataFrame, title: str = "", *, key_columns: Sequence[str] | None = None,
                exclude: Sequence[str] = (), width: int | None = None, console: Any = None) -> list[str]:
    """The metric table within the terminal width; returns the metric columns left out (see runs.csv)."""
    console = _console(width, console)
    if key_columns is not None:
        keys = list(key_columns)
    else:  # status only when some run did not finish
        keys = ["run", *(["status"] if "status" in table.columns and (table["status"] != "ok").any() else [])]
    columns, left_out = fit_columns(table, keys, console.width, exclude)
    numeric = {c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])}
    console.print(_rich_table(columns, numeric, title or None))
    if left_out:
        console.print(f"{len(left_out)} more metric column(s) in runs.csv / runs.md (or pick them with --metrics)",
                      style="dim", overflow="fold", highlight=False)
    return left_out


def print_config_table(runs: Sequence[Run], *, width: int | None = None, console: Any = None) -> None:
    """Label -> differing config values: as columns when they fit, else one ``key=value`` list per run."""
    console = _console(width, console)
    frame = config_table(runs)
    keys = [c for c in frame.columns if c != "run"]
    if not keys:
        console.print("config: the same in every run (apart from paths)", style="dim")
        return
    as_text = {k: [fmt(v) for v in frame[k]] for k in keys}
    columns = [(k, k, cells, max([len(k)] + [len(c) for c in cells])) for k, cells in {"run": list(frame["run"]), **as_text}.items()]
    needed = 1 + sum(w + 3 for *_, w in columns)
    if needed <= console.width:
        console.print(_rich_table(columns, set(), "config differences"))
        return
    # Too many to tabulate: the most common value of each key once, then what each run changes.
    from rich import box
    from rich.table import Table

    common = {k: pd.Series(cells).value_counts(sort=True).index[0] for k, cells in as_text.items()}  # "" = unset
    out = Table(title="config differences (each run: the keys where it departs from the most common value)",
                box=box.SIMPLE_HEAD, title_justify="left")
    out.add_column("run", no_wrap=True, overflow="ellipsis", min_width=min(LABEL_WIDTH, max(len(x) for x in frame["run"])))
    out.add_column("config", overflow="fold", ratio=1, min_width=30)
    out.add_row("(most runs)", "  ".join(f"{k}={common[k] or '(unset)'}" for k in keys), style="dim")
    for i, label in enumerate(frame["run"]):
        pairs = [f"{k}={as_text[k][i] or '(unset)'}" for k in keys if as_text[k][i] != common[k]]
        out.add_row(label, "  ".join(pairs) or "(the most common value everywhere)")
    console.print(out)


def print_comparison(runs: Sequence[Run], table: pd.DataFrame, title: str = "", *, width: int | None = None,
                     console: Any = None) -> None:
    """What ``dapt compare`` prints: config differences, the metric table, and failed runs' errors."""
    console = _console(width, console)
    print_config_table(runs, console=console)
    print_table(table, title, exclude=config_differences(runs), console=console)
    if "error" in table.columns:
        for label, error in zip(table["run"], table["error"]):
            if error:
                console.print(f"{label}: {error}", overflow="fold", style="red")


def write_outputs(runs: Sequence[Run], table: pd.DataFrame, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """``runs.csv``, ``runs.md`` (every column) and (with ``plots``) ``ppl_curves.png`` / ``downstream.png``."""
    from dapt.reporting.plots import plot_downstream, plot_perplexity

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "runs.csv", "markdown": out / "runs.md"}
    table.to_csv(written["csv"], index=False)
    written["markdown"].write_text(to_markdown(table))
    if plots:
        curves = plot_perplexity(runs, out / "ppl_curves.png")
        if curves:
            written["ppl_curves"] = curves
        bars = plot_downstream(runs, out / "downstream.png")
        if bars:
            written["downstream"] = bars
    return written
