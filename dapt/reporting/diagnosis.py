"""``dapt doctor`` on finished runs and sweeps: why a DAPT run did (not) help, and what to try next.

Each check reads what a finished run already wrote (``results.json``, the CSV history
``csv/metrics.csv``, ``heldout_documents.json``) and returns ``dapt.diagnostics.findings.Finding``s:
the numbers it measured, the threshold and why that threshold, a severity, and config overrides that
exist in ``conf/`` (every suggested override composes with ``dapt.config.compose_config``, a test).
Nothing is written here; ``dapt.commands.doctor`` renders the findings.

Run checks (``run.*``): the domain gain against the control arm, forgetting against the control arm
(both on the dev split when recorded: what to try next is selection; test only as a named fallback),
under-training / over-fitting from the dev-perplexity history, loss spikes and divergence from the
training loss, passes over the corpus. Downstream checks (``downstream.*``): the delta against the
seeds' spread, the seeds needed to detect a pre-set effect (0.01), the demo fine-tuning budget. Sweep
checks (``sweep.*``): for each swept parameter (seed is a replicate dimension, not a parameter), which
metrics moved against the reference value on matched cells, "moved" meaning a Holm-adjusted p < 0.05
over all the sweep's rows (per-document paired CIs with one training run per arm, which measure
held-out-document noise only; Welch over runs when a cell has several).

``probe_term_accuracy`` (optional, not run by ``diagnose_run``: it loads the start and the adapted
model) compares masked-word loss and accuracy on domain terms vs common words in the domain dev text.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

from dapt import metric_names
from dapt.diagnostics.findings import Finding, ranked
from dapt.errors import DataError
from dapt.reporting.runs import Run, find_run_dirs, is_run_dir, load_run
from dapt.reporting.table import config_differences

# ----------------------------------------------------------------------------- thresholds (and why)

# Forgetting beyond the control arm (relative general-perplexity change, CI above 0): 10% is where the
# remedies' papers (Ibrahim et al. 2024; Li et al. 2018) report general-task losses; below it a warning.
FORGETTING_ERROR = 0.10
# "No forgetting" needs the CI's upper bound below +2%: a general-perplexity rise that small is within the
# spread between training seeds/data orders of one recipe (~1-2%) and far below where general-task losses
# show up (FORGETTING_ERROR); an interval that includes 0 but reaches beyond it is inconclusive, not ok.
FORGETTING_MARGIN = 0.02
FORGETTING_MARGIN_WHY = ("a rise that small is within the seed-to-seed spread of one recipe's general perplexity "
                         f"and far below the {FORGETTING_ERROR:.0%} where general-task losses are reported")
# Dev perplexity still falling: a last-interval drop over 1% (well above the ~0.1% run-to-run jitter of
# a fixed, once-masked dev set) means more steps would still pay.
STILL_FALLING = 0.01
# Dev perplexity rising after its minimum by more than 2%: over-fitting (or forgetting the start).
OVERFIT_RISE = 0.02
MIN_DEV_EVALUATIONS = 3  # before + >= 2 during/after training: a trend needs three points
# Train loss vs dev loss (nats): a gap over 0.5 (dev perplexity 1.65x the train one) after repeated passes.
LOSS_GAP = 0.5
# Loss spikes: a logged train loss above the rolling median of its neighbours by more than SPIKE_K robust
# SDs (1.4826 x MAD). MLM losses at batch 16 wander by ~0.3 nats; 6 robust SDs flags real jumps only.
SPIKE_K = 6.0
SPIKE_WINDOW = 10  # trailing: the 10 logged points before the one judged (causal)
SPIKE_WARMUP = 0.10  # the first 10% of the points (the warmup's steep fall) are not judged
MIN_LOSS_POINTS = 8
# Divergence: the median of the last 20% of the logged train losses above that of the first 20% by more than
# DIVERGED_K robust SDs of the batch-to-batch noise (so a flat, noisy loss does not fire) and by more than 5%
# of the initial loss (so a near-noiseless flat loss does not either): training moved away from its goal.
DIVERGED_FRACTION = 0.20
DIVERGED_K = 3.0
DIVERGED_RISE = 0.05
# Passes over a training source: the datamodule warns at data.warn_passes (3); beyond 10 an MLM has
# memorised a small corpus (dev perplexity typically turns up), Gururangan et al. 2020 made < 1 pass.
MANY_PASSES = 10
BYTES_PER_TOKEN = 4.0  # English WordPiece/BPE average, for "fraction of the corpus seen" (an estimate)
# Downstream: the effect worth detecting by default (1 F1 point, dapt.evaluation.stats' margin) and power.
DEFAULT_EFFECT = 0.01
POWER = 0.8
MAX_SEEDS = 20  # a seed list longer than this is not a practical suggestion
DEMO_MAX_EPOCHS = 3  # below DSP's recipe (10 epochs, patience 3): budget-limited fine-tuning
# Sweep effects: 95% intervals (unadjusted, shown); "moved" is decided by Holm-adjusted p < 1 - LEVEL.
LEVEL = 0.95
SWEEP_METRICS = ("domain_dev_ppl_after", "general_dev_ppl_after")


def _scope(run_dir: Path) -> str:
    return run_dir.name


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _finite(value: Any) -> bool:
    v = _num(value)
    return v is not None and math.isfinite(v)


def _ci(value: Any) -> tuple[float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(v) for v in value):
        return float(value[0]), float(value[1])
    return None


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _cfg(results: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = results.get("config") or {}
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _fmt_num(x: float) -> str:
    return f"{x:.3g}"


# ----------------------------------------------------------------------------- history (CSV)

def read_history(run_dir: Path, columns: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """``column -> [(step, value), ...]`` in step order, non-finite values kept (``nan``/``inf`` as
    floats; the pandas route through ``frame_by_step`` drops NaN, which is what the divergence check
    looks for). One value per step: the last logged. Falls back to the offline W&B history."""
    out: dict[str, dict[int, float]] = {c: {} for c in columns}
    path = run_dir / "csv" / "metrics.csv"
    if path.is_file():
        try:
            with path.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    step_text = row.get("step")
                    if not step_text:
                        continue
                    step = int(float(step_text))
                    for column in columns:
                        text = (row.get(column) or "").strip()
                        if text:
                            try:
                                out[column][step] = float(text)
                            except ValueError:
                                continue
        except (OSError, csv.Error, ValueError):
            pass
    else:
        frame = load_run(run_dir).history
        if len(frame):
            for column in columns:
                if column in frame.columns:
                    for step, value in zip(frame["step"], frame[column]):
                        if value == value:  # W&B histories: NaN is a missing cell
                            out[column][int(step)] = float(value)
    return {c: sorted(v.items()) for c, v in out.items()}


# ----------------------------------------------------------------------------- run checks

def check_domain_gain(results: dict[str, Any], scope: str = "") -> Finding:
    """DAPT's domain perplexity against the control arm (the same steps on general text)."""
    changes = results.get("changes") or {}
    split, name = _split(changes, "domain{}_ppl_change_vs_control")
    key = f"domain{split}_ppl_change_vs_control"
    value, ci = _num(changes.get(key)), _ci(changes.get(f"{key}_ci"))
    if not results.get("control") or value is None:
        own = _num(changes.get("domain_ppl_change"))
        return Finding(
            check="run.domain_gain_vs_control", severity="info", scope=scope,
            title="no control arm: the domain gain cannot be told apart from 'more MLM steps'",
            measured={"domain_ppl_change": own, "domain_ppl_change_ci": list(_ci(changes.get("domain_ppl_change_ci")) or []) or None},
            threshold={"needs": "changes.domain_ppl_change_vs_control"},
            why="any further MLM training lowers domain perplexity somewhat; only the control arm (same start, "
                "recipe, steps and seed on general text) isolates what the domain corpus added",
            overrides=["control.enabled=true"])
    measured = {"key": key, "split": name, "change": value, "ci": list(ci) if ci else None,
                "domain_ppl_after": _num(results.get(f"domain{split}_ppl_after")),
                "control_domain_ppl_after": _num((results.get("control") or {}).get(f"domain{split}_ppl_after"))}
    threshold = {"ok": "CI upper bound < 0", "warning": "CI includes 0", "error": "CI lower bound > 0"}
    why = ("a paired document-bootstrap CI of ppl_after / ppl_control - 1: below 0 throughout means the "
           "domain corpus, not just more MLM steps, lowered the domain perplexity; " + _SPLIT_WHY[name])
    steps = int(_num(results.get("steps")) or _num(_cfg(results, "trainer.max_steps")) or 0)
    if ci is None:
        return Finding("run.domain_gain_vs_control", "info", f"{name}: domain perplexity vs control {_pct(value)} (no CI recorded)",
                       measured, threshold, why, [], scope)
    if ci[1] < 0:
        return Finding("run.domain_gain_vs_control", "ok",
                       f"{name}: the gain is the domain's: domain perplexity {_pct(value)} vs control [{_pct(ci[0])}, {_pct(ci[1])}]",
                       measured, threshold, why, [], scope)
    overrides = [f"trainer.max_steps={2 * steps}"] if steps else []
    if _vocabulary_can_extend(results):
        overrides.append("vocabulary=extend")
    if ci[0] <= 0:
        return Finding("run.domain_gain_vs_control", "warning",
                       f"{name}: no domain gain beyond more MLM steps: {_pct(value)} vs control [{_pct(ci[0])}, {_pct(ci[1])}]",
                       measured, threshold, why + "; an interval that includes 0 cannot tell the two apart",
                       overrides, scope)
    return Finding("run.domain_gain_vs_control", "error",
                   f"{name}: domain perplexity worse than the control arm's: {_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}]",
                   measured, threshold,
                   why + "; above 0 the general-text control fits the domain better: check data.train is the domain "
                   "corpus and that the learning rate did not damage the model", _lr_overrides(results), scope)


