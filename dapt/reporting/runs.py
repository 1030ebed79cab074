"""Finding and loading the runs ``dapt compare`` puts side by side, from any mix of sources.

* a sweep folder (``multirun/<experiment>/<time>``), an ``outputs/`` tree, or run folders: each run
  folder holding ``results.json`` (or ``failure.json`` / ``.hydra/config.yaml`` for failed and
  unfinished jobs) is one run. Histories come from ``csv/metrics.csv`` (the CSV logger), else from
  the offline W&B run file (``wandb/offline-run-*/run-*.wandb``, decoded by ``wandb_offline``).
* a W&B ``entity/project`` (online: the W&B public API, ``wandb_api``, with ``--filter`` turned into
  API filters).

Loading is kept apart from the table and the plots so that every source ends up as the same plain
``Run`` (flattened config, scalar metrics, lazy history): what is shown never depends on where a run
came from. A run also keeps what names it for people (its W&B run name, its Hydra overrides), from
which ``table.run_labels`` makes the short labels used everywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dapt import metric_names
from dapt.errors import DaptError
from dapt.io import read_json_object
from dapt.reporting.table import flatten

CURVE_KEYS = tuple(metric_names.heldout(metric_names.DEV_LOOP, name, "ppl") for name in ("domain", "general"))
WANDB_PROJECT = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class Run:
    """One run as ``dapt compare`` sees it."""

    name: str  # unique: the run folder relative to the folder holding all runs, or the W&B run name/id
    path: Path | None = None
    status: str = "ok"  # ok | failed | incomplete
    config: dict[str, Any] = field(default_factory=dict)  # flattened: "optimizer.lr" -> 1e-4
    metrics: dict[str, Any] = field(default_factory=dict)  # flat scalars (results.json "metrics")
    downstream: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    wandb_name: str | None = None  # W&B display name (API runs, or logger.wandb.name)
    overrides: list[str] | None = None  # Hydra command-line overrides (.hydra/overrides.yaml); None: not recorded
    heldout_sets: dict[str, Any] = field(default_factory=dict)  # results.json "heldout_sets" (what the perplexities were scored on)
    _history: Any = None  # pandas DataFrame (step + metric columns), loaded lazily
    _history_loader: Any = None

    @property
    def history(self) -> Any:
        """Metric history as a DataFrame with a ``step`` column (empty when the run logged none)."""
        if self._history is None:
            import pandas as pd

            self._history = self._history_loader() if self._history_loader else pd.DataFrame()
        return self._history


# ----------------------------------------------------------------------------- local run folders

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


def _hydra_overrides(run_dir: Path) -> list[str] | None:
    """The run's command-line overrides (``masking.rate=0.3``); None when Hydra recorded none."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        import yaml

        items = yaml.safe_load(path.read_text())
    except Exception:  # noqa: BLE001 - a label source only
        return None
    return [str(o) for o in items or [] if isinstance(o, (str, int, float))]


def frame_by_step(frame: Any) -> Any:
    import pandas as pd

    if "trainer/global_step" in frame.columns and "step" not in frame.columns:
        frame = frame.rename(columns={"trainer/global_step": "step"})
    if "step" not in frame.columns:
        return pd.DataFrame()
    # Loggers write one row per logging call; merge rows of the same step.
    return frame.groupby("step", as_index=False).last().sort_values("step").reset_index(drop=True)


def _csv_history(path: Path) -> Any:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception:  # noqa: BLE001 - empty or torn file
        return pd.DataFrame()
    return frame_by_step(frame)


