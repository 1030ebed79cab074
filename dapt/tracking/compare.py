"""``dapt compare``: many runs side by side, as a table, CSV/Markdown for papers, and plots.

Sources (any mix):
* a sweep folder (``multirun/<experiment>/<time>``), an ``outputs/`` tree, or run folders: each run
  folder holding ``results.json`` (or ``failure.json`` / ``.hydra/config.yaml`` for failed and
  unfinished jobs) is one row. Histories come from ``csv/metrics.csv`` (the CSV logger), else from
  the offline W&B run file (``wandb/offline-run-*/run-*.wandb``, decoded by ``wandb_offline``).
* a W&B ``entity/project`` (online: the W&B public API, with ``--filter`` turned into API filters).

The table has one row per run: status, the config keys whose values differ between the runs, then
metrics (``--metrics`` picks them, ``--sort`` orders rows). Runs with missing metrics show blanks.
Plots: perplexity curves per run (domain and general held-out sets) and downstream scores as
mean ± std over fine-tuning seeds (before = the base model, after = the adapted one).

Everything here is a plain function of a list of ``Run``s, so ``notebooks/compare_runs.ipynb`` uses
the same code: ``runs = load_runs([...]); table = comparison_table(runs)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dapt.errors import DaptError

# Metrics shown by default, in this order, when present (``--metrics all`` shows every metric).
# Test perplexities come with their 95% CI bounds (bootstrap over documents); "vs_control" columns
# read DAPT against the control arm (same steps on general text).
DEFAULT_METRICS = (
    "domain_dev_ppl_after", "domain_ppl_before", "domain_ppl_after", "domain_ppl_after_ci_low", "domain_ppl_after_ci_high",
    "domain_ppl_change", "domain_ppl_change_vs_control", "general_ppl_after", "general_ppl_after_ci_low",
    "general_ppl_after_ci_high", "forgetting", "forgetting_vs_control", "tokens_per_s", "train_tokens", "steps",
)
# Config keys that differ between runs for bookkeeping reasons only (never shown as differences).
IGNORED_CONFIG_PREFIXES = ("paths.", "hydra_job", "_wandb", "logger.wandb.name", "hydra.")
CURVE_KEYS = ("val/domain/ppl", "val/general/ppl")
WANDB_PROJECT = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Run:
    """One run as ``dapt compare`` sees it."""

    name: str
    path: Path | None = None
    status: str = "ok"  # ok | failed | incomplete
    config: dict[str, Any] = field(default_factory=dict)  # flattened: "optimizer.lr" -> 1e-4
    metrics: dict[str, Any] = field(default_factory=dict)  # flat scalars (results.json "metrics")
    downstream: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    _history: Any = None  # pandas DataFrame (step + metric columns), loaded lazily
    _history_loader: Any = None

    @property
    def history(self) -> Any:
        """Metric history as a DataFrame with a ``step`` column (empty when the run logged none)."""
        if self._history is None:
            import pandas as pd

            self._history = self._history_loader() if self._history_loader else pd.DataFrame()
        return self._history


# ----------------------------------------------------------------------------- loading local runs

def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists become JSON strings (one comparable value)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, dict):
        if prefix:
            out[prefix] = "{}"
    elif isinstance(tree, (list, tuple)):
        out[prefix] = json.dumps(list(tree), default=str)
    else:
        out[prefix] = tree
    return out


def is_run_dir(path: Path) -> bool:
    return (path / "results.json").is_file() or (path / "failure.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(root: Path) -> list[Path]:
    """Run folders at or below ``root`` (a run's own subfolders, e.g. ``model/``, are not searched)."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in ("wandb", "csv", "model", "checkpoints", "compare"))
    return sorted(found, key=_natural_key)


def _natural_key(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def _read_json(path: Path) -> dict[str, Any]:
    """A run file's object ({} when absent or unparseable); any other JSON value is the user's to fix."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        raise DaptError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _hydra_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        raw = flatten(OmegaConf.to_container(cfg, resolve=False) or {})
    except Exception:  # noqa: BLE001 - a damaged config only loses the config columns
        return {}
    # Resolve what resolves offline (``dapt_${data.name}``); keep Hydra-only interpolations as text.
    resolved: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, str) and "${" in value:
            try:
                value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
                value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except Exception:  # noqa: BLE001
                pass
        resolved[key] = value
    return resolved


def _csv_history(path: Path) -> Any:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception:  # noqa: BLE001 - empty or torn file
        return pd.DataFrame()
    if "step" not in frame.columns:
        return pd.DataFrame()
    # Lightning writes one row per logging call; merge rows of the same step.
    return frame.groupby("step", as_index=False).last().sort_values("step").reset_index(drop=True)


def _wandb_history(run_dir: Path) -> Any:
    import pandas as pd

    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    files = offline_runs(run_dir)
    if not files:
        return pd.DataFrame()
    try:
        rows = read_offline_run(files[-1]).history
    except Exception:  # noqa: BLE001
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    if "trainer/global_step" in frame.columns:
        frame = frame.rename(columns={"trainer/global_step": "step"})
    if "step" not in frame.columns:
        return pd.DataFrame()
    return frame.groupby("step", as_index=False).last().sort_values("step").reset_index(drop=True)


def _history_loader(run_dir: Path) -> Any:
    csv = run_dir / "csv" / "metrics.csv"
    return (lambda: _csv_history(csv)) if csv.is_file() else (lambda: _wandb_history(run_dir))


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics_from_results(results: dict[str, Any]) -> dict[str, Any]:
    metrics = results.get("metrics")
    if isinstance(metrics, dict):
        return {k: v for k, v in metrics.items() if _scalar(v)}
    from dapt.train import flat_metrics  # older results.json without "metrics"

    return {k: v for k, v in flat_metrics(results).items() if _scalar(v)}


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """Read one run folder; anything missing is left blank."""
    results = _read_json(run_dir / "results.json")
    failure = _read_json(run_dir / "failure.json")
    config = results["config"] if isinstance(results.get("config"), dict) else _hydra_config(run_dir)
    late = results.get("error") if isinstance(results.get("error"), dict) else None  # a stage after training failed
    if late:
        status, failure = "failed", {"error": f"{late.get('stage')}: {late.get('type', 'Error')}", "message": late.get("message", "")}
    elif results:
        status = "ok"
    elif failure:
        status = "failed"
    else:
        status = "incomplete"
    metrics = _metrics_from_results(results) if results else {}
    if not metrics and not results:
        metrics = _offline_summary(run_dir)
    return Run(
        name=name or run_dir.name,
        path=run_dir,
        status=status,
        config=flatten(config) if results.get("config") else config,
        metrics=metrics,
        downstream=results.get("downstream") or {},
        error=f"{failure.get('error', 'Error')}: {failure.get('message', '')}".strip() if failure else None,
        _history_loader=_history_loader(run_dir),
    )


def _offline_summary(run_dir: Path) -> dict[str, Any]:
    """Scalars of a run's offline W&B summary (a job that died before writing results.json)."""
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    files = offline_runs(run_dir)
    if not files:
        return {}
    try:
        summary = read_offline_run(files[-1]).summary
    except Exception:  # noqa: BLE001
        return {}
    return {k: v for k, v in summary.items() if not k.startswith("_") and _scalar(v)}


# ----------------------------------------------------------------------------- W&B projects

def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parse_filters(filters: Sequence[str]) -> list[tuple[str, Any]]:
    out = []
    for item in filters:
        if "=" not in item:
            raise DaptError(f"--filter {item!r}: expected key=value (e.g. masking.rate=0.15, group=dapt_biomed, status=ok)")
        key, value = item.split("=", 1)
        out.append((key.strip(), _parse_value(value.strip())))
    return out


def wandb_filters(filters: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``key=value`` filters as a W&B API (MongoDB-style) filter."""
    direct = {"group": "group", "job_type": "jobType", "state": "state", "name": "display_name", "sweep": "sweep"}
    clauses = []
    for key, value in filters:
        if key == "tag" or key == "tags":
            clauses.append({"tags": {"$in": [value]}})
        elif key in direct:
            clauses.append({direct[key]: value})
        elif key.startswith(("summary.", "summary_metrics.")):
            clauses.append({f"summary_metrics.{key.split('.', 1)[1]}": value})
        else:
            clauses.append({f"config.{key.removeprefix('config.')}": value})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def load_wandb_runs(project: str, filters: Sequence[tuple[str, Any]] = (), api: Any = None) -> list[Run]:
    """Runs of W&B ``entity/project`` through the public API (needs network and an API key)."""
    if api is None:
        import wandb

        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            raise DaptError(
                f"reading W&B project '{project}' needs network access and a W&B login (WANDB_API_KEY or `wandb login`); "
                "offline, pass sweep or run folders instead (or `wandb sync` them first)"
            )
        try:
            api = wandb.Api(timeout=30)
        except Exception as exc:  # noqa: BLE001
            raise DaptError(f"cannot reach the W&B API for '{project}': {exc}") from exc
    try:
        remote = list(api.runs(project, filters=wandb_filters(filters) or None))
    except Exception as exc:  # noqa: BLE001 - wandb raises CommError/ValueError/HTTP errors
        raise DaptError(f"cannot list W&B runs of '{project}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    runs = []
    for r in remote:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        summary = getattr(r.summary, "_json_dict", None) or dict(r.summary)
        state = getattr(r, "state", "finished")
        runs.append(Run(
            name=getattr(r, "name", None) or r.id,
            status={"finished": "ok", "failed": "failed", "crashed": "failed"}.get(state, state),
            config=flatten(_unflatten_wandb(config)),
            metrics={k: v for k, v in summary.items() if not k.startswith("_") and _scalar(v)},
            _history_loader=_remote_history(r),
        ))
    return runs


def _netrc_has_wandb() -> bool:
    try:
        import netrc

        return any("wandb" in host for host in netrc.netrc().hosts)
    except Exception:  # noqa: BLE001
        return False


def _unflatten_wandb(config: dict[str, Any]) -> dict[str, Any]:
    """W&B keeps nested config as dicts, but sweep parameters as dotted keys: merge both into a tree."""
    tree: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"value"}:
            value = value["value"]
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return tree


def _remote_history(run: Any) -> Any:
    def load() -> Any:
        import pandas as pd

        try:
            frame = run.history(keys=list(CURVE_KEYS), x_axis="trainer/global_step", pandas=True)
        except Exception:  # noqa: BLE001
            return pd.DataFrame()
        if "trainer/global_step" in frame.columns:
            frame = frame.rename(columns={"trainer/global_step": "step"})
        return frame if "step" in frame.columns else pd.DataFrame()

    return load


# ----------------------------------------------------------------------------- selecting runs

def load_runs(sources: Sequence[str | Path], filters: Sequence[str] = (), api: Any = None) -> list[Run]:
    """Runs from folders and/or W&B projects, filtered by ``key=value`` on config, metrics or status."""
    if not sources:
        raise DaptError("no runs given: pass a sweep folder, run folders, or a W&B entity/project")
    parsed = _parse_filters(filters)
    runs: list[Run] = []
    dirs: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.exists():
            if not path.is_dir():
                raise DaptError(f"{path} is not a folder (pass a sweep folder or run folders)")
            found = find_run_dirs(path)
            if not found:
                raise DaptError(f"no dapt runs in {path} (a run folder holds results.json, failure.json or .hydra/config.yaml)")
            dirs += found
        elif WANDB_PROJECT.match(str(source)):
            runs += load_wandb_runs(str(source), parsed, api=api)
        else:
            raise DaptError(f"{source}: no such folder (and not a W&B entity/project)")
    names = _short_names(dirs)
    runs = [load_run(d, n) for d, n in zip(dirs, names)] + runs
    selected = [r for r in runs if all(_matches(r, k, v) for k, v in parsed)]
    if not selected:
        raise DaptError(f"none of the {len(runs)} runs match the filters {' '.join(filters)}")
    return selected


def _short_names(dirs: list[Path]) -> list[str]:
    """Run labels: paths relative to the folder that holds them all (``0``, ``1``, ... for a sweep)."""
    if not dirs:
        return []
    resolved = [d.resolve() for d in dirs]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath([str(d) for d in resolved]))
    return [str(d.relative_to(common)) or d.name for d in resolved]


_WANDB_SIDE_KEYS = ("group", "job_type", "state", "tag", "tags", "sweep")


def _matches(run: Run, key: str, value: Any) -> bool:
    """Does ``run`` pass the filter ``key=value``? (W&B-only keys were applied by the API already.)"""
    if key == "status":
        return run.status == str(value)
    if key == "name":
        return run.name == str(value)
    if key in _WANDB_SIDE_KEYS and run.path is None:
        return True
    if key == "group":
        return str(run.config.get("logger.wandb.group") or run.config.get("experiment_name")) == str(value)
    if key == "job_type":
        key = "logger.wandb.job_type"
    elif key in ("tag", "tags"):
        return str(value) in json.loads(run.config.get("tags") or "[]")
    key = key.removeprefix("config.")
    actual = run.config.get(key, run.metrics.get(key))
    if actual is None:
        return value is None
    if _scalar(actual) and _scalar(value):
        return math.isclose(float(actual), float(value), rel_tol=1e-9, abs_tol=1e-12)
    return str(actual) == str(value)


# ----------------------------------------------------------------------------- the table

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
) -> Any:
    """One row per run: ``run``, ``status``, differing config keys, metrics (blank when missing)."""
    import pandas as pd

    keys = list(config_keys) if config_keys is not None else config_differences(runs)
    columns = metric_columns(runs, metrics)
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "status": run.status}
        for key in keys:
            value = run.config.get(key)
            row[key] = value if not isinstance(value, (dict, list)) else json.dumps(value)
        for key in columns:
            row[key] = run.metrics.get(key)
        if any(r.error for r in runs):
            row["error"] = (run.error or "")[:120]
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["run", "status", *keys, *columns, *(["error"] if any(r.error for r in runs) else [])])
    for key in columns:
        frame[key] = pd.to_numeric(frame[key], errors="coerce")
    if sort:
        if sort not in frame.columns:
            raise DaptError(f"cannot sort by '{sort}': not a column (columns: {', '.join(frame.columns)})")
        frame = frame.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    return frame.reset_index(drop=True)


def average_over_seeds(table: Any, runs: Sequence[Run], seed_key: str = "seed") -> Any:
    """Collapse runs that differ only in ``seed_key``: metric means plus ``<metric> std`` columns."""
    import pandas as pd

    config_cols = [c for c in table.columns if c not in ("run", "status", "error") and c != seed_key and c in config_differences(runs)]
    metric_cols = [c for c in table.columns if c not in ("run", "status", "error", seed_key, *config_cols)]
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return table.iloc[0:0]
    groups = ok.groupby(config_cols, dropna=False, sort=False) if config_cols else [((), ok)]
    rows = []
    for values, part in groups:
        values = values if isinstance(values, tuple) else (values,)
        row: dict[str, Any] = {"runs": len(part), **dict(zip(config_cols, values))}
        for col in metric_cols:
            series = pd.to_numeric(part[col], errors="coerce")
            row[col] = series.mean()
            row[f"{col} std"] = series.std(ddof=1) if series.count() > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e12:
            return f"{int(value):,}" if abs(value) >= 1e4 else str(int(value))
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def to_markdown(table: Any) -> str:
    """A GitHub/pandoc pipe table (blank cells for missing values); no extra dependency."""
    header = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if _numeric(table[c]) else "---" for c in table.columns) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row.tolist()) + " |")
    return "\n".join(lines) + "\n"


def _numeric(series: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(series))


def print_table(table: Any, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    out = Table(title=title or None)
    for col in table.columns:
        out.add_column(str(col), justify="right" if _numeric(table[col]) else "left", overflow="fold")
    for _, row in table.iterrows():
        out.add_row(*(_fmt(v) for v in row.tolist()))
    Console(width=max(120, min(250, 18 * len(table.columns)))).print(out)


# ----------------------------------------------------------------------------- plots

def _plt() -> Any:
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def run_labels(runs: Sequence[Run], sep: str = ", ") -> dict[str, str]:
    """``name: key=value, ...`` over the config keys that differ (plot legends and ticks)."""
    diffs = config_differences(runs)
    labels = {}
    for run in runs:
        parts = [f"{k.split('.')[-1]}={_fmt(run.config.get(k))}" for k in diffs if k in run.config]
        labels[run.name] = f"{run.name}: {sep.join(parts)}" if parts else run.name
    return labels


def plot_perplexity(runs: Sequence[Run], path: str | Path, keys: Sequence[str] = CURVE_KEYS) -> Path | None:
    """Held-out perplexity against step, one line per run, one panel per held-out set."""
    plt = _plt()
    curves = [(run, run.history) for run in runs]
    labels = run_labels(runs)
    keys = [k for k in keys if any(k in h.columns for _, h in curves if not h.empty)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run, hist in curves:
            if hist.empty or key not in hist.columns:
                continue
            part = hist[["step", key]].dropna()
            if not part.empty:
                ax.plot(part["step"], part[key], marker="o", markersize=3, label=labels[run.name])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def downstream_scores(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Long table of downstream scores: run, task, metric, stage (before/after), mean, std, n, values."""
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
                values = [v for v in cell.get("values") or [] if _scalar(v)]
                std = cell.get("std")
                if std is None and len(values) > 1:
                    mean = sum(values) / len(values)
                    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                rows.append({"run": run.name, "task": task, "metric": score, "stage": stage, "mean": float(cell["mean"]),
                             "std": float(std) if std is not None else 0.0, "n": len(values) or None, "values": values})
    return rows


def plot_downstream(runs: Sequence[Run], path: str | Path) -> Path | None:
    """Downstream scores per task: bars per run, before vs after, error bars = std over seeds, dots = seeds."""
    rows = downstream_scores(runs)
    if not rows:
        return None
    plt = _plt()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = run_labels(runs, sep="\n")
    names = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.5, 1.2 * len(names) + 2) * len(tasks), 4), squeeze=False)
    width = 0.38
    for ax, task in zip(axes[0], tasks):
        metric = next(r["metric"] for r in rows if r["task"] == task)
        for i, stage in enumerate(("before", "after")):
            cells = {r["run"]: r for r in rows if r["task"] == task and r["stage"] == stage}
            xs = [j + (i - 0.5) * width for j, n in enumerate(names) if n in cells]
            if not xs:
                continue
            means = [cells[n]["mean"] for n in names if n in cells]
            stds = [cells[n]["std"] for n in names if n in cells]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=stage, alpha=0.85)
            for x, n in zip(xs, [n for n in names if n in cells]):  # every seed as a dot
                ax.scatter([x] * len(cells[n]["values"]), cells[n]["values"], s=8, color="black", zorder=3)
        task_rows = [r for r in rows if r["task"] == task]
        lo = min(min([r["mean"] - r["std"], *r["values"]]) for r in task_rows)
        hi = max(max([r["mean"] + r["std"], *r["values"]]) for r in task_rows)
        pad = max((hi - lo) * 0.4, 0.01)
        ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)  # zoom on the differences
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([labels.get(n, n) for n in names], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{task}: {metric} (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- writing everything

def write_outputs(runs: Sequence[Run], table: Any, out_dir: str | Path, *, plots: bool = True) -> dict[str, Path]:
    """``runs.csv``, ``runs.md`` and (with ``plots``) ``ppl_curves.png`` / ``downstream.png``."""
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dapt compare",
        description="Compare dapt runs: a table (config differences + metrics), CSV/Markdown, and plots.",
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
    if args.format == "csv":
        print(table.to_csv(index=False), end="")
    elif args.format == "markdown":
        print(to_markdown(table), end="")
    else:
        failed = sum(r.status != "ok" for r in runs)
        print_table(table, title=f"{len(runs)} runs" + (f" ({failed} failed or unfinished)" if failed else ""))
        for kind, path in written.items():
            print(f"{kind}: {path}")
    return 0