_SPLIT_WHY = {
    "dev": "read on the dev split: what to try next is a selection decision, and dev is the split that selects",
    "test": "read on the test split because the run recorded no dev comparison (deciding on test makes its "
            "numbers optimistic for the next run; record the dev keys)",
}


def _split(changes: dict[str, Any], pattern: str) -> tuple[str, str]:
    """The key infix and name of the split a check reads: dev (``_dev``) when recorded, else test (``""``)."""
    return ("_dev", "dev") if pattern.format("_dev") in changes else ("", "test")


def _vocabulary_can_extend(results: dict[str, Any]) -> bool:
    """vocabulary=extend needs trainable embeddings (not LoRA, not frozen embeddings) and an unextended run."""
    return not (_cfg(results, "remedy.lora.enabled") or _cfg(results, "remedy.freeze.embeddings")
                or _cfg(results, "vocabulary.name", "none") != "none")


def _lr_overrides(results: dict[str, Any]) -> list[str]:
    lr = _num(_cfg(results, "optimizer.lr"))
    out = [f"optimizer.lr={_fmt_num(lr / 3)}"] if lr else []
    clip = _num(_cfg(results, "trainer.gradient_clip_val"))
    if not clip or clip > 1.0:
        out.append("trainer.gradient_clip_val=1.0")
    return out


def _remedy_overrides(results: dict[str, Any]) -> list[str]:
    """Forgetting remedies to add to those the run used (results.json ``remedies.active``, else inferred from
    its config): replay and L2-SP (LoRA excludes L2-SP), or stronger settings of those already on."""
    replay = _num(_cfg(results, "data.replay_fraction")) or 0.0
    l2sp = _num(_cfg(results, "remedy.l2sp.weight")) or 0.0
    block = results.get("remedies") if isinstance(results.get("remedies"), dict) else {}
    active = [str(a) for a in block.get("active") or []]
    if not active:
        active = [name for name, on in (("l2sp", l2sp > 0), ("replay", replay > 0),
                                        ("lora", bool(_cfg(results, "remedy.lora.enabled")))) if on]
    wanted = [*active, "replay", *([] if "lora" in active else ["l2sp"])]
    out = [f"remedy=[{','.join(dict.fromkeys(wanted))}]"]
    out.append(f"data.replay_fraction={min(0.5, max(0.25, 2 * replay)):g}")
    if l2sp and "lora" not in active:
        out.append(f"remedy.l2sp.weight={l2sp * 10:g}")
    return out


def check_forgetting(results: dict[str, Any], scope: str = "") -> Finding | None:
    """General-text perplexity of the adapted model against the control arm's."""
    changes = results.get("changes") or {}
    split, name = _split(changes, "forgetting{}_vs_control")
    key = f"forgetting{split}_vs_control"
    value, ci = _num(changes.get(key)), _ci(changes.get(f"{key}_ci"))
    if value is None:
        return None  # no control: check_domain_gain already says so
    measured = {"key": key, "split": name, "change": value, "ci": list(ci) if ci else None,
                "general_ppl_after": _num(results.get(f"general{split}_ppl_after")),
                "control_general_ppl_after": _num((results.get("control") or {}).get(f"general{split}_ppl_after"))}
    threshold = {"ok": f"CI upper bound < +{FORGETTING_MARGIN:.0%}",
                 "info": f"CI includes 0 and reaches +{FORGETTING_MARGIN:.0%} (inconclusive)",
                 "warning": "CI lower bound > 0", "error": f"and change > {FORGETTING_ERROR:.0%}"}
    why = ("general perplexity after DAPT over the control arm's (same steps on general text), paired CI over "
           f"documents: above 0 throughout means the domain corpus cost general knowledge; past {FORGETTING_ERROR:.0%} "
           f"general-task losses are reported (Ibrahim et al. 2024); 'none' needs the CI's upper bound below "
           f"+{FORGETTING_MARGIN:.0%} ({FORGETTING_MARGIN_WHY}); " + _SPLIT_WHY[name])
    if ci is None:
        return Finding("run.forgetting_vs_control", "info",
                       f"{name}: general perplexity vs control {_pct(value)} (no CI recorded: forgetting not measured)",
                       measured, threshold, why, [], scope)
    if ci[0] <= 0 and ci[1] < FORGETTING_MARGIN:
        return Finding("run.forgetting_vs_control", "ok",
                       f"{name}: no forgetting beyond the control arm: general perplexity {_pct(value)}"
                       f" [{_pct(ci[0])}, {_pct(ci[1])}]", measured, threshold, why, [], scope)
    if ci[0] <= 0:
        eval_tokens = _num(_cfg(results, "data.eval_tokens"))
        bigger = [f"data.eval_tokens={int(2 * eval_tokens)}"] if eval_tokens else []
        return Finding("run.forgetting_vs_control", "info",
                       f"{name}: forgetting inconclusive: up to {_pct(ci[1])} forgetting not excluded "
                       f"(general perplexity {_pct(value)} [{_pct(ci[0])}, {_pct(ci[1])}] vs control)",
                       measured, threshold,
                       why + "; the interval includes 0 but also forgetting beyond the margin: a larger general held-out "
                       "set (data.eval_tokens) narrows it, a remedy guards against it", _remedy_overrides(results) + bigger, scope)
    severity = "error" if value > FORGETTING_ERROR else "warning"
    return Finding("run.forgetting_vs_control", severity,
                   f"{name}: forgetting: general perplexity {_pct(value)} beyond the control arm's [{_pct(ci[0])}, {_pct(ci[1])}]; "
                   "try replay / L2-SP",
                   measured, threshold, why, _remedy_overrides(results), scope)


