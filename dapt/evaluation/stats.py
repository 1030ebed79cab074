"""Seed statistics: mean ± std with every per-seed value kept, and the paired before/after test.

A DAPT gain is only a gain if it exceeds fine-tuning noise. Before and after are fine-tuned with the
same seeds (same classifier init, same data order), so the seeds pair up and a paired t-test over the
per-seed differences (``scipy.stats.ttest_rel``) is the right test; the verdict says in words whether
the difference is within noise.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values", "n"}``; std is the sample std (ddof=1), 0.0 for a single seed."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "std": None, "values": [], "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "values": vals, "n": len(vals)}


def aggregate_seeds(per_seed: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Summaries ``test_<m>`` and ``dev_<m>`` for each metric over per-seed results (seed order kept)."""
    out: dict[str, Any] = {}
    for split in ("test", "dev"):
        for metric in metrics:
            values = [r[split][metric] for r in per_seed if metric in r.get(split, {})]
            if values:
                out[f"{split}_{metric}"] = summarize(values)
    return out


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def paired_comparison(before: Sequence[float], after: Sequence[float], *, alpha: float = 0.05) -> dict[str, Any]:
    """Paired t-test of ``after - before`` over seeds.

    Returns ``delta`` (mean difference), ``delta_std``, ``t``, ``p_value`` (None when undefined: one
    seed, or identical differences), ``significant`` and a plain-words ``verdict``.
    """
    from scipy.stats import ttest_rel

    if len(before) != len(after):
        raise ValueError(f"paired test needs the same seeds: {len(before)} before vs {len(after)} after")
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    n = len(diffs)
    if n == 0:
        return {"delta": None, "delta_std": None, "t": None, "p_value": None, "n": 0, "significant": False, "verdict": "no seeds"}
    delta = statistics.fmean(diffs)
    delta_std = statistics.stdev(diffs) if n > 1 else 0.0
    t_stat: float | None = None
    p_value: float | None = None
    if n > 1 and delta_std > 0:
        res = ttest_rel(list(map(float, after)), list(map(float, before)))
        t_stat, p_value = _finite(res.statistic), _finite(res.pvalue)
    significant = p_value is not None and p_value < alpha
    if n < 2:
        verdict = "one seed: no test possible, run more seeds before reading the difference"
    elif p_value is None:
        verdict = "no difference" if delta == 0 else f"identical difference on every seed ({delta:+.4f}); no variance to test"
    elif significant:
        verdict = f"{'gain' if delta > 0 else 'loss'} beyond seed noise (paired t-test p={p_value:.3g} < {alpha})"
    else:
        verdict = f"within noise: no significant difference over {n} seeds (paired t-test p={p_value:.3g} >= {alpha})"
    return {
        "delta": delta,
        "delta_std": delta_std,
        "t": t_stat,
        "p_value": p_value,
        "n": n,
        "alpha": alpha,
        "significant": significant,
        "verdict": verdict,
    }
