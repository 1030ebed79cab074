"""Comparing runs (``dapt compare``, ``notebooks/compare_runs.ipynb``): load, tabulate, print, plot.

``runs`` finds and loads runs (run/sweep folders, offline W&B files; ``wandb_api``: the W&B API), ``table`` turns
them into pandas frames under short run labels, ``render`` prints what fits a terminal and writes
CSV/Markdown, ``plots`` draws the PNGs. The names below are the API the notebook uses:
``runs = load_runs([...]); table = comparison_table(runs)``.
"""

from dapt.reporting.plots import downstream_figure, perplexity_figure, plot_downstream, plot_perplexity
from dapt.reporting.render import print_comparison, print_config_table, print_table, terminal_width, write_outputs
from dapt.reporting.runs import Run, find_run_dirs, load_run, load_runs
from dapt.reporting.table import (
    DEFAULT_METRICS,
    LABEL_WIDTH,
    average_over_seeds,
    comparison_table,
    config_differences,
    config_table,
    downstream_scores,
    flatten,
    metric_columns,
    run_labels,
    to_markdown,
)
from dapt.reporting.wandb_api import load_wandb_runs, wandb_filters

__all__ = [
    "DEFAULT_METRICS", "LABEL_WIDTH", "Run", "average_over_seeds", "comparison_table", "config_differences", "config_table",
    "downstream_figure", "downstream_scores", "find_run_dirs", "flatten", "load_run", "load_runs", "load_wandb_runs",
    "metric_columns", "perplexity_figure", "plot_downstream", "plot_perplexity", "print_comparison", "print_config_table",
    "print_table", "run_labels", "terminal_width", "to_markdown", "wandb_filters", "write_outputs",
]
