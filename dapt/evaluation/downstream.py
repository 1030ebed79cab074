"""Downstream evaluation of a DAPT run: every task × seed, for the base, control and adapted model.

``evaluate_downstream`` is what ``dapt train`` calls after adaptation (and ``dapt finetune`` reuses
through ``evaluate_models``): it fine-tunes the run's ``tasks`` from the base ("before"), the
optional control ("control": the same start given the same number of MLM steps on general text)
and the adapted ("after") checkpoints with the same seeds, aggregates mean/std with per-seed values,
compares after with before and after with control (paired t-test, CI, minimum detectable effect,
Holm correction over the whole table), logs to W&B and returns the JSON-ready dict that goes into
``results.json``. Without a control, a gain over the base cannot tell domain adaptation from
"more MLM steps of any text". Base and control scores come from the on-disk cache when the same
(model files, task, seed, hyperparameters, recipe and library versions) was already fine-tuned, so a
sweep pays for them once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from dapt.config import to_dataclass
from dapt.errors import ConfigError
from dapt.evaluation.cache import ResultCache, atomic_write_json, model_fingerprint, recipe_fingerprint, score_cache_key, task_fingerprint
from dapt.evaluation.finetuning import DownstreamConfig, finetune_seed, prepare
from dapt.evaluation.report import format_downstream_table, print_downstream_table
from dapt.evaluation.stats import aggregate_seeds, apply_holm, paired_comparison, summarize
from dapt.evaluation.tasks import METRICS, TaskConfig, TaskData, load_task, resolve_task
from dapt.precision import AUTO, on_cuda

__all__ = [
    "check_downstream",
    "evaluate_downstream",
    "evaluate_models",
    "format_downstream_table",
    "print_downstream_table",
    "downstream_config",
]

log = logging.getLogger(__name__)

# (key in a task entry, role compared, reference role). "" puts after - before at the entry's top
# level (the keys results.json always had); the control comparison nests under "vs_control".
COMPARISONS: tuple[tuple[str, str, str], ...] = (("", "after", "before"), ("vs_control", "after", "control"))
COMPARISON_KEYS = ("delta", "delta_std", "t", "p_value", "delta_ci", "mde", "n", "alpha", "margin", "p_holm", "holm_m",
                   "significant", "verdict")
ROLES = ("before", "control", "after", "model")


def downstream_config(cfg: Any) -> DownstreamConfig:
    """Validate the ``downstream`` group (unknown keys and bad values name ``downstream.<key>``)."""
    node = cfg.get("downstream") if isinstance(cfg, (DictConfig, Mapping)) else None
    dcfg = to_dataclass(DownstreamConfig, node or {}, prefix="downstream")
    trainer = cfg.get("trainer") if isinstance(cfg, (DictConfig, Mapping)) else None
    trainer_precision = trainer.get("precision") if isinstance(trainer, (DictConfig, Mapping)) else None
    same_device = trainer is not None and on_cuda(trainer.get("accelerator")) == on_cuda(dcfg.accelerator)
    if dcfg.precision == AUTO and trainer_precision not in (None, AUTO) and same_device:
        # Inside `dapt train`, `auto` fine-tunes in the precision the run trained in (validate() has
        # resolved it), so `trainer.precision=32-true` makes the whole run fp32. Fine-tunes on another
        # device (GPU training, CPU fine-tuning) resolve `auto` for their own device instead.
        dcfg.precision = str(trainer_precision)
    return dcfg


def _per_type(per_seed: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    names: list[str] = []
    for r in per_seed:
        for name in r["test"].get(key, {}):
            if name not in names:
                names.append(name)
    return {n: summarize([r["test"][key][n]["f1"] for r in per_seed if n in r["test"].get(key, {})]) for n in names}


def _run_model(
    role: str,
    source: str,
    data: TaskData,
    dcfg: DownstreamConfig,
    *,
    cache: ResultCache | None,
    data_dir: str | Path,
) -> dict[str, Any]:
    """Fine-tune ``source`` on ``data`` for every seed (or read the seeds from the cache)."""
    task = data.task
    per_seed: list[dict[str, Any]] = []
    keys: dict[int, str] = {}
    if cache is not None:
        model_fp = model_fingerprint(source)
        task_fp = task_fingerprint(task, data_dir)
        hp = dcfg.fingerprint()
        for seed in dcfg.seeds:
            keys[seed] = score_cache_key(model_fp=model_fp, task_fp=task_fp, seed=seed, hyperparameters=hp)
    prepared = None
    started = time.perf_counter()
    for seed in dcfg.seeds:
        result = cache.get(keys[seed]) if cache is not None else None
        if result is not None:
            result["cached"] = True
        else:
            if prepared is None:
                prepared = prepare(source, data, dcfg)
            result = finetune_seed(prepared, seed, dcfg)
            result["cached"] = False
            if cache is not None:
                cache.put(keys[seed], result, meta={"model": source, "task": task.name, "seed": seed, "hyperparameters": dcfg.fingerprint(),
                                                    "recipe_fingerprint": recipe_fingerprint()})
        per_seed.append(result)
        log.info(
            "[%s] %s seed %d: test %s %.4f (dev %.4f at epoch %d/%d, %s)",
            task.name, role, seed, task.metric, result["test"][task.metric], result["dev"].get(task.metric, float("nan")),
            result["best_epoch"], result["epochs_run"], "cached" if result["cached"] else f"{result['seconds']:.0f} s",
        )
    block: dict[str, Any] = {"model": source, "seeds": list(dcfg.seeds)}
    block.update(aggregate_seeds(per_seed, METRICS[task.type]))
    # The task's primary metric under one name for every task type, so a sweep objective such as
    # downstream/<task>/after/dev_score/mean works for NER (f1) and classification (micro/macro-F1).
    for split in ("dev", "test"):
        if f"{split}_{task.metric}" in block:
            block[f"{split}_score"] = block[f"{split}_{task.metric}"]
    block["test_per_type" if task.type == "ner" else "test_per_label"] = _per_type(per_seed, "per_type" if task.type == "ner" else "per_label")
    block["cached_seeds"] = [r["seed"] for r in per_seed if r["cached"]]
    block["seconds"] = round(time.perf_counter() - started, 1)
    block["per_seed"] = per_seed
    return block


def comparisons_of(entry: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The comparison dicts of one task entry: the entry itself (after - before) and ``vs_control``."""
    out: list[dict[str, Any]] = []
    for key, _, _ in COMPARISONS:
        node = entry.get(key) if key else (entry if "p_value" in entry else None)
        if isinstance(node, dict):
            out.append(node)
    return out