def _dedupe(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Drop an evaluation that repeats the previous one exactly (the end-of-training dev pass right after
    the last interval's)."""
    out: list[tuple[int, float]] = []
    for step, value in points:
        if out and math.isclose(out[-1][1], value, rel_tol=1e-9, abs_tol=0.0):
            continue
        out.append((step, value))
    return out


def check_training_length(run_dir: Path, results: dict[str, Any], scope: str = "") -> Finding:
    """Under-trained (dev perplexity still falling) or over-fitting (rising after its minimum)."""
    ppl_col = metric_names.heldout(metric_names.DEV_LOOP, "domain", "ppl")
    low_col, high_col = f"{ppl_col}_low", f"{ppl_col}_high"
    loss_col = metric_names.heldout(metric_names.DEV_LOOP, "domain", "loss")
    hist = read_history(run_dir, [ppl_col, low_col, high_col, loss_col, metric_names.TRAIN_LOSS])
    points = _dedupe([(s, v) for s, v in hist[ppl_col] if math.isfinite(v)])
    steps = int(_num(results.get("steps")) or _num(_cfg(results, "trainer.max_steps")) or (points[-1][0] if points else 0))
    threshold = {"still_falling": (f"drop > {STILL_FALLING:.0%} from the latest evaluation at least half a typical "
                                   "interval before the last, and last = minimum"),
                 "over_fitting": (f"last > minimum by > {OVERFIT_RISE:.0%} and the minimum below the last evaluation's CI "
                                  f"(> {OVERFIT_RISE:.0%} alone when no CI is logged), or train/dev loss gap > {LOSS_GAP} "
                                  "nats after > 1 pass"),
                 "min_evaluations": MIN_DEV_EVALUATIONS}
    measured: dict[str, Any] = {"dev_ppl": [[s, round(v, 4)] for s, v in points]}
    if not points and not hist[metric_names.TRAIN_LOSS]:
        return Finding("run.training_length", "info", "cannot tell under- from over-training: no training history in the run folder",
                       measured, threshold, "needs csv/metrics.csv (logger.csv.enabled=true) or the offline W&B run beside results.json",
                       [], scope)
    if len(points) < MIN_DEV_EVALUATIONS:
        interval = max(1, steps // 5) if steps else None
        return Finding("run.training_length", "info",
                       f"cannot tell under- from over-training: {len(points)} dev evaluation(s)",
                       measured, threshold,
                       f"a trend needs at least {MIN_DEV_EVALUATIONS} dev perplexities (before, during, after training)",
                       [f"trainer.val_check_interval={interval}"] if interval else [], scope)
    lows, highs = dict(hist[low_col]), dict(hist[high_col])
    values = [v for _, v in points]
    last_step, last = points[-1]
    # The last evaluation against the latest earlier one at least half a typical interval before it: an
    # end-of-training pass a few steps after the last interval's would otherwise read as "levelled off".
    intervals = [b[0] - a[0] for a, b in zip(points, points[1:])]
    typical = statistics.median(intervals)
    ref_step, prev = next(((s, v) for s, v in reversed(points[:-1]) if last_step - s >= 0.5 * typical), points[-2])
    i_min = min(range(len(values)), key=values.__getitem__)
    min_step, minimum = points[i_min]
    drop = 1 - last / prev
    gap_steps = max(1, last_step - ref_step)
    per_100 = drop * 100 / gap_steps
    rise = last / minimum - 1
    measured.update({"last_interval_change": -drop, "compared_with_step": ref_step, "compared_steps": gap_steps,
                     "change_per_100_steps": -per_100, "minimum": minimum, "minimum_step": min_step,
                     "rise_after_minimum": rise})
    if last_step in lows and last_step in highs:
        measured["last_ci"] = [lows[last_step], highs[last_step]]
    if min_step in lows and min_step in highs:
        measured["minimum_ci"] = [lows[min_step], highs[min_step]]
    gap = _loss_gap(hist[metric_names.TRAIN_LOSS], hist[loss_col])
    passes = _max_passes(results)
    if gap is not None:
        measured["dev_minus_train_loss"] = gap
    why = ("the domain dev perplexity over training (csv/metrics.csv, val/domain/ppl; one fixed, once-masked "
           "dev set, so changes between evaluations are the model's)")
    if i_min == len(values) - 1 and drop > STILL_FALLING:
        return Finding("run.training_length", "warning",
                       f"under-trained: dev perplexity still falling ({_pct(-drop)} over the last {gap_steps} steps, "
                       f"{_pct(-per_100)} per 100 steps, to {last:.4g})",
                       measured, threshold, why + "; still falling at the last step means more steps would lower it further",
                       [f"trainer.max_steps={2 * steps}"] if steps else [], scope)
    overfit_gap = gap is not None and gap > LOSS_GAP and (passes or 0) > 1
    has_ci = "last_ci" in measured
    beyond = has_ci and measured["last_ci"][0] > minimum  # the minimum lies below the last evaluation's CI
    measured["rise_beyond_last_ci"] = beyond if has_ci else None
    overfit_rise = rise > OVERFIT_RISE and (beyond or not has_ci)
    if overfit_rise or overfit_gap:
        title = (f"over-fitting: dev perplexity rose {_pct(rise)} after its minimum at step {min_step}"
                 + ("" if has_ci else " (no CI logged)") if overfit_rise
                 else f"over-fitting: dev loss {gap:.2f} nats above train loss after {passes} passes")
        overrides = [f"trainer.max_steps={max(1, min_step)}"] if min_step and min_step < steps else []
        overrides += _remedy_overrides(results)
        why_rise = ("; rising after a minimum by more than the last evaluation's CI means later steps hurt: stop at the "
                    "minimum or add data" if has_ci else
                    f"; rising after a minimum by more than {OVERFIT_RISE:.0%} (no CI logged to judge the rise against) "
                    "means later steps hurt: stop at the minimum or add data")
        return Finding("run.training_length", "warning", title, measured, threshold, why + why_rise, overrides, scope)
    text = f"dev perplexity levelled off ({_pct(-drop)} over the last {gap_steps} steps)"
    if rise > OVERFIT_RISE:
        text += f"; its {_pct(rise)} rise after the minimum is within the last evaluation's CI"
    return Finding("run.training_length", "ok", text, measured, threshold, why, [], scope)


def _loss_gap(train: list[tuple[int, float]], dev: list[tuple[int, float]]) -> float | None:
    train_tail = [v for _, v in train if math.isfinite(v)][-3:]
    dev_final = [v for _, v in dev if math.isfinite(v)]
    if not train_tail or not dev_final:
        return None
    return dev_final[-1] - statistics.median(train_tail)


def _max_passes(results: dict[str, Any]) -> int | None:
    passes = [_num((q or {}).get("passes")) for q in (results.get("data_quality") or {}).values() if isinstance(q, dict)]
    passes = [p for p in passes if p is not None]
    return int(max(passes)) if passes else None


def _trailing_residuals(values: Sequence[float], window: int = SPIKE_WINDOW) -> list[float | None]:
    """Each value minus the median of the ``window`` points before it (causal: later points never enter);
    ``None`` for the first ``SPIKE_WARMUP`` of the series (at least 3 points), where the loss falls steeply
    from its start and the trailing median lags it."""
    n = len(values)
    skip = max(3, math.ceil(SPIKE_WARMUP * n))
    out: list[float | None] = []
    for i in range(n):
        if i < skip:
            out.append(None)
            continue
        out.append(values[i] - statistics.median(values[max(0, i - window):i]))
    return out


def _robust_scale(residuals: Sequence[float | None]) -> float:
    """1.4826 x the median absolute deviation of the defined residuals (a robust SD); 0.0 without any."""
    defined = [r for r in residuals if r is not None]
    if not defined:
        return 0.0
    centre = statistics.median(defined)
    return 1.4826 * statistics.median(abs(r - centre) for r in defined)


def loss_spikes(values: Sequence[float], *, k: float = SPIKE_K, window: int = SPIKE_WINDOW) -> list[int]:
    """Indices whose value exceeds the median of the ``window`` points before it by more than ``k`` robust
    SDs (1.4826 x the MAD of those trailing residuals). Causal, and the first ``SPIKE_WARMUP`` of the points
    are not judged: a clean, steeply falling start is below its trailing median, never a spike."""
    n = len(values)
    if n < MIN_LOSS_POINTS:
        return []
    residuals = _trailing_residuals(values, window)
    scale = _robust_scale(residuals)
    if scale <= 0:
        tol = 1e-9 * max(1.0, max(abs(v) for v in values))
        return [i for i, r in enumerate(residuals) if r is not None and r > tol]
    return [i for i, r in enumerate(residuals) if r is not None and r > k * scale]


def loss_rise(values: Sequence[float], *, window: int = SPIKE_WINDOW) -> dict[str, float] | None:
    """The median of the last ``DIVERGED_FRACTION`` of the losses against that of the first: ``{"initial",
    "final", "rise", "scale", "diverged"}``; diverged when the rise exceeds ``DIVERGED_K`` robust SDs of the
    batch-to-batch noise (trailing residuals) and ``DIVERGED_RISE`` of the initial loss. None: too few points."""
    n = len(values)
    if n < MIN_LOSS_POINTS:
        return None
    m = max(2, math.ceil(DIVERGED_FRACTION * n))
    initial, final = statistics.median(values[:m]), statistics.median(values[-m:])
    scale = _robust_scale(_trailing_residuals(values, window))
    rise = final - initial
    diverged = rise > DIVERGED_K * scale and rise > DIVERGED_RISE * abs(initial)
    return {"initial": initial, "final": final, "rise": rise, "scale": scale, "diverged": diverged}


def check_loss_stability(run_dir: Path, results: dict[str, Any], scope: str = "") -> Finding | None:
    """Non-finite training loss, spikes above the rolling median, a final loss above the initial one."""
    points = read_history(run_dir, [metric_names.TRAIN_LOSS])[metric_names.TRAIN_LOSS]
    non_finite = [s for s, v in points if not math.isfinite(v)]
    recorded = [k for k in results.get("non_finite") or [] if isinstance(k, str)]
    if not points and not recorded:
        return None
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    values = [v for _, v in finite]
    spikes = [finite[i][0] for i in loss_spikes(values)]
    trend = loss_rise(values)
    measured: dict[str, Any] = {"points": len(points), "non_finite_steps": non_finite[:20], "results_non_finite": recorded[:20],
                                "spike_steps": spikes[:20],
                                "initial_loss": trend["initial"] if trend else None, "final_loss": trend["final"] if trend else None,
                                "rise": trend["rise"] if trend else None, "noise_robust_sd": trend["scale"] if trend else None}
    threshold = {"error": (f"a non-finite loss, or median of the last {DIVERGED_FRACTION:.0%} of points > that of the first "
                           f"{DIVERGED_FRACTION:.0%} by > {DIVERGED_K:g} robust SDs and > {DIVERGED_RISE:.0%}"),
                 "warning": (f"a logged loss > the median of the {SPIKE_WINDOW} points before it + {SPIKE_K:g} robust SDs "
                             f"(1.4826 x MAD), the first {SPIKE_WARMUP:.0%} of points not judged")}
    why = ("train/loss (csv/metrics.csv): MLM losses wander by a few tenths of a nat between batches; a jump of "
           f"{SPIKE_K:g} robust SDs above the recent losses, or a loss that ends above where it started by more than "
           "its noise, is the optimiser, not the data order")
    warmup = _num(_cfg(results, "scheduler.warmup_ratio"))
    overrides = _lr_overrides(results) + (["scheduler.warmup_ratio=0.1"] if warmup is None or warmup < 0.1 else [])
    if non_finite or recorded:
        return Finding("run.loss_stability", "error",
                       f"diverged: non-finite training loss at step(s) {', '.join(map(str, non_finite[:5])) or '?'}"
                       + (f"; results.json non-finite keys: {', '.join(recorded[:3])}" if recorded else ""),
                       measured, threshold, why, overrides, scope)
    if trend is not None and trend["diverged"]:
        return Finding("run.loss_stability", "error",
                       f"diverged: training loss ended at {trend['final']:.3g}, above its start {trend['initial']:.3g} "
                       f"(+{trend['rise']:.3g} nats, noise robust SD {trend['scale']:.2g})",
                       measured, threshold, why, overrides, scope)
    if spikes:
        return Finding("run.loss_stability", "warning",
                       f"{len(spikes)} loss spike(s), at step(s) {', '.join(map(str, spikes[:5]))}",
                       measured, threshold, why, overrides, scope)
    return Finding("run.loss_stability", "ok", "training loss finite and free of spikes", measured, threshold, why, [], scope)


def check_corpus_passes(results: dict[str, Any], scope: str = "") -> Finding | None:
    """How much of each training source the run read: passes (data_quality) and an estimated fraction."""
    quality = results.get("data_quality") or {}
    sources = results.get("train_sources") or {}
    sizes = {str(s.get("path")): _num(s.get("bytes")) for s in (results.get("data") or {}).get("train") or [] if isinstance(s, dict)}
    if not quality and not sources:
        return None
    rows = []
    for name in dict.fromkeys([*sources, *quality]):
        tokens = _num(sources.get(name))
        size = sizes.get(name)
        passes = _num((quality.get(name) or {}).get("passes")) if isinstance(quality.get(name), dict) else None
        fraction = tokens * BYTES_PER_TOKEN / size if tokens is not None and size else None
        rows.append({"source": name, "tokens": tokens, "bytes": size, "passes": passes,
                     "est_fraction_seen": round(fraction, 3) if fraction is not None else None})
    measured = {"train_tokens": _num(results.get("train_tokens")), "sources": rows, "bytes_per_token_estimate": BYTES_PER_TOKEN}
    threshold = {"warning": f"passes > {MANY_PASSES}", "datamodule_warns_at": _cfg(results, "data.warn_passes")}
    why = ("an MLM repeatedly shown a small corpus memorises it (dev perplexity turns up); Gururangan et al. 2020 "
           f"made under one pass over their DAPT corpora. Fractions assume {BYTES_PER_TOKEN:g} bytes per token")
    passes = [r["passes"] for r in rows if r["passes"] is not None]
    most = max(passes) if passes else None
    if most is not None and most > MANY_PASSES:
        steps = int(_num(results.get("steps")) or 0)
        overrides = [f"trainer.max_steps={max(1, int(steps * MANY_PASSES / most))}"] if steps else []
        overrides += _remedy_overrides(results)
        return Finding("run.corpus_passes", "warning", f"{most:g} passes over a training source: over-fitting risk",
                       measured, threshold, why, overrides, scope)
    seen = [r["est_fraction_seen"] for r in rows if r["est_fraction_seen"] is not None]
    text = f"up to {most:g} pass(es) per source" if most is not None else "passes not recorded"
    if seen:
        text += f", ~{min(seen):.0%}-{max(seen):.0%} of each source's estimated tokens read"
    return Finding("run.corpus_passes", "info", text, measured, threshold, why, [], scope)


# ----------------------------------------------------------------------------- downstream checks

def seeds_needed(sd_diff: float, effect: float, *, alpha: float = 0.05, power: float = POWER, max_n: int = 1000) -> int | None:
    """Paired seeds for a two-sided paired t-test to detect ``effect`` with ``power``: the normal
    approximation ``n = ((z_{alpha/2} + z_beta) sd / effect)^2`` as a start, refined with the exact
    noncentral-t minimum detectable effect (``dapt.evaluation.stats``). None: above ``max_n`` or undefined."""
    from scipy.stats import norm

    from dapt.evaluation.stats import minimum_detectable_effect

    if not sd_diff or sd_diff <= 0 or not effect or effect <= 0 or not math.isfinite(sd_diff):
        return None
    z = float(norm.ppf(1 - alpha / 2) + norm.ppf(power))
    n = max(2, math.ceil((z * sd_diff / effect) ** 2))
    if n > max_n:
        return None

    def detects(m: int) -> bool:
        mde = minimum_detectable_effect(sd_diff, m, alpha=alpha, power=power)
        return mde is not None and mde <= effect

    while n > 2 and detects(n - 1):
        n -= 1
    while not detects(n):
        n += 1
        if n > max_n:
            return None
    return n


def _role_std(entry: dict[str, Any], role: str) -> float | None:
    cell = (entry.get(role) or {}).get("test_score") or {}
    return _num(cell.get("std"))


def check_downstream(results: dict[str, Any], scope: str = "") -> list[Finding]:
    """Per task: the delta against the seeds' spread, the seeds needed, and the fine-tuning budget."""
    findings: list[Finding] = []
    downstream = results.get("downstream") or {}
    dcfg = _cfg(results, "downstream", {}) or {}
    budget = dcfg.get("budget") or next((e.get("budget") for e in downstream.values() if isinstance(e, dict) and e.get("budget")), None)
    max_epochs, max_train = _num(dcfg.get("max_epochs")), dcfg.get("max_train_examples")
    n_seeds = len(dcfg.get("seeds") or []) or None
    if downstream and (budget in ("default", "tiny") or (max_epochs is not None and max_epochs < DEMO_MAX_EPOCHS) or max_train):
        findings.append(Finding(
            "downstream.budget", "warning",
            f"demo fine-tuning budget ({budget or 'custom'}: {max_epochs:g} epoch(s), "
            f"{max_train if max_train else 'all'} train examples): a delta here is not a result" if max_epochs is not None
            else f"demo fine-tuning budget ({budget})",
            {"budget": budget, "max_epochs": max_epochs, "max_train_examples": max_train, "seeds": n_seeds},
            {"warning": f"budget default/tiny, max_epochs < {DEMO_MAX_EPOCHS}, or max_train_examples set"},
            "conf/downstream/default.yaml is a CPU demo (1 epoch, 2000 examples); Don't Stop Pretraining's recipe "
            "(downstream=paper) fine-tunes up to 10 epochs on all data, where DAPT's gains were measured",
            ["downstream=paper"], scope))
    for task, entry in downstream.items():
        if not isinstance(entry, dict):
            continue
        for key, label in (("", "after - before"), ("vs_control", "after - control")):
            node = entry.get(key) if key else (entry if "delta" in entry else None)
            if not isinstance(node, dict) or node.get("delta") is None:
                continue
            findings.append(_seed_noise(task, label, entry, node, key, dcfg, scope))
    return findings


def _test_examples(entry: dict[str, Any]) -> int | None:
    """The task's test-set size as results.json records it (the entry, a role's block, or a per-seed run)."""
    for node in (entry, entry.get("after") or {}, entry.get("before") or {}):
        if not isinstance(node, dict):
            continue
        n = _num(node.get("test_examples"))
        if n:
            return int(n)
        for run in node.get("runs") or node.get("per_seed") or []:
            n = _num(run.get("test_examples")) if isinstance(run, dict) else None
            if n:
                return int(n)
    return None


def _seed_noise(task: str, label: str, entry: dict[str, Any], node: dict[str, Any], key: str, dcfg: dict[str, Any],
                scope: str) -> Finding:
    delta = float(node["delta"])
    sd_diff = _num(node.get("delta_std"))
    ci = _ci(node.get("delta_ci"))
    n = int(_num(node.get("n")) or 0)
    reference = "control" if key else "before"
    spread = max([s for s in (_role_std(entry, "after"), _role_std(entry, reference)) if s is not None], default=None)
    m_tests = max(1, int(_num(node.get("holm_m")) or 1))
    # Bonferroni: alpha / m, the strictest step of the Holm procedure the table used (conservative for power).
    alpha = float(_num(node.get("alpha")) or 0.05) / m_tests
    mde = _num(node.get("mde"))
    if mde is None and sd_diff:
        from dapt.evaluation.stats import minimum_detectable_effect

        mde = minimum_detectable_effect(sd_diff, n, alpha=alpha)
    needed_observed = seeds_needed(sd_diff, abs(delta), alpha=alpha) if sd_diff and delta else None
    needed_default = seeds_needed(sd_diff, DEFAULT_EFFECT, alpha=alpha) if sd_diff else None
    name = f"downstream.seed_noise{'_vs_control' if key else ''}"
    max_eval = dcfg.get("max_eval_examples")
    test_examples = _test_examples(entry)
    score = _num(((entry.get("after") or {}).get("test_score") or {}).get("mean"))
    measured: dict[str, Any] = {
        "task": task, "comparison": label, "metric": f"test_{entry.get('metric') or 'score'}", "delta": delta,
        "delta_ci": list(ci) if ci else None, "seed_spread": spread, "sd_of_differences": sd_diff, "seeds": n,
        "sd_degrees_of_freedom": max(0, n - 1), "mde": mde, "alpha_per_test_bonferroni": alpha, "tests_in_table": m_tests,
        "target_effect": DEFAULT_EFFECT, f"seeds_needed_{DEFAULT_EFFECT:g}": needed_default,
        "seeds_needed_observed_delta": needed_observed,
        "observed_delta_note": ("secondary: power computed from the observed delta (post hoc) is not evidence for or "
                                "against an effect; plan on the pre-set effect"),
        "max_eval_examples": max_eval, "test_examples": test_examples}
    if test_examples and score is not None and 0 < score < 1:
        se = math.sqrt(score * (1 - score) / test_examples)
        measured["test_set_se_approx"] = se
        measured["test_examples_needed_approx"] = math.ceil(score * (1 - score) / (DEFAULT_EFFECT / 2.8) ** 2)
        measured["test_set_se_note"] = ("approximate: binomial SE sqrt(p(1-p)/n) at the after-DAPT test score, a rough "
                                        f"floor for F1/accuracy; examples needed for SE <= {DEFAULT_EFFECT:g}/2.8")
    threshold = {"warning": "|delta| < the seeds' spread (std of either model's scores), or the delta's CI includes 0",
                 "power": POWER, "default_effect": DEFAULT_EFFECT, "max_seeds_suggested": MAX_SEEDS}
    why = ("fine-tuning noise across seeds is of the size of DAPT's gains (0.5-3 F1 points, Gururangan et al. 2020); "
           f"seeds needed to detect the pre-set effect {DEFAULT_EFFECT:g} from the paired t-test's power at the SD of the "
           f"per-seed differences (estimated from {n} seeds: {max(0, n - 1)} degrees of freedom, itself uncertain), at "
           "the Bonferroni level alpha/m (the strictest Holm step of the table; normal approximation refined with the "
           "noncentral t); the spread comparison sets the paired delta against each model's own per-seed std (an "
           "unpaired spread: a paired delta can be real while smaller than it)")
    within_spread = spread is not None and abs(delta) < spread
    ci_has_zero = ci is None or ci[0] <= 0 <= ci[1]
    if not within_spread and not ci_has_zero:
        assert ci is not None
        if ci[1] < 0:
            return Finding(name, "warning", f"{task} {label}: lower after DAPT, {delta:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]",
                           measured, threshold, why + "; an interval below 0 is a measured loss (read it with the "
                           "forgetting and budget findings)", [], scope)
        return Finding(name, "ok", f"{task} {label}: {delta:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] exceeds the seeds' spread",
                       measured, threshold, why, [], scope)
    overrides: list[str] = []
    current = f"current: {n} seeds, MDE {mde:.3f}" if mde is not None else f"current: {n} seeds"
    if needed_default is not None and needed_default <= MAX_SEEDS:
        seeds_text = f"{needed_default} seeds to detect {DEFAULT_EFFECT:g} at {POWER:.0%} power ({current})"
        if needed_default > n:
            overrides.append(f"downstream.seeds=[{','.join(str(i) for i in range(needed_default))}]")
    else:
        more = f"more than {MAX_SEEDS}" if sd_diff else "more"
        seeds_text = (f"{more} seeds to detect {DEFAULT_EFFECT:g} at {POWER:.0%} power ({current}): use the full "
                      "fine-tuning recipe (downstream=paper) and a larger test set instead")
        if dcfg.get("budget") != "paper":
            overrides.append("downstream=paper")
    if max_eval:
        overrides.append("downstream.max_eval_examples=null")
    reason = (f"delta {delta:+.3f} smaller than the seeds' spread ({spread:.3f})" if within_spread and spread is not None
              else f"delta {delta:+.3f}, its CI includes 0" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (no CI)"))
    return Finding(name, "warning", f"{task} {label}: {reason}; {seeds_text}", measured, threshold, why, overrides, scope)


# ----------------------------------------------------------------------------- optional probe (loads models)

PROBE_TERMS = 500  # domain terms: frequent domain-dev words absent from general text's top words
PROBE_MASK_EVERY = 7  # each copy of a sequence masks every 7th eligible word (~15% of words masked)
# salient masking targets the domain's terms; vocabulary=extend gives frequent split terms their own tokens
PROBE_OVERRIDES = (["masking=salient", "vocabulary=extend"], ["masking=salient"])


def probe_term_accuracy(run_dir: Path, *, max_documents: int = 100, max_seq_length: int = 128, batch_size: int = 32) -> Finding:
    """Masked-word accuracy of the start model (``base.path``) and the adapted one (``model_dir``) on the
    domain dev text, for domain terms vs common words: did DAPT teach the domain's vocabulary?

    Terms are the domain dev sample's frequent words missing from the general corpus' top words
    (``dapt.diagnostics.corpus.domain_terms``); common words are frequent in both. Each occurrence is
    masked whole (all its sub-tokens, in copies of the sequence that mask every ``PROBE_MASK_EVERY``-th
    eligible word) and scored by its mean cross-entropy per sub-token (nats) and the fraction of its
    sub-tokens predicted. The verdict reads the loss drop (before - after): averaged per document first
    (occurrences within one document are not independent), then a t interval over documents. Loads two
    models: seconds for MiniLM on a CPU, not part of ``diagnose_run``.
    """
    import torch

    from dapt.data.sources import as_source, iter_documents
    from dapt.diagnostics.corpus import domain_terms, profile
    from dapt.modeling.loading import load_mlm_model, load_tokenizer
    from dapt.pipeline.run_config import general_sources

    run_dir = Path(run_dir)
    results = _read_results(run_dir)
    cfg = results.get("config") or {}
    after_path, before_path = results.get("model_dir"), (results.get("base") or {}).get("path") or _cfg(results, "model.source")
    if not after_path or not Path(after_path).is_dir():
        raise DataError(f"{run_dir}: the adapted model is not saved (model_dir={after_path}); run with save_model=true")
    if not before_path:
        raise DataError(f"{run_dir}: results.json names no start model (base.path / config.model.source)")
    dev = _cfg(results, "data.domain_dev")
    if not dev:
        raise DataError(f"{run_dir}: results.json config has no data.domain_dev")
    data_dir = _cfg(results, "paths.data_dir")
    domain_docs = [d for _, d in zip(range(max_documents), iter_documents([as_source(dev, "data.domain_dev")], data_dir))]
    general_docs = list(zip(range(max_documents * 2), iter_documents(general_sources(cfg), data_dir)))
    tokenizer = load_tokenizer(str(after_path))
    domain_profile = profile(domain_docs, tokenizer, max_documents=max_documents)
    general_profile = profile((d for _, d in general_docs), tokenizer, max_documents=max_documents * 2)
    terms = set(domain_terms(domain_profile, general_profile, k=PROBE_TERMS))
    general_top = set(general_profile.top_words[:PROBE_TERMS])
    common = {w for w in domain_profile.top_words if w in general_top}
    sequences = _probe_sequences(domain_docs, tokenizer, terms, common, max_seq_length)
    scores: dict[str, dict[str, list[tuple[float, float, int]]]] = {}
    for role, path in (("before", before_path), ("after", after_path)):
        model = load_mlm_model(str(path)).model.eval()
        scores[role] = _probe_scores(model, tokenizer, sequences, batch_size, torch)
        del model
    measured: dict[str, Any] = {"documents": len(domain_docs), "terms": len(terms), "common_words": len(common),
                                "examples": sorted(terms)[:15]}
    gains: dict[str, tuple[float, float] | None] = {}
    for cls in ("term", "common"):
        before, after = scores["before"][cls], scores["after"][cls]
        n = len(before)
        gains[cls] = None
        # loss (nats/sub-token) before - after, per occurrence: > 0 is learning
        drops = [(b[2], b[1] - a[1]) for a, b in zip(after, before)]
        clustered = clustered_mean_ci(drops)
        if clustered is None:
            continue
        mean, half, n_docs = clustered
        gains[cls] = (mean, half)
        measured[cls] = {"occurrences": n, "documents": n_docs,
                         "subtoken_accuracy_before": statistics.fmean(b[0] for b in before),
                         "subtoken_accuracy_after": statistics.fmean(a[0] for a in after),
                         "loss_before": statistics.fmean(b[1] for b in before), "loss_after": statistics.fmean(a[1] for a in after),
                         "loss_drop": mean, "loss_drop_ci": [mean - half, mean + half]}
    threshold = {"warning": ("the domain terms' loss drop (before - after, nats per sub-token, per-document means) has a "
                             "95% t interval over documents reaching 0 or below"),
                 "info": "terms gained less than common words"}
    why = ("DAPT should above all teach the words general pretraining rarely saw; if masked domain terms are predicted no "
           "better after DAPT (loss drop averaged per document, then a t interval over documents: occurrences within a "
           "document are not independent), the domain signal did not reach the vocabulary")
    term, com = gains["term"], gains["common"]
    scope = _scope(run_dir)
    if term is None:
        return Finding("run.term_accuracy", "info", "too few domain-term occurrences in the dev sample (fewer than 2 documents with one)", measured, threshold, why, [], scope)
    versus = f" vs common words {com[0]:+.3f}" if com else ""
    if term[0] - term[1] <= 0:
        return Finding("run.term_accuracy", "warning",
                       f"domain terms not learned: masked-term loss drop {term[0]:+.3f} (±{term[1]:.3f}) nats{versus}",
                       measured, threshold, why, list(PROBE_OVERRIDES[0 if _vocabulary_can_extend(results) else 1]), scope)
    if com is not None and term[0] < com[0] and _cfg(results, "masking.name") != "salient":
        return Finding("run.term_accuracy", "info",
                       f"domain terms gained less than common words: loss drop {term[0]:+.3f} (±{term[1]:.3f}){versus}",
                       measured, threshold, why, list(PROBE_OVERRIDES[1]), scope)
    return Finding("run.term_accuracy", "ok", f"domain terms learned: masked-term loss drop {term[0]:+.3f} (±{term[1]:.3f}){versus}",
                   measured, threshold, why, [], scope)


def clustered_mean_ci(values: Sequence[tuple[Any, float]], level: float = LEVEL) -> tuple[float, float, int] | None:
    """``(mean, half-width, documents)``: the mean of per-document means of ``(document, value)`` pairs and its
    t interval over documents (``sample_std``, ``n_docs - 1`` degrees of freedom). None below two documents."""
    from scipy.stats import t as student_t

    from dapt.sample_stats import sample_std

    per_doc: dict[Any, list[float]] = {}
    for doc, value in values:
        per_doc.setdefault(doc, []).append(float(value))
    means = [statistics.fmean(v) for v in per_doc.values()]
    k = len(means)
    if k < 2:
        return None
    mean = statistics.fmean(means)
    half = float(student_t.ppf(0.5 + level / 2, k - 1)) * sample_std(means) / math.sqrt(k)
    return mean, half, k


def _probe_sequences(docs: Sequence[str], tokenizer: Any, terms: set[str], common: set[str], max_len: int) -> list[dict[str, Any]]:
    """Masked copies of each document's first ``max_len`` tokens with the words they mask and their class."""
    out = []
    for index, doc in enumerate(docs):
        enc = tokenizer(doc, truncation=True, max_length=max_len, return_offsets_mapping=True)
        word_ids = enc.word_ids()
        spans: dict[int, list[int]] = {}
        for pos, w in enumerate(word_ids):
            if w is not None:
                spans.setdefault(w, []).append(pos)
        eligible = []
        for w, positions in spans.items():
            start, end = enc["offset_mapping"][positions[0]][0], enc["offset_mapping"][positions[-1]][1]
            word = doc[start:end].lower()
            cls = "term" if word in terms else "common" if word in common else None
            if cls:
                eligible.append((positions, cls))
        for j in range(PROBE_MASK_EVERY):
            chosen = eligible[j::PROBE_MASK_EVERY]
            if chosen:
                out.append({"input_ids": list(enc["input_ids"]), "words": chosen, "doc": index})
    return out


def _probe_scores(model: Any, tokenizer: Any, sequences: list[dict[str, Any]], batch_size: int, torch: Any
                  ) -> dict[str, list[tuple[float, float, int]]]:
    """Per masked occurrence and class: (fraction of its sub-tokens predicted, mean cross-entropy in nats,
    the document's index)."""
    scores: dict[str, list[tuple[float, float, int]]] = {"term": [], "common": []}
    mask_id = tokenizer.mask_token_id
    pad_id = tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for i in range(0, len(sequences), batch_size):
            batch = sequences[i:i + batch_size]
            width = max(len(s["input_ids"]) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq["input_ids"])] = torch.tensor(seq["input_ids"])
                attention[row, : len(seq["input_ids"])] = 1
            targets = ids.clone()
            for row, seq in enumerate(batch):
                for positions, _ in seq["words"]:
                    ids[row, positions] = mask_id
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            predicted = logits.argmax(-1)
            for row, seq in enumerate(batch):
                for positions, cls in seq["words"]:
                    right = (predicted[row, positions] == targets[row, positions]).float().mean().item()
                    nll = -log_probs[row, positions, targets[row, positions]].mean().item()
                    scores[cls].append((right, nll, seq["doc"]))
    return scores


# ----------------------------------------------------------------------------- one run

def diagnose_run(run_dir: Path) -> list[Finding]:
    """The findings of one finished run folder (holding results.json), most serious first."""
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise DataError(f"{run_dir}: no results.json (not a finished dapt run)")
    results = _read_results(run_dir)
    scope = _scope(run_dir)
    findings: list[Finding] = [check_domain_gain(results, scope)]
    for extra in (check_forgetting(results, scope), check_training_length(run_dir, results, scope),
                  check_loss_stability(run_dir, results, scope), check_corpus_passes(results, scope)):
        if extra is not None:
            findings.append(extra)
    findings += check_downstream(results, scope)
    error = results.get("error")
    if isinstance(error, dict):
        findings.append(Finding("run.incomplete", "error",
                                f"{error.get('stage')} failed after training: {error.get('type')}: {error.get('message')}",
                                {"error": error}, {}, "results.json holds only what finished", [], scope))
    return ranked(findings)


# ----------------------------------------------------------------------------- sweeps

def _doc_table(run_dir: Path, cache: dict[Path, Any]) -> dict[str, Any]:
    if run_dir not in cache:
        path = run_dir / "heldout_documents.json"
        try:
            cache[run_dir] = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            cache[run_dir] = {}
    return cache[run_dir]


def _docs(run: Run, metric: str, cache: dict[Path, Any]) -> dict[str, Any] | None:
    """Per-document loss sums of ``metric`` (``domain_dev_ppl_after`` -> after/domain_dev_ppl)."""
    if run.path is None or not metric.endswith("_after"):
        return None
    table = _doc_table(run.path, cache).get("after") or {}
    docs = table.get(metric.removesuffix("_after"))
    if isinstance(docs, dict) and docs.get("ids") and docs.get("sums") and docs.get("counts"):
        return docs
    return None


def _paired_ppl_change(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> tuple[float, float, float, float] | None:
    """Relative perplexity change (value vs reference) with a paired document-bootstrap CI and its two-sided
    p-value (the CI's t statistic on the log scale, documents - 1 degrees of freedom); matched cells (one run
    each) are averaged per document first. None when the documents differ."""
    import numpy as np
    from scipy.stats import t as student_t

    from dapt.modeling.perplexity import paired_change_ci

    ids, counts = pairs[0][1]["ids"], pairs[0][1]["counts"]
    for new, ref in pairs:
        if new["ids"] != ids or ref["ids"] != ids or new["counts"] != counts or ref["counts"] != counts:
            return None
    new_sums = np.mean([np.asarray(new["sums"], dtype=float) for new, _ in pairs], axis=0)
    ref_sums = np.mean([np.asarray(ref["sums"], dtype=float) for _, ref in pairs], axis=0)
    change, low, high = paired_change_ci(new_sums, ref_sums, np.asarray(counts, dtype=float), level=LEVEL)
    if not (math.isfinite(low) and math.isfinite(high)) or low <= -1:
        return None
    dof = len(counts) - 1
    se = (math.log1p(high) - math.log1p(low)) / (2 * float(student_t.ppf(0.5 + LEVEL / 2, dof)))
    estimate = math.log1p(change)
    p = 1.0 if se <= 0 and estimate == 0 else 0.0 if se <= 0 else float(2 * student_t.sf(abs(estimate) / se, dof))
    return change, low, high, p


def _welch(new: list[float], ref: list[float]) -> tuple[float, float, float, float] | None:
    """Difference of means ``mean(new) - mean(ref)`` with a Welch t interval and p-value; None below 2 values
    a side or with no spread at all."""
    from scipy.stats import ttest_ind

    if len(new) < 2 or len(ref) < 2:
        return None
    if max(new) == min(new) and max(ref) == min(ref):
        return None
    res = ttest_ind(new, ref, equal_var=False)
    ci = res.confidence_interval(confidence_level=LEVEL)
    return statistics.fmean(new) - statistics.fmean(ref), float(ci.low), float(ci.high), float(res.pvalue)


def _task_values(run: Run, task: str) -> tuple[list[float], list[Any]] | None:
    entry = (run.downstream or {}).get(task) or {}
    after = entry.get("after") or {}
    cell = after.get("dev_score") or {}
    values = [float(v) for v in cell.get("values") or [] if _num(v) is not None]
    return (values, list(after.get("seeds") or [])) if values else None


def _value_key(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True)


# Config keys that replicate a configuration rather than change it: never a knob to test, never matched on.
REPLICATE_KEYS = ("seed",)
ONE_RUN_NOTE = "one training run per arm; seed variance not included"


def sweep_effects(runs: Sequence[Run], key: str, other_keys: Sequence[str],
                  metrics: Sequence[str] = SWEEP_METRICS) -> list[dict[str, Any]]:
    """Rows ``{value, reference, metric, runs, change, ci, p, kind, method}``: the effect of each value of
    ``key`` against the reference value (the most common; ties: the first run's) on each metric, on the
    cells matched on the other swept keys (replicate keys such as ``seed`` excluded). ``moved`` is left to
    ``holm_moved`` (the sweep's rows are adjusted together)."""
    cache: dict[Path, Any] = {}
    other_keys = [k for k in other_keys if k not in REPLICATE_KEYS]
    groups: dict[str, list[Run]] = {}
    shown: dict[str, Any] = {}
    for run in runs:
        k = _value_key(run.config.get(key, "<missing>"))
        groups.setdefault(k, []).append(run)
        shown.setdefault(k, run.config.get(key, "<missing>"))
    reference = max(groups, key=lambda k: (len(groups[k]), -list(groups).index(k)))
    tasks = list(dict.fromkeys(t for r in runs for t in (r.downstream or {}) if isinstance((r.downstream or {}).get(t), dict)))
    rows: list[dict[str, Any]] = []

    def cells(members: list[Run]) -> dict[tuple[str, ...], list[Run]]:
        out: dict[tuple[str, ...], list[Run]] = {}
        for run in members:
            out.setdefault(tuple(_value_key(run.config.get(k)) for k in other_keys), []).append(run)
        return out

    ref_cells = cells(groups[reference])
    for value, members in groups.items():
        if value == reference:
            continue
        new_cells = cells(members)
        common = [c for c in new_cells if c in ref_cells]
        one_each = bool(common) and all(len(new_cells[c]) == 1 and len(ref_cells[c]) == 1 for c in common)
        # Welch pools matched cells only, and only cells with as many runs on each side (balanced), so that the
        # other swept knobs weigh the same in both arms.
        balanced = [c for c in common if len(new_cells[c]) == len(ref_cells[c])]
        new_runs = [m for c in balanced for m in new_cells[c]]
        ref_runs = [r for c in balanced for r in ref_cells[c]]
        pairs = [(new_cells[c][0], ref_cells[c][0]) for c in common] if one_each else []
        for metric in [*metrics, *(f"downstream/{t}/after/dev_score/mean" for t in tasks)]:
            row: dict[str, Any] = {"value": shown[value], "reference": shown[reference], "metric": metric,
                                   "runs": [len(members), len(groups[reference])],
                                   "matched_runs": [len(new_runs), len(ref_runs)], "matched_cells": len(common),
                                   "change": None, "ci": None, "p": None, "kind": None, "method": None}
            if metric.startswith("downstream/"):
                task = metric.split("/")[1]
                result = _task_effect(pairs, new_runs, ref_runs, task)
                if result:
                    (row["change"], low, high, row["p"]), row["method"] = result
                    row["ci"], row["kind"] = [low, high], "difference"
            else:
                result = None
                method = None
                docs_pairs = [(_docs(m, metric, cache), _docs(r, metric, cache)) for m, r in pairs]
                if pairs and all(a and b for a, b in docs_pairs):
                    result = _paired_ppl_change(docs_pairs)  # type: ignore[arg-type]
                    method = f"paired over held-out documents only ({ONE_RUN_NOTE})"
                if result is None:
                    new = [math.log(v) for v in (_num(m.metrics.get(metric)) for m in new_runs) if v and v > 0]
                    ref = [math.log(v) for v in (_num(r.metrics.get(metric)) for r in ref_runs) if v and v > 0]
                    welch = _welch(new, ref)
                    if welch:
                        result = (math.exp(welch[0]) - 1, math.exp(welch[1]) - 1, math.exp(welch[2]) - 1, welch[3])
                        method = ("Welch over runs of matched cells (log perplexity; training runs are the replicates)"
                                  if not one_each else
                                  "Welch over matched cells, one run each (log perplexity; seed variance only through the cells)")
                if result is None:
                    new_v = [_num(m.metrics.get(metric)) for m in new_runs]
                    ref_v = [_num(r.metrics.get(metric)) for r in ref_runs]
                    if all(v for v in new_v) and all(v for v in ref_v) and new_v and ref_v:
                        row["change"] = statistics.fmean(new_v) / statistics.fmean(ref_v) - 1  # type: ignore[arg-type]
                        row["kind"], row["method"] = "relative", (
                            "no uncertainty available (one run a side, no per-document data)" if one_each
                            else "no uncertainty available (too few matched runs)")
                else:
                    row["change"], row["ci"], row["p"] = result[0], [result[1], result[2]], result[3]
                    row["kind"], row["method"] = "relative", method
            row["moved"] = False
            rows.append(row)
    return rows


def holm_moved(rows: Sequence[dict[str, Any]], alpha: float = 1 - LEVEL) -> None:
    """Holm-adjust the rows' p-values together (``dapt.evaluation.stats.holm_adjust``; in place): ``p_holm`` and
    ``moved`` (Holm-adjusted p < ``alpha``). Rows without a p-value are not tests and never moved."""
    from dapt.evaluation.stats import holm_adjust

    adjusted = holm_adjust([r.get("p") for r in rows])
    for row, p_holm in zip(rows, adjusted):
        row["p_holm"] = p_holm
        row["moved"] = p_holm is not None and p_holm < alpha


def _task_effect(pairs: list[tuple[Run, Run]], new_runs: list[Run], ref_runs: list[Run], task: str
                 ) -> tuple[tuple[float, float, float, float], str] | None:
    """Dev-score difference for ``task`` and its p-value: paired over fine-tuning seeds when the matched cells
    hold one training run each with the same seeds, else Welch over the matched runs' seed scores."""
    if pairs:
        new_all: list[float] = []
        ref_all: list[float] = []
        ok = True
        for m, r in pairs:
            a, b = _task_values(m, task), _task_values(r, task)
            if not a or not b or a[1] != b[1] or len(a[0]) != len(b[0]):
                ok = False
                break
            new_all += a[0]
            ref_all += b[0]
        if ok and len(new_all) >= 2:
            from dapt.evaluation.stats import paired_comparison

            comp = paired_comparison(ref_all, new_all, alpha=1 - LEVEL)
            if comp.get("delta_ci") and comp.get("p_value") is not None:
                return ((comp["delta"], *comp["delta_ci"], comp["p_value"]),
                        f"paired over fine-tuning seeds ({ONE_RUN_NOTE})")
    if len(new_runs) >= 2 and len(ref_runs) >= 2:
        # Several training runs a side: they are the replicates (per-run mean over fine-tuning seeds), so the
        # training-seed variance is in the interval; pooling seed scores across runs would leave it out.
        new_means = [statistics.fmean(v[0]) for v in (_task_values(m, task) for m in new_runs) if v]
        ref_means = [statistics.fmean(v[0]) for v in (_task_values(r, task) for r in ref_runs) if v]
        welch = _welch(new_means, ref_means)
        return (welch, "Welch over the matched training runs (per-run mean over fine-tuning seeds)") if welch else None
    new = [v for m in new_runs for v in (_task_values(m, task) or ([], []))[0]]
    ref = [v for r in ref_runs for v in (_task_values(r, task) or ([], []))[0]]
    welch = _welch(new, ref)
    return (welch, f"Welch over fine-tuning seeds ({ONE_RUN_NOTE})") if welch else None


def _fmt_change(row: dict[str, Any]) -> str:
    if row["change"] is None:
        return "n/a"
    if row["kind"] == "relative":
        text = _pct(row["change"])
        return text + (f" [{_pct(row['ci'][0])}, {_pct(row['ci'][1])}]" if row["ci"] else "")
    return f"{row['change']:+.3f}" + (f" [{row['ci'][0]:+.3f}, {row['ci'][1]:+.3f}]" if row["ci"] else "")


def diagnose_sweep(sweep_dir: Path) -> list[Finding]:
    """Every finished job's findings (``scope``: its folder), plus one ``sweep.effect`` finding per swept
    parameter: which metrics moved (Holm-adjusted p < 0.05 over the sweep's rows) against the parameter's
    reference value, and a ``sweep.replicates`` finding when seeds vary."""
    sweep_dir = Path(sweep_dir)
    dirs = [d for d in find_run_dirs(sweep_dir) if d != sweep_dir]
    finished = [d for d in dirs if (d / "results.json").is_file()]
    if not finished:
        raise DataError(f"{sweep_dir}: no finished run (no results.json in it or its job folders)")
    names = {d: str(d.relative_to(sweep_dir)) for d in dirs}
    findings: list[Finding] = []
    for d in finished:
        for f in diagnose_run(d):
            f.scope = names[d]
            findings.append(f)
    scope = sweep_dir.name
    unfinished = [names[d] for d in dirs if d not in finished]
    if unfinished:
        findings.append(Finding("sweep.unfinished_jobs", "info", f"{len(unfinished)} job(s) without results.json: {', '.join(unfinished[:10])}",
                                {"jobs": unfinished}, {}, "failed or still running jobs are left out of the comparison", [], scope))
    runs = [load_run(d, names[d]) for d in finished]
    findings += sweep_findings(runs, scope)
    return ranked(findings)


def _partition(runs: Sequence[Run], key: str) -> tuple[int, ...]:
    """Which runs share a value of ``key`` (first-seen group numbers): keys with the same partition vary
    together (``masking.name`` and the options only one strategy has) and are one swept parameter."""
    seen: dict[str, int] = {}
    return tuple(seen.setdefault(_value_key(r.config.get(key, "<missing>")), len(seen)) for r in runs)


def _refines(fine: tuple[int, ...], coarse: tuple[int, ...]) -> bool:
    """Does the run grouping ``fine`` determine ``coarse`` (runs equal in ``fine`` are equal in ``coarse``)?"""
    mapping: dict[int, int] = {}
    return all(mapping.setdefault(f, c) == c for f, c in zip(fine, coarse))


def sweep_findings(runs: Sequence[Run], scope: str = "") -> list[Finding]:
    """One finding per swept parameter (config keys whose values differ between the runs; keys that vary
    together are one parameter, named by the first and listing the rest in ``measured["varies_with"]``)."""
    if len(runs) < 2:
        return []
    parameters: dict[tuple[int, ...], list[str]] = {}
    differences = list(config_differences(runs))
    replicates = {k: len({_value_key(r.config.get(k)) for r in runs}) for k in differences if k in REPLICATE_KEYS}
    for key in differences:
        if key not in REPLICATE_KEYS:
            parameters.setdefault(_partition(runs, key), []).append(key)
    # Options that exist for some values of another parameter only (masking.geometric_p for
    # masking=span) are nested in it: one parameter, never matched on when reading the other.
    def everywhere(keys: list[str]) -> bool:
        return any(all(k in r.config for r in runs) for k in keys)

    for partition in list(parameters):
        if everywhere(parameters[partition]):
            continue
        hosts = [p for p in parameters if p != partition and _refines(p, partition) and everywhere(parameters[p])]
        if hosts:
            host = max(hosts, key=lambda p: -len(set(p)))  # the coarsest host that determines it
            parameters[host] += parameters.pop(partition)
    findings = []
    if replicates:
        findings.append(Finding(
            "sweep.replicates", "info",
            "replicate dimension(s), not knobs: " + ", ".join(f"{k} ({n} values)" for k, n in replicates.items()),
            {"replicate_dimensions": replicates}, {},
            "runs that differ only in the seed repeat one configuration: their spread is the training noise the "
            "other parameters' effects are judged against, not an effect to test", [], scope))
    tables = {}
    for partition, keys in parameters.items():
        others = [group[0] for p, group in parameters.items() if p != partition]
        tables[partition] = sweep_effects(runs, keys[0], others)
    all_rows = [r for rows in tables.values() for r in rows]
    holm_moved(all_rows)  # Holm over every row (values x metrics) of every parameter: the sweep's tests
    tests = sum(r["p"] is not None for r in all_rows)
    for partition, keys in parameters.items():
        key = keys[0]
        rows = tables[partition]
        moved = [r for r in rows if r["moved"]]
        document_only = any(ONE_RUN_NOTE in (r["method"] or "") for r in rows)
        measured = {"parameter": key, "varies_with": keys[1:], "moved": sorted({r["metric"] for r in moved}),
                    "replicate_dimensions": replicates, "holm_tests": tests,
                    "table": [{k: r[k] for k in ("value", "reference", "metric", "runs", "matched_runs", "change", "ci",
                                                 "p", "p_holm", "method")} for r in rows]}
        threshold = {"moved": f"Holm-adjusted p < {1 - LEVEL:.2g} over all {tests} tests of the sweep (the CIs shown are "
                              f"unadjusted {LEVEL:.0%} intervals)"}
        why = ("each value's runs against the reference value's (the most common), on cells matched on the other swept "
               "parameters (seed is a replicate, not matched on): with one training run per arm, perplexities paired over "
               "the held-out documents (that interval measures held-out-document noise only, not training-seed noise); "
               "with several runs per cell, Welch over the runs (log perplexity), pooling only balanced matched cells; "
               "downstream dev scores paired over fine-tuning seeds, else Welch. 'Moved': Holm-adjusted p < "
               f"{1 - LEVEL:.2g} across all the sweep's rows (values x metrics x parameters)")
        note = f" (held-out documents only: {ONE_RUN_NOTE})" if document_only else ""
        if moved:
            parts = [f"{r['metric']} {_fmt_change(r)} at {key}={r['value']}" for r in moved[:4]]
            findings.append(Finding("sweep.effect", "info", f"{key} moves " + "; ".join(parts) + note, measured, threshold,
                                    why, [], scope))
        else:
            undetermined = all(r["ci"] is None for r in rows)
            findings.append(Finding("sweep.effect", "info" if undetermined else "ok",
                                    f"{key}: no uncertainty available (one run per value, no per-document data)" if undetermined
                                    else f"{key}: no metric moved (Holm-adjusted p < {1 - LEVEL:.2g}){note}",
                                    measured, threshold, why, [], scope))
    return findings


# ----------------------------------------------------------------------------- entry point

def diagnose_path(path: Path) -> dict[str, Any]:
    """``{"kind": "run"|"sweep", "path", "findings", "runs"}`` for a finished run folder or a sweep folder."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder (pass a finished run folder or a sweep folder)")
    if (path / "results.json").is_file():
        return {"kind": "run", "path": str(path), "findings": diagnose_run(path), "runs": [str(path)]}
    if is_run_dir(path):
        raise DataError(f"{path}: the run has no results.json (it failed or is still running)")
    dirs = [d for d in find_run_dirs(path) if (d / "results.json").is_file()]
    if not dirs:
        raise DataError(f"{path}: no results.json here or in its job folders (not a finished dapt run or sweep)")
    return {"kind": "sweep", "path": str(path), "findings": diagnose_sweep(path), "runs": [str(d) for d in dirs]}


def all_overrides(findings: Iterable[Finding]) -> list[list[str]]:
    """Every finding's override list (for checking that each composes)."""
    return [list(f.overrides) for f in findings if f.overrides]
