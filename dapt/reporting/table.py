"""The comparison as pandas frames: one row per run, short run labels, config differences, seed means.

Flattening (nested results/config -> dotted keys) and aggregation (mean, ``std(ddof=1)`` over seeds)
are pandas' own (``json_normalize``, ``groupby``), so the numbers here are the ones a user gets by
loading ``runs.csv`` into pandas. Runs are named for people by ``run_labels``: a short, unique label
(W&B run name, else the Hydra overrides that tell the run apart, else its folder) instead of every
differing config key, which made earlier tables and legends unreadable for heterogeneous runs; the
differing config keys get their own table (``config_table``).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Sequence

import pandas as pd

from dapt.errors import DaptError

if TYPE_CHECKING:
    from dapt.reporting.runs import Run

# Metrics shown by default, in this order, when present (``--metrics all`` shows every metric).
# Test perplexities come with their 95% CI bounds (bootstrap over documents); "vs_control" columns
# read DAPT against the control arm (same steps on general text).
DEFAULT_METRICS = (
    "domain_dev_ppl_after", "domain_ppl_before", "domain_ppl_after", "domain_ppl_after_ci_low", "domain_ppl_after_ci_high",
    "domain_ppl_change", "domain_ppl_change_ci_low", "domain_ppl_change_ci_high",
    "domain_ppl_change_vs_control", "domain_ppl_change_vs_control_ci_low", "domain_ppl_change_vs_control_ci_high",
    "general_ppl_after", "general_ppl_after_ci_low", "general_ppl_after_ci_high",
    "forgetting", "forgetting_ci_low", "forgetting_ci_high",
    "forgetting_vs_control", "forgetting_vs_control_ci_low", "forgetting_vs_control_ci_high", "tokens_per_s", "train_tokens", "steps",
)
# Config keys that differ between runs for bookkeeping reasons only (never shown as differences).
IGNORED_CONFIG_PREFIXES = ("paths.", "hydra_job", "_wandb", "logger.wandb.name", "hydra.")
LABEL_WIDTH = 28  # longest run label; the rest of a run's identity is in the config table


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON strings (one comparable value)."""
    if not tree:
        return {}
    row = pd.json_normalize(tree, sep=".").to_dict(orient="records")[0]
    return {k: json.dumps(list(v), default=str) if isinstance(v, (list, tuple)) else v for k, v in row.items()}