def _compare(entry: dict[str, Any], metric: str, dcfg: DownstreamConfig, task_name: str) -> None:
    """Add every comparison whose two roles were scored (per-seed pairs of the test metric)."""
    metric_key = f"test_{metric}"
    for key, role, reference in COMPARISONS:
        if role in entry and reference in entry:
            comparison = paired_comparison(entry[reference][metric_key]["values"], entry[role][metric_key]["values"],
                                           alpha=dcfg.alpha, margin=dcfg.equivalence_margin)
            if key:
                entry[key] = comparison
            else:
                entry.update(comparison)  # delta, delta_ci, mde, p_value, p_holm, significant, verdict, ...
            log.info("[%s] %s - %s %s: %+.4f", task_name, role, reference, metric, comparison["delta"] or 0.0)


def holm_over_table(results: Mapping[str, Any]) -> None:
    """Holm-correct every comparison in ``results`` (tasks x comparisons) as one family, in place."""
    apply_holm([c for entry in results.values() if isinstance(entry, Mapping) for c in comparisons_of(entry)])


def evaluate_models(
    tasks: Sequence[str | Mapping[str, Any] | TaskConfig],
    models: Mapping[str, str | None],
    dcfg: DownstreamConfig,
    *,
    data_dir: str | Path,
    cache_dir: str | Path | None,
    cached_roles: Sequence[str] = ("before", "control"),
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Fine-tune each model (``{role: source}``) on each task and compare the roles.

    Roles: ``before`` (base), ``control`` (general-text MLM for the same steps), ``after`` (adapted),
    or ``model`` alone. Each task entry gets the after - before comparison at its top level
    (``delta``, ``delta_ci``, ``mde``, ``p_value``, ``p_holm``, ``significant``, ``verdict``, ...) and,
    when a control was scored, the after - control one under ``vs_control``. Significance is decided
    on p-values Holm-adjusted over all comparisons of all tasks. Roles in ``cached_roles`` read/write
    the on-disk cache (when ``dcfg.cache``). Partial results are written to ``run_dir/downstream.json``
    after every task (Holm over the tasks finished so far), so a crash keeps finished tasks.
    """
    configs = [resolve_task(t) for t in tasks]  # fail on a bad task name before any compute
    names = [t.name for t in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks lists a task twice: {names}")
    unknown = sorted(set(models) - set(ROLES))
    if unknown:
        raise ConfigError(f"unknown model roles {unknown}; expected some of {list(ROLES)}")
    active = {role: models[role] for role in ROLES if models.get(role)}
    cache = ResultCache(cache_dir) if dcfg.cache and cache_dir else None
    results: dict[str, Any] = {}
    for task in configs:
        data = load_task(task, data_dir)
        # Hyperparameters are not repeated here: dapt train's results.json keeps the whole config,
        # dapt finetune's keeps them beside "downstream" (flattened metrics stay readable).
        entry: dict[str, Any] = {"type": task.type, "metric": task.metric, "budget": dcfg.budget}
        for role, source in active.items():
            entry[role] = _run_model(role, source, data, dcfg, cache=cache if role in cached_roles else None, data_dir=data_dir)
        _compare(entry, task.metric, dcfg, task.name)
        entry["notes"] = data.notes
        results[task.name] = entry
        holm_over_table(results)
        if run_dir is not None:
            atomic_write_json(Path(run_dir) / "downstream.json", results)
    for name, entry in results.items():
        for label, comparison in (("after - before", entry if "p_value" in entry else None), ("after - control", entry.get("vs_control"))):
            if comparison:
                log.info("[%s] %s: %s", name, label, comparison["verdict"])
    return results


def log_to_wandb(results: Mapping[str, Any], wandb_run: Any) -> None:
    """Summary keys ``downstream/<task>/test_<metric>/{mean,std}`` (the adapted model; the base under
    ``downstream/<task>/before/...``, the control under ``.../control/...``), the after - before
    comparison (``delta``, ``delta_ci_low``/``_high``, ``mde``, ``p_value``, ``p_holm``, ``significant``),
    the same under ``downstream/<task>/vs_control/...``, and a table of every per-seed score."""
    import wandb

    summary: dict[str, Any] = {}
    rows: list[list[Any]] = []
    for name, entry in results.items():
        prefix = f"downstream/{name}"
        metric = entry["metric"]
        for role in ROLES:
            block = entry.get(role)
            if not block:
                continue
            for key, value in block.items():
                if isinstance(value, dict) and "mean" in value and (key.startswith("test_") or key.startswith("dev_")):
                    for stat in ("mean", "std"):
                        summary[f"{prefix}/{role}/{key}/{stat}"] = value[stat]
                        if role in ("after", "model"):  # the run's own model gets the short keys
                            summary[f"{prefix}/{key}/{stat}"] = value[stat]
            for r in block["per_seed"]:
                rows.append([name, role, block["model"], r["seed"], metric, r["dev"].get(metric), r["test"][metric], r["best_epoch"], r["cached"], r["seconds"]])
        for key, _, _ in COMPARISONS:
            node = entry.get(key) if key else entry
            if not isinstance(node, Mapping) or "delta" not in node:
                continue
            base = f"{prefix}/{key}" if key else prefix
            for stat in ("delta", "mde", "p_value", "p_holm", "significant"):
                if node.get(stat) is not None:
                    summary[f"{base}/{stat}"] = node[stat]
            if node.get("delta_ci"):
                summary[f"{base}/delta_ci_low"], summary[f"{base}/delta_ci_high"] = node["delta_ci"]
    columns = ["task", "role", "model", "seed", "metric", "dev", "test", "best_epoch", "cached", "seconds"]
    wandb_run.log({"downstream/per_seed": wandb.Table(columns=columns, data=rows)})
    for key, value in summary.items():
        wandb_run.summary[key] = value


def _task_list(cfg: Any) -> list[Any]:
    tasks = cfg.get("tasks") or []
    if isinstance(tasks, str):
        return [tasks]
    if isinstance(tasks, (DictConfig, Mapping)):
        raise ConfigError("tasks must be a list of task names, e.g. tasks=[ncbi_disease,chemprot]")
    return list(OmegaConf.to_container(tasks, resolve=True) if not isinstance(tasks, list) else tasks)


def check_downstream(cfg: DictConfig) -> None:
    """Fail at start-up, not after hours of pretraining: task names, the downstream group, data files.

    Resolves every name in ``cfg.tasks``, validates ``cfg.downstream`` and reads each local task's
    train/dev/test files with the same readers and checks the evaluation uses (``load_task``), so a
    malformed CoNLL line or TSV row, a test split with nothing to score or all-empty texts stop the
    run here with ``file:line`` or the task's name. Reading costs seconds (the task files are small).
    Hub tasks are loaded here too (``datasets.load_dataset``, which downloads into its cache on first
    use and reads from it afterwards): a dataset that cannot be reached, a missing split or field, or
    labels that do not parse fail before pretraining rather than after it.
    """
    tasks = _task_list(cfg)
    if not tasks:
        return
    downstream_config(cfg)
    data_dir = Path(str((cfg.get("paths") or {}).get("data_dir") or "")).expanduser()
    for spec in tasks:
        task = resolve_task(spec)
        if task.reader.format == "hub":
            log.info("reading hub task %s (%s) at start-up", task.name, task.reader.dataset)
        load_task(task, data_dir)


def evaluate_downstream(
    cfg: DictConfig,
    *,
    before: str | None,
    after: str | None,
    run_dir: Path,
    wandb_run: Any = None,
    control: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``cfg.tasks`` from ``before`` (base), ``control`` (optional: the same start trained for
    the same MLM steps on general text) and ``after`` (adapted) over ``cfg.downstream.seeds``.

    ``cfg`` is the composed train config (``tasks``, ``downstream``, ``paths.data_dir``,
    ``paths.cache_dir``). Returns ``{task: {"before": {...}, "control": {...}, "after": {...}, "delta",
    "delta_ci", "mde", "p_value", "p_holm", "significant", "verdict", "vs_control": {...}, ...}}``
    (JSON-serialisable; ``{}`` when ``tasks`` is empty). Base and control scores are cached on disk.
    """
    tasks = _task_list(cfg)
    if not tasks or (before is None and after is None and control is None):
        return {}
    dcfg = downstream_config(cfg)
    paths = cfg.get("paths") or {}
    data_dir = paths.get("data_dir")
    if not data_dir:
        raise ConfigError("paths.data_dir is not set (DAPT_DATA_DIR)")
    results = evaluate_models(
        tasks,
        {"before": before, "control": control, "after": after},
        dcfg,
        data_dir=data_dir,
        cache_dir=paths.get("cache_dir"),
        cached_roles=("before", "control"),
        run_dir=Path(run_dir),
    )
    if wandb_run is not None and results:
        try:
            log_to_wandb(results, wandb_run)
        except Exception as exc:  # never lose hours of fine-tuning to a logging hiccup
            log.warning("could not log downstream results to W&B: %s", exc)
    return results
