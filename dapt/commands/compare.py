"""``dapt compare``: many runs side by side, as a terminal table, CSV/Markdown for papers, and plots.

Only the command line lives here; the work is in ``dapt.reporting`` (``runs``: finding and loading
runs, ``table``: pandas frames and short labels, ``render``: the terminal table and output files,
``plots``: PNGs), which ``notebooks/compare_runs.ipynb`` calls directly, so the notebook and the
command print the same numbers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from dapt.reporting import LABEL_WIDTH, average_over_seeds, comparison_table, load_runs, print_comparison, print_table, to_markdown, write_outputs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dapt compare",
        description="Compare dapt runs: config differences, a metric table that fits the terminal, "
                    "CSV/Markdown with every column, and plots.",
        epilog="e.g.  dapt compare multirun/dapt_biomed/2026-01-01_12-00-00 --sort domain_ppl_after\n"
               "      dapt compare outputs/a outputs/b --format markdown\n"
               "      dapt compare my-team/dapt --filter group=dapt_biomed   (online, W&B API)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("sources", nargs="+", help="sweep folder(s), run folder(s), or a W&B entity/project")
    p.add_argument("--filter", "-f", action="append", default=[], metavar="KEY=VALUE",
                   help="keep runs whose config/metric KEY equals VALUE (also status=ok|failed; group=, tag= for W&B)")
    p.add_argument("--metrics", "-m", default=None,
                   help="comma-separated metric columns, or 'all' (default: perplexities, forgetting, throughput, downstream)")
    p.add_argument("--sort", "-s", default=None, help="column to sort by (e.g. domain_ppl_after)")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--average-seeds", action="store_true", help="one row per config: mean and std over runs differing only in seed")
    p.add_argument("--format", choices=("table", "csv", "markdown"), default="table", help="what to print (default: table)")
    p.add_argument("--out", "-o", default=None, help="folder for runs.csv, runs.md and plots (default: <source>/compare or ./compare)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def _config_label(row: Any, keys: Sequence[str]) -> str:
    text = ",".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys)
    return text if len(text) <= LABEL_WIDTH else text[: LABEL_WIDTH - 1] + "…"


def _general_sets_warning(runs: Sequence[Any]) -> str | None:
    """The tables' warning when runs' general perplexities were scored on different general sets
    (``Run.heldout_sets``, from results.json; W&B API runs carry none and are left out)."""
    from dapt.reporting.cells import general_sets_warning

    jobs = [{"results": {"heldout_sets": run.heldout_sets}, "label": run.name} for run in runs]
    return general_sets_warning(jobs, lambda job: job["label"])


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    runs = load_runs(args.sources, args.filter)
    metrics: Any = args.metrics
    if metrics and metrics != "all":
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    table = comparison_table(runs, metrics=metrics, sort=args.sort, descending=args.desc)
    if args.average_seeds:
        table = average_over_seeds(table, runs)
    if args.out:
        out_dir = Path(args.out)
    elif len(args.sources) == 1 and Path(args.sources[0]).is_dir():
        out_dir = Path(args.sources[0]) / "compare"
    else:
        out_dir = Path("compare")
    written = write_outputs(runs, table, out_dir, plots=not args.no_plots)
    if warning := _general_sets_warning(runs):
        print(warning, file=sys.stderr)
    if args.format == "csv":
        print(table.to_csv(index=False), end="")
    elif args.format == "markdown":
        print(to_markdown(table), end="")
    else:
        failed = sum(r.status != "ok" for r in runs)
        title = f"{len(runs)} run{'' if len(runs) == 1 else 's'}" + (f" ({failed} failed or unfinished)" if failed else "")
        if args.average_seeds:
            shown = table.copy()
            config_cols = [c for c in table.columns if c != "runs" and not c.endswith(" std") and f"{c} std" not in table.columns]
            shown.insert(0, "config", [_config_label(row, config_cols) for _, row in table.iterrows()] if config_cols else "all")
            print_table(shown.drop(columns=config_cols), title + ", mean ± std over seeds", key_columns=["config", "runs"])
        else:
            print_comparison(runs, table, title)
        for kind, path in written.items():
            print(f"{kind}: {path}")
    return 0