def config_differences(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values are not the same in every run (in first-seen order)."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.config))
    diffs = []
    for key in keys:
        if key.startswith(IGNORED_CONFIG_PREFIXES):
            continue
        values = {json.dumps(run.config[key], default=str, sort_keys=True) if key in run.config else "<missing>" for run in runs}
        if len(values) > 1:
            diffs.append(key)
    return diffs


# ----------------------------------------------------------------------------- short labels

def _shorten(text: str, width: int, *, keep_end: bool = False) -> str:
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if keep_end else text[: width - 1] + "…"


def _override_label(run: Run, common: set[str], others_have_some: bool, width: int) -> str:
    """The run's overrides that other runs do not share (``masking.rate=0.3``), shortened to ``width``;
    ``defaults`` for a run started without overrides next to runs that had some."""
    if run.overrides is None:
        return ""
    own = [o.lstrip("+~") for o in run.overrides if o not in common]
    own = [o for o in own if not o.startswith(IGNORED_CONFIG_PREFIXES)]
    if not own:
        return "defaults" if not run.overrides and others_have_some else ""
    full = ",".join(own)
    if len(full) <= width:
        return full
    short = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" if "=" in o else o for o in own for k, _, v in [o.partition("=")])
    return _shorten(short, width)


def run_labels(runs: Sequence[Run], width: int = LABEL_WIDTH) -> dict[str, str]:
    """``run.name -> label``: short and unique; W&B run name, else distinguishing overrides, else folder."""
    common = set.intersection(*(set(r.overrides or ()) for r in runs)) if runs else set()
    some = [bool(r.overrides) for r in runs]
    labels: dict[str, str] = {}
    for i, run in enumerate(runs):
        others_have_some = any(some[:i] + some[i + 1:])
        label = run.wandb_name or _override_label(run, common, others_have_some, width) or (run.path.name if run.path else run.name)
        labels[run.name] = _shorten(str(label), width)
    counts = pd.Series(list(labels.values())).value_counts()
    for run in runs:  # clashes (two sweeps' "0"): the unique relative path, kept from its end
        if counts[labels[run.name]] > 1:
            labels[run.name] = _shorten(run.name, width, keep_end=True)
    seen: dict[str, int] = {}
    for name, label in labels.items():  # still equal after shortening: number them
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[name] = f"{_shorten(label, width - 3)}#{seen[label]}"
    return labels


# ----------------------------------------------------------------------------- frames

def _downstream_metrics(runs: Sequence[Run]) -> list[str]:
    keys: dict[str, None] = {}
    for run in runs:
        for key in run.metrics:
            if key.startswith("downstream/") and (key.endswith("/mean") and "/after/" in key or key.endswith("/delta") or key.endswith("/p_value")):
                keys[key] = None
    return list(keys)


def metric_columns(runs: Sequence[Run], metrics: Sequence[str] | str | None = None) -> list[str]:
    """Which metric columns to show: the given ones, ``"all"``, or the defaults present in any run."""
    present: dict[str, None] = {}
    for run in runs:
        present.update(dict.fromkeys(run.metrics))
    if metrics == "all":
        return list(present)
    if metrics:
        return list(metrics)  # asked-for metrics missing in a run show as blanks
    return [m for m in DEFAULT_METRICS if m in present] + _downstream_metrics(runs)


def comparison_table(
    runs: Sequence[Run],
    *,
    metrics: Sequence[str] | str | None = None,
    sort: str | None = None,
    descending: bool = False,
    config_keys: Sequence[str] | None = None,
) -> pd.DataFrame:
    """One row per run: ``run`` (its label), ``status``, differing config keys, metrics (NaN when missing)."""
    keys = list(config_keys) if config_keys is not None else config_differences(runs)
    columns = metric_columns(runs, metrics)
    labels = run_labels(runs)
    errors = any(r.error for r in runs)
    frame = pd.DataFrame({
        "run": [labels[r.name] for r in runs],
        "status": [r.status for r in runs],
        **{k: [_cell(r.config.get(k)) for r in runs] for k in keys},
        **{m: pd.to_numeric(pd.Series([r.metrics.get(m) for r in runs], dtype=object), errors="coerce") for m in columns},
        **({"error": [(r.error or "")[:120] for r in runs]} if errors else {}),
    })
    if sort:
        if sort not in frame.columns:
            raise DaptError(f"cannot sort by '{sort}': not a column (columns: {', '.join(frame.columns)})")
        frame = frame.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def config_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Label -> the value of every config key that differs between the runs (blank: key absent)."""
    labels = run_labels(runs)
    keys = config_differences(runs)
    return pd.DataFrame({"run": [labels[r.name] for r in runs], **{k: [_cell(r.config.get(k)) for r in runs] for k in keys}})


def average_over_seeds(table: pd.DataFrame, runs: Sequence[Run], seed_key: str = "seed") -> pd.DataFrame:
    """Collapse runs that differ only in ``seed_key``: metric means plus ``<metric> std`` (ddof=1) columns."""
    diffs = set(config_differences(runs))
    config_cols = [c for c in table.columns if c not in ("run", "status", "error", seed_key) and c in diffs]
    metric_cols = [c for c in table.columns if c not in ("run", "status", "error", seed_key, *config_cols)]
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return table.iloc[0:0]
    values = ok[metric_cols].apply(pd.to_numeric, errors="coerce")
    keys = [ok[c] for c in config_cols] if config_cols else [pd.Series(0, index=ok.index)]
    grouped = values.groupby(keys, dropna=False, sort=False)
    means, stds = grouped.mean(), grouped.std(ddof=1)  # one run: std is NaN (blank), not 0
    out = pd.DataFrame({"runs": grouped.size()})
    for col in metric_cols:
        out[col], out[f"{col} std"] = means[col], stds[col]
    out = out.reset_index(drop=not config_cols)
    return out[["runs", *config_cols, *[c for m in metric_cols for c in (m, f"{m} std")]]]


def downstream_scores(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Long table of downstream scores: run (label), task, metric, stage (before/after), mean, std, n, values."""
    labels = run_labels(runs)
    rows = []
    for run in runs:
        for task, entry in (run.downstream or {}).items():
            if not isinstance(entry, dict):
                continue
            score = _primary_score(entry)
            if score is None:
                continue
            for stage in ("before", "after"):
                cell = (entry.get(stage) or {}).get(score)
                if not isinstance(cell, dict) or cell.get("mean") is None:
                    continue
                values = [v for v in cell.get("values") or [] if isinstance(v, (int, float)) and not isinstance(v, bool)]
                std = cell.get("std")
                if std is None and len(values) > 1:
                    std = float(pd.Series(values).std(ddof=1))
                rows.append({"run": labels[run.name], "task": task, "metric": score, "stage": stage, "mean": float(cell["mean"]),
                             "std": float(std) if std is not None else 0.0, "n": len(values) or None, "values": values})
    return rows


def _primary_score(entry: dict[str, Any]) -> str | None:
    """The main score of a downstream task entry: ``test_<task metric>``, else test F1, else the first."""
    after = entry.get("after") or entry.get("before") or {}
    names = [k for k, v in after.items() if isinstance(v, dict) and "mean" in v]
    if entry.get("metric") and f"test_{entry['metric']}" in names:  # the task's own main metric
        return f"test_{entry['metric']}"
    for preferred in ("test_f1", "test_macro_f1", "test_micro_f1", "dev_f1"):
        if preferred in names:
            return preferred
    f1 = [n for n in names if "f1" in n]
    return (f1 or names or [None])[0]


# ----------------------------------------------------------------------------- text

def fmt(value: Any) -> str:
    """A cell as text: blank for missing, thousands separators, 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e12:
            return f"{int(value):,}" if abs(value) >= 1e4 else str(int(value))
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def is_numeric(series: pd.Series) -> bool:
    return bool(pd.api.types.is_numeric_dtype(series))


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub/pandoc pipe table (blank cells for missing values); every column, for papers."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if is_numeric(table[c]) else "---" for c in table.columns) + "|"]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"
