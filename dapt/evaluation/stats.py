"""Seed statistics: mean ± std with every per-seed value kept, and paired comparisons of models.

A DAPT gain is only a gain if it exceeds fine-tuning noise. The models compared (base, control,
adapted) are fine-tuned with the same seeds (same classifier init, same data order), so the seeds
pair up and a paired t-test over the per-seed differences (``scipy.stats.ttest_rel``) is the test.

What the numbers can and cannot say is reported with them, because 3-5 seeds buy little power:

* ``delta_ci``: the t-based (1 - alpha) confidence interval of the mean paired difference;
* ``mde``: the smallest true difference the test would detect with 80% power at this n and the
  observed spread; an effect smaller than that is one the experiment could not have seen;
* ``p_holm``: the p-value Holm-adjusted over every comparison in one results table (tasks x
  comparisons), because a table of several tests is read as a whole; ``significant`` uses it.

The verdict never calls an effect absent because p >= alpha: that takes a confidence interval lying
entirely inside ±``margin`` (an equivalence margin, ``downstream.equivalence_margin``). Otherwise it
says "inconclusive" with the interval. All functions here are pure and delegate the maths to scipy.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, MutableMapping, Sequence

from dapt.sample_stats import sample_std

# 1 F1 point. Don't Stop Pretraining's DAPT gains are ~0.5-3+ points, and single-seed fine-tuning
# noise on these tasks is of the same order, so a difference that is shown to be under one point is
# one a paper would not claim; a smaller margin needs far more seeds to ever be demonstrated.
DEFAULT_EQUIVALENCE_MARGIN = 0.01
POWER = 0.8

def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "values", "n"}``; std is the sample std (ddof=1), 0.0 for a single seed."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "std": None, "values": [], "n": 0}
    return {"mean": statistics.fmean(vals), "std": sample_std(vals), "values": vals, "n": len(vals)}


def aggregate_seeds(per_seed: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Summaries ``test_<m>`` and ``dev_<m>`` for each metric over per-seed results (seed order kept)."""
    out: dict[str, Any] = {}
    for split in ("test", "dev"):
        for metric in metrics:
            values = [r[split][metric] for r in per_seed if metric in r.get(split, {})]
            if values:
                out[f"{split}_{metric}"] = summarize(values)
    return out


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def minimum_detectable_effect(sd: float, n: int, *, alpha: float = 0.05, power: float = POWER) -> float | None:
    """Smallest true mean difference a two-sided paired t-test detects with ``power`` at level ``alpha``.

    Exact solution with the noncentral t distribution: with ``df = n - 1`` and critical value
    ``c = t_{1-alpha/2, df}``, the power at effect ``d`` (in units of ``sd``) is
    ``P(T > c) + P(T < -c)`` for ``T ~ nct(df, d * sqrt(n))``; ``brentq`` finds the ``d`` where it equals
    ``power`` and the result is ``d * sd``. (The usual normal-style shortcut
    ``(t_{1-alpha/2} + t_{power}) * sd / sqrt(n)`` is close for large n but too small at n = 3.)
    ``None`` when undefined: fewer than 2 pairs or ``sd`` not positive.
    """
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    if n < 2 or not sd or not math.isfinite(sd) or sd <= 0:
        return None
    df = n - 1
    crit = float(t.ppf(1 - alpha / 2, df))

    def shortfall(d: float) -> float:
        nc = d * math.sqrt(n)
        upper, lower = float(nct.sf(crit, df, nc)), float(nct.cdf(-crit, df, nc))
        # scipy's nct returns NaN for far tails (large nc); there the tail is 0 or 1 for all purposes.
        upper = upper if math.isfinite(upper) else float(nc > crit)
        lower = lower if math.isfinite(lower) else 0.0
        return upper + lower - power

    high = 1.0
    while shortfall(high) < 0:  # power rises monotonically with d; bracket the root
        high *= 2
    return float(brentq(shortfall, 0.0, high, xtol=1e-10)) * sd


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (``None`` entries are not tests and keep ``None``).

    Sort the m defined p-values ascending; the i-th (0-based) gets ``(m - i) * p``, made monotone
    with a running maximum and capped at 1. Rejecting where the adjusted p < alpha controls the
    family-wise error rate at alpha, with no assumption about dependence between the tests.
    (statsmodels' ``multipletests(method="holm")`` computes the same; it is not a dependency.)
    """
    defined = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(defined)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * float(p)))
        out[i] = running
    return out


def _fmt(x: float) -> str:
    """Signed, 3 decimals (scores are fractions: 0.010 is one F1 point); no "-0.000"."""
    return f"{0.0 if round(x, 3) == 0 else x:+.3f}"


def _p_text(p: float, m: int) -> str:
    return f"Holm-adjusted p={p:.3g} over {m} comparisons" if m > 1 else f"p={p:.3g}"


def _interval_at(comparison: Mapping[str, Any], alpha: float) -> tuple[float, float]:
    """The (1 - alpha) t interval of the mean paired difference, from the comparison's delta, SD and n."""
    from scipy.stats import t

    half = float(t.ppf(1 - alpha / 2, comparison["n"] - 1)) * comparison["delta_std"] / math.sqrt(comparison["n"])
    return comparison["delta"] - half, comparison["delta"] + half


def verdict(comparison: Mapping[str, Any], *, margin: float = DEFAULT_EQUIVALENCE_MARGIN) -> str:
    """The plain-words reading of a comparison (keys of ``paired_comparison``), in this order:

    * fewer than 2 seeds or no variance: says so (no test);
    * ``significant`` (Holm-adjusted p < alpha): "significant gain" / "significant loss";
    * the whole CI inside ±margin: "no effect larger than <margin>"; in a Holm family of m the CI at
      alpha/m (Bonferroni, as Holm's first step), so that claiming no effect anywhere in a table is
      held to the family-wise level too, like claiming one;
    * otherwise "inconclusive (CI a..b)", with the minimum detectable effect: the data cannot tell
      a real effect from none, which is not the same as showing there is none.
    """
    n, delta = comparison.get("n", 0), comparison.get("delta")
    if n < 2:
        return "one seed: no test possible, run more seeds before reading the difference"
    ci, p_holm = comparison.get("delta_ci"), comparison.get("p_holm")
    if ci is None or p_holm is None:
        if not delta:
            return "no difference on any seed (identical scores); no variance to test"
        return f"identical difference on every seed ({_fmt(delta)}); no variance to test"
    level = round(100 * (1 - comparison.get("alpha", 0.05)))
    p_text = _p_text(p_holm, comparison.get("holm_m", 1))
    interval = f"{level}% CI {_fmt(ci[0])}..{_fmt(ci[1])}"
    if comparison.get("significant"):
        return f"significant {'gain' if delta > 0 else 'loss'}: {_fmt(delta)} ({interval}, {p_text})"
    equivalence_ci, m = ci, comparison.get("holm_m", 1)
    if m > 1:
        equivalence_ci, level = _interval_at(comparison, comparison.get("alpha", 0.05) / m), 100 * (1 - comparison.get("alpha", 0.05) / m)
        interval = f"{level:.4g}% CI {_fmt(equivalence_ci[0])}..{_fmt(equivalence_ci[1])}, at alpha/{m} for {m} comparisons"
    if -margin <= equivalence_ci[0] and equivalence_ci[1] <= margin:
        return f"no effect larger than {margin:g}: {_fmt(delta)} ({interval} inside ±{margin:g})"
    mde = comparison.get("mde")
    tail = f"; {n} seeds detect only effects >= {mde:.3f} with 80% power" if mde is not None else ""
    return f"inconclusive (CI {_fmt(ci[0])}..{_fmt(ci[1])}): {_fmt(delta)}, {p_text}{tail}"


def paired_comparison(
    before: Sequence[float],
    after: Sequence[float],
    *,
    alpha: float = 0.05,
    margin: float = DEFAULT_EQUIVALENCE_MARGIN,
) -> dict[str, Any]:
    """Paired t-test of ``after - before`` over seeds, with its CI and minimum detectable effect.

    Returns ``delta`` (mean difference), ``delta_std`` (SD of the differences), ``t``, ``p_value``,
    ``delta_ci`` (``[low, high]``, the (1 - alpha) t interval of the mean difference), ``mde``
    (``minimum_detectable_effect`` at 80% power), ``n``, ``alpha``, ``margin``, and, as a family of
    one, ``p_holm`` (= ``p_value``), ``holm_m`` (1), ``significant`` (p_holm < alpha) and ``verdict``.
    A table of several comparisons re-decides the last four with ``apply_holm``. ``t``, ``p_value``,
    ``delta_ci`` and ``mde`` are ``None`` when undefined: one seed, or identical differences.
    """
    from scipy.stats import ttest_rel

    if len(before) != len(after):
        raise ValueError(f"paired test needs the same seeds: {len(before)} before vs {len(after)} after")
    diffs = [float(a) - float(b) for a, b in zip(after, before)]
    n = len(diffs)
    out: dict[str, Any] = {"delta": None, "delta_std": None, "t": None, "p_value": None, "delta_ci": None, "mde": None,
                           "n": n, "alpha": alpha, "margin": margin, "p_holm": None, "holm_m": 1, "significant": False}
    if n == 0:
        out["verdict"] = "no seeds"
        return out
    out["delta"] = statistics.fmean(diffs)
    # Rounding in a - b is relative to the scores, not to their (small) difference.
    out["delta_std"] = sample_std(diffs, scale=max((abs(float(x)) for x in (*before, *after)), default=0.0))
    if n > 1 and out["delta_std"] > 0:
        res = ttest_rel([float(a) for a in after], [float(b) for b in before])
        out["t"], out["p_value"] = _finite(res.statistic), _finite(res.pvalue)
        ci = res.confidence_interval(confidence_level=1 - alpha)
        out["delta_ci"] = [float(ci.low), float(ci.high)]
        out["mde"] = minimum_detectable_effect(out["delta_std"], n, alpha=alpha)
    out["p_holm"] = out["p_value"]
    out["significant"] = out["p_holm"] is not None and out["p_holm"] < alpha
    out["verdict"] = verdict(out, margin=margin)
    return out


def apply_holm(comparisons: Sequence[MutableMapping[str, Any]]) -> None:
    """Holm-adjust a table's comparisons together: sets ``p_holm``, ``holm_m``, ``significant`` and
    ``verdict`` on each (in place; each keeps its own ``alpha`` and ``margin``), and recomputes ``mde``
    at ``alpha / m`` (the unadjusted value stays in ``mde_unadjusted``)."""
    adjusted = holm_adjust([c.get("p_value") for c in comparisons])
    m = sum(p is not None for p in adjusted)
    for comparison, p_holm in zip(comparisons, adjusted):
        comparison["p_holm"] = p_holm
        comparison["holm_m"] = m
        # Significance is now decided at Holm's level, whose strictest step is alpha / m: the effect
        # the table can detect is computed there (an unadjusted MDE would promise too much).
        if comparison.get("mde") is not None:
            comparison.setdefault("mde_unadjusted", comparison["mde"])  # idempotent: a second call keeps it
            comparison["mde"] = minimum_detectable_effect(comparison["delta_std"], comparison["n"],
                                                          alpha=comparison.get("alpha", 0.05) / max(m, 1))
        comparison["significant"] = p_holm is not None and p_holm < comparison.get("alpha", 0.05)
        comparison["verdict"] = verdict(comparison, margin=comparison.get("margin", DEFAULT_EQUIVALENCE_MARGIN))