def _segment_order(path: Path) -> tuple[str, int, str]:
    """Sort key of an offline run file ``wandb/offline-run-YYYYMMDD_HHMMSS-<id>[-N]/run-<id>.wandb``:
    (timestamp, N) from the folder name (wandb names a second folder started in the same second
    ``...-<id>-1``). Not the mtime: cp and rsync scramble it."""
    folder, name = path.parent.name, path.name
    run_id = name[len("run-"):-len(".wandb")] if name.startswith("run-") and name.endswith(".wandb") else ""
    match = re.match(r"offline-run-(\d{8}_\d{6})-(.*)$", folder)
    if not match:
        return ("", 0, str(path))
    stamp, rest = match.groups()
    counter = 0
    if run_id and rest.startswith(run_id + "-") and rest[len(run_id) + 1:].isdigit():
        counter = int(rest[len(run_id) + 1:])
    return (stamp, counter, str(path))


def _offline_segments(run_dir: Path) -> list[Any]:
    """Every readable offline W&B file of a run, oldest first (by the timestamp in the folder name). One
    run can have several: each resumed attempt writes a file of its own, and all of them are merged."""
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    segments = []
    for path in sorted(offline_runs(run_dir), key=_segment_order):
        try:
            segments.append(read_offline_run(path))
        except Exception:  # noqa: BLE001 - an empty or torn file holds nothing to show
            continue
    return segments


def _wandb_history(run_dir: Path) -> Any:
    import pandas as pd

    rows = [row for segment in _offline_segments(run_dir) for row in segment.history]
    return frame_by_step(pd.DataFrame(rows)) if rows else pd.DataFrame()


def _history_loader(run_dir: Path) -> Any:
    csv = run_dir / "csv" / "metrics.csv"
    return (lambda: _csv_history(csv)) if csv.is_file() else (lambda: _wandb_history(run_dir))


def is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics_from_results(results: dict[str, Any]) -> dict[str, Any]:
    metrics = results.get("metrics")
    if isinstance(metrics, dict):
        return {k: v for k, v in metrics.items() if is_scalar(v)}
    from dapt.pipeline.results import flat_metrics  # older results.json without "metrics"

    return {k: v for k, v in flat_metrics(results).items() if is_scalar(v)}


def load_run(run_dir: Path, name: str | None = None) -> Run:
    """Read one run folder; anything missing is left blank."""
    results = read_json_object(run_dir / "results.json")
    failure = read_json_object(run_dir / "failure.json")
    config = flatten(results["config"]) if isinstance(results.get("config"), dict) and results["config"] else _hydra_config(run_dir)
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
        config=config,
        metrics=metrics,
        downstream=results.get("downstream") or {},
        error=f"{failure.get('error', 'Error')}: {failure.get('message', '')}".strip() if failure else None,
        wandb_name=config.get("logger.wandb.name") or None,
        overrides=_hydra_overrides(run_dir),
        heldout_sets=results.get("heldout_sets") or {},
        _history_loader=_history_loader(run_dir),
    )


def _offline_summary(run_dir: Path) -> dict[str, Any]:
    """Scalars of a run's offline W&B summary (a job that died before writing results.json), merged
    over its files (later files win)."""
    summary: dict[str, Any] = {}
    for segment in _offline_segments(run_dir):
        summary.update(segment.summary)
    return {k: v for k, v in summary.items() if not k.startswith("_") and is_scalar(v)}


# ----------------------------------------------------------------------------- filters

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
            from dapt.reporting.wandb_api import load_wandb_runs

            runs += load_wandb_runs(str(source), parsed, api=api)
        else:
            raise DaptError(f"{source}: no such folder (and not a W&B entity/project)")
    names = _relative_names(dirs)
    runs = [load_run(d, n) for d, n in zip(dirs, names)] + runs
    selected = [r for r in runs if all(_matches(r, k, v) for k, v in parsed)]
    if not selected:
        raise DaptError(f"none of the {len(runs)} runs match the filters {' '.join(filters)}")
    return selected


def _relative_names(dirs: list[Path]) -> list[str]:
    """Unique run names: paths relative to the folder that holds them all (``0``, ``1``, ... for a sweep)."""
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
    if is_scalar(actual) and is_scalar(value):
        return math.isclose(float(actual), float(value), rel_tol=1e-9, abs_tol=1e-12)
    return str(actual) == str(value)
