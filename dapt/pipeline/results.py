"""results.json: the metrics a run reports, flattened for sweepers, W&B and ``dapt compare``, and its
terminal summary.

One module owns these names: the flat metric keys a sweep optimises (``optimized_metric``), the keys
logged to the W&B run summary and the columns ``dapt compare`` reads are all ``flat_metrics``' output.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dapt.pipeline.fit import relative_change, stage_keys
from dapt.tracking.loggers import wandb_run_of


@dataclass
class RunResults:
    """results.json of one ``dapt train`` run: every top-level field, written by ``to_json`` alone.

    Held-out numbers of the start model (``before``) and the adapted one (``after``) are
    ``fit.evaluate_heldout`` results; they become ``<set>[_dev]_{ppl,acc}_{before,after}`` keys
    (``*_ci``: 95% bootstrap CI over documents). ``changes`` are the relative perplexity changes with
    paired CIs (``perplexity_changes``), ``control`` the control arm's block (``ControlResult``).
    ``metrics`` (``flat_metrics``: what sweeps optimise, W&B's run summary and ``dapt compare`` read)
    and ``non_finite`` (keys written as null) are derived when the JSON is made.
    """

    experiment: str
    before: dict[str, Any]
    before_cached: bool
    after: dict[str, Any]
    control: dict[str, Any] | None
    changes: dict[str, Any]
    tokens_per_s: float | None
    mfu: float | None
    train_tokens: int
    train_sources: dict[str, int]
    data_quality: dict[str, Any]
    steps: int
    resumed_from_step: int | None
    train_seconds: float
    attempts: int
    precision: dict[str, str]
    cpu_threads: dict[str, Any]
    provenance: dict[str, Any]
    heldout_sets: Any
    base: dict[str, Any]
    remedies: dict[str, Any]
    model_dir: str | None
    data: dict[str, Any]
    config: dict[str, Any]
    vocabulary: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    downstream: dict[str, Any] | None = None
    error: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The results.json object (strict JSON once written: non-finite numbers are listed in
        ``non_finite`` and written as null by ``dapt.io.atomic_write_json``)."""
        from dapt.io import non_finite_keys

        out: dict[str, Any] = {"experiment": self.experiment, **stage_keys(self.before, "before"),
                               "before_cached": self.before_cached, **stage_keys(self.after, "after")}
        if self.control is not None:
            out["control"] = self.control
        out["changes"] = self.changes
        for f in fields(self):
            if f.name in ("vocabulary", "selection") and getattr(self, f.name) is None:
                continue  # written only when the run extended its vocabulary / selected its data
            if f.name not in ("experiment", "before", "before_cached", "after", "control", "changes", "downstream", "error"):
                out[f.name] = getattr(self, f.name)
        if self.downstream:
            out["downstream"] = self.downstream
        if self.error is not None:
            out["error"] = self.error
        out["metrics"] = flat_metrics(out)
        out["non_finite"] = non_finite_keys(out)
        return out


def stage_failure(stage: str, exc: BaseException) -> dict[str, str]:
    """The ``error`` block of results.json for a stage that failed after training finished."""
    return {"stage": stage, "type": type(exc).__name__, "message": str(exc)}


def perplexity_changes(after: dict[str, Any], before: dict[str, Any], control: dict[str, Any] | None) -> dict[str, Any]:
    """Relative perplexity changes of the adapted model, each with a paired document-bootstrap CI.

    ``domain_ppl_change`` / ``forgetting`` against the start, ``*_vs_control`` against the control
    arm (``ppl_after / ppl_control - 1``: negative = DAPT lowered perplexity more than the same steps
    on general text did); ``_dev`` variants on the dev sets. Values are fractions (-0.05 = -5%).
    """
    out: dict[str, Any] = {}
    for split in ("", "_dev"):
        for name, label in (("domain", f"domain{split}_ppl_change"), ("general", f"forgetting{split}")):
            for suffix, reference in (("", before), ("_vs_control", control)):
                change = relative_change(after, reference, f"{name}{split}_ppl") if reference else None
                if change is not None:
                    out[f"{label}{suffix}"] = change[0]
                    out[f"{label}{suffix}_ci"] = [None if math.isnan(x) else x for x in change[1:]]
    return out


HELDOUT_KEYS = tuple(
    f"{name}{split}_{stat}_{stage}"
    for name in ("domain", "general") for split in ("", "_dev") for stat in ("ppl", "acc") for stage in ("before", "after")
)


def flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """Scalar metrics as a flat ``key -> value`` dict (the objective a sweeper optimises is one key).

    Relative changes (``perplexity_changes``): ``domain_ppl_change`` / ``forgetting`` against the start,
    ``domain_ppl_change_vs_control`` / ``forgetting_vs_control`` against the control arm, each with
    ``_ci_low``/``_ci_high``; ``_dev`` variants read the dev sets (what a sweep should select on).
    """
    flat: dict[str, Any] = {}
    for key in (*HELDOUT_KEYS, "tokens_per_s", "mfu", "train_tokens", "steps"):
        if results.get(key) is not None:
            flat[key] = results[key]
    for key, value in results.items():
        if key.endswith("_ci") and isinstance(value, list) and len(value) == 2 and None not in value:
            flat[f"{key}_low"], flat[f"{key}_high"] = value
    for key, value in (results.get("control") or {}).items():
        if key.endswith("_ppl_after") and value is not None:
            flat[f"control/{key}"] = value
    for key, value in (results.get("changes") or {}).items():
        if key.endswith("_ci"):
            if isinstance(value, list) and len(value) == 2 and None not in value:
                flat[f"{key}_low"], flat[f"{key}_high"] = value
        elif value is not None:
            flat[key] = value
    for name, label in (("domain", "domain_ppl_change"), ("general", "forgetting")):  # results without "changes"
        after, before = results.get(f"{name}_ppl_after"), results.get(f"{name}_ppl_before")
        if label not in flat and after and before:
            flat[label] = after / before - 1

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "delta_ci" and isinstance(v, list) and len(v) == 2 and None not in v:
                    flat[f"{prefix}/delta_ci_low"], flat[f"{prefix}/delta_ci_high"] = v
                    continue
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[prefix] = node

    for task, entry in (results.get("downstream") or {}).items():
        walk(f"downstream/{task}", {k: v for k, v in entry.items() if k != "per_seed"})
    return flat


def log_summary(loggers: list[Any], metrics: dict[str, Any]) -> None:
    run = wandb_run_of(loggers)
    if run is not None:
        for key, value in metrics.items():
            run.summary[key] = value


def _ppl_cell(value: Any, ci: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = f"{value:.2f}"
    if isinstance(ci, list) and len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    return text


def _change_cell(changes: dict[str, Any], key: str) -> str:
    value, ci = changes.get(key), changes.get(f"{key}_ci")
    if value is None:
        return "—"
    text = f"{value * 100:+.1f}%"
    if isinstance(ci, list) and None not in ci:
        text += f" [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}]"
    return text


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: Any, spec: str = ".2f") -> str:
        return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    control = results.get("control") or {}
    table = Table(title=f"dapt: {results.get('experiment')} ({results['steps']} steps): perplexity [95% CI over documents]",
                  caption="general = forgetting set; dev selects, test reports; changes with paired 95% CIs",
                  caption_justify="left")
    table.add_column("held-out set", no_wrap=True)
    table.add_column("before", justify="right")
    if control:
        table.add_column("control", justify="right")
    table.add_column("after DAPT", justify="right")
    table.add_column("vs before", justify="right")
    if control:
        table.add_column("vs control", justify="right")
    changes = results.get("changes") or {}
    for name in ("domain", "general"):
        for split, split_label in (("", "test"), ("_dev", "dev")):
            key = f"{name}{split}_ppl"
            change = f"domain{split}_ppl_change" if name == "domain" else f"forgetting{split}"
            row = [f"{name} {split_label}", _ppl_cell(results.get(f"{key}_before"), results.get(f"{key}_before_ci"))]
            if control:
                row.append(_ppl_cell(control.get(f"{key}_after"), control.get(f"{key}_after_ci")))
            row += [_ppl_cell(results.get(f"{key}_after"), results.get(f"{key}_after_ci")), _change_cell(changes, change)]
            if control:
                row.append(_change_cell(changes, f"{change}_vs_control"))
            table.add_row(*row)
    # Not a terminal (a log file, CI): rich would assume 80 columns and cut the tables' cells.
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(table)
    base = results["base"]
    random_init = bool(results.get("config", {}).get("model", {}).get("random_init"))
    if base.get("cache_key"):
        origin = f"{'cached' if base['cached'] else 'prepared now'}, {base['steps']} general-MLM steps"
    else:
        origin = "random initialisation, no base preparation" if random_init else "as loaded, no base preparation"
    console.print(f"base: {base['source']} ({origin})")
    if control:
        console.print(f"control: {control['steps']} steps from the same start on general text "
                      f"({'cached' if control.get('cached') else 'trained now'}); 'vs control' isolates the domain's effect")
    sources = results.get("train_sources") or {}
    if sources:
        total = sum(sources.values()) or 1
        console.print("trained on: " + ", ".join(f"{Path(k).name} {v / total:.0%}" for k, v in sources.items()))
    console.print(
        f"throughput: {fmt(results.get('tokens_per_s'), ',.0f')} tokens/s (MFU {fmt(results.get('mfu'), '.1%')}), "
        f"{results['train_tokens']:,} training tokens"
    )
    if results.get("downstream"):
        try:
            from dapt.evaluation.downstream import format_downstream_table

            console.print(format_downstream_table(results["downstream"]))
        except ImportError:
            pass
