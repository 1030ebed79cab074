"""Paired comparisons say what 3-5 seeds can support: CI, minimum detectable effect, Holm, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from dapt.evaluation.stats import apply_holm, holm_adjust, minimum_detectable_effect, paired_comparison, verdict


def test_ci_covers_true_difference_at_nominal_rate():
    """2,000 simulated 5-seed experiments: the 95% CI holds the true mean difference ~95% of the time."""
    rng = np.random.default_rng(0)
    true_delta, sd, n, runs = 0.02, 0.03, 5, 2000
    before = rng.normal(0.70, 0.05, size=(runs, n))
    after = before + rng.normal(true_delta, sd, size=(runs, n))
    covered = 0
    for b, a in zip(before, after):
        low, high = paired_comparison(b.tolist(), a.tolist())["delta_ci"]
        covered += low <= true_delta <= high
    assert 0.93 <= covered / runs <= 0.97


def test_ci_matches_t_interval_and_alpha():
    before, after = [0.70, 0.72, 0.69, 0.71], [0.74, 0.75, 0.73, 0.76]
    diffs = np.subtract(after, before)
    half = sps.t.ppf(0.975, 3) * diffs.std(ddof=1) / math.sqrt(4)
    cmp = paired_comparison(before, after)
    assert cmp["delta_ci"] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    wide = paired_comparison(before, after, alpha=0.01)["delta_ci"]
    assert wide[0] < cmp["delta_ci"][0] and wide[1] > cmp["delta_ci"][1]


def test_mde_has_80_percent_power_in_simulation():
    """At the reported MDE a two-sided paired t-test rejects in ~80% of simulated experiments."""
    rng = np.random.default_rng(1)
    for n in (3, 5):
        mde = minimum_detectable_effect(1.0, n)
        diffs = rng.normal(mde, 1.0, size=(20000, n))
        power = float(np.mean(sps.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05))
        assert power == pytest.approx(0.8, abs=0.05), (n, mde, power)


def test_mde_known_values():
    # Large n: the noncentral-t solution tends to the normal formula (z_.975 + z_.8) sd / sqrt(n).
    n = 400
    assert minimum_detectable_effect(2.0, n) == pytest.approx((1.959964 + 0.841621) * 2.0 / math.sqrt(n), rel=0.01)
    # Small n: the shortcut (t_.975 + t_.8) sd / sqrt(n) understates it; the exact value is larger.
    shortcut = (sps.t.ppf(0.975, 2) + sps.t.ppf(0.8, 2)) / math.sqrt(3)
    assert minimum_detectable_effect(1.0, 3) > shortcut
    # The audit's case: 3 seeds, SD of differences ~0.035 F1 -> only effects of ~0.11 F1 are detectable.
    assert minimum_detectable_effect(0.035, 3) == pytest.approx(0.114, abs=0.002)
    assert minimum_detectable_effect(0.0, 5) is None and minimum_detectable_effect(1.0, 1) is None


def test_undefined_cases_are_none_with_a_clear_verdict():
    one = paired_comparison([0.7], [0.8])
    assert one["p_value"] is None and one["delta_ci"] is None and one["mde"] is None and "one seed" in one["verdict"]
    same = paired_comparison([0.7, 0.7], [0.7, 0.7])
    assert same["p_value"] is None and same["delta_ci"] is None and "no variance" in same["verdict"]
    shift = paired_comparison([0.7, 0.6], [0.72, 0.62])
    assert shift["mde"] is None and "identical difference on every seed (+0.020)" in shift["verdict"]
    assert not any(c["significant"] for c in (one, same, shift))


def test_holm_matches_hand_computation():
    # m = 4 defined p-values, sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04;
    # running max -> 0.02, 0.03, 0.06, 0.06. None is not a test and stays None.
    assert holm_adjust([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm_adjust([0.4, 0.5]) == pytest.approx([0.8, 0.8])
    assert holm_adjust([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    assert holm_adjust([]) == []


def test_holm_decides_significance_across_a_table():
    """p = 0.03 alone is significant; as one of three comparisons (Holm x3 = 0.09) it is not."""
    base = [0.700, 0.710, 0.690, 0.705, 0.695]
    gain = paired_comparison(base, [b + d for b, d in zip(base, [0.030, 0.002, 0.018, 0.040, 0.015])])
    assert 0.01 < gain["p_value"] < 0.05 and gain["significant"] and gain["p_holm"] == gain["p_value"]
    others = [paired_comparison(base, [b + d for b, d in zip(base, [0.03, -0.04, 0.01, -0.02, 0.02])]) for _ in range(2)]
    apply_holm([gain, *others])
    assert gain["p_holm"] == pytest.approx(min(1.0, 3 * gain["p_value"]))
    assert not gain["significant"] and gain["verdict"].startswith("inconclusive")
    assert "Holm-adjusted" in gain["verdict"] and all(c["holm_m"] == 3 for c in (gain, *others))


def test_verdict_wording_for_the_three_cases():
    gain = paired_comparison([0.70, 0.72, 0.69, 0.71], [0.74, 0.75, 0.73, 0.76])
    assert gain["significant"] and gain["verdict"].startswith("significant gain: +0.040 (95% CI +0.027..+0.053")
    loss = paired_comparison([0.74, 0.75, 0.73, 0.76], [0.70, 0.72, 0.69, 0.71])
    assert loss["verdict"].startswith("significant loss: -0.040")
    noisy = paired_comparison([0.70, 0.75, 0.68], [0.72, 0.71, 0.70])
    assert not noisy["significant"]
    assert noisy["verdict"].startswith("inconclusive (CI -0.086..+0.086)")
    assert "0.113 with 80% power" in noisy["verdict"]
    tight = paired_comparison([0.700, 0.701, 0.700, 0.700, 0.700], [0.701, 0.700, 0.702, 0.700, 0.701])
    assert not tight["significant"] and tight["verdict"].startswith("no effect larger than 0.01:")
    # The margin is configurable: the same data is inconclusive against a 0.001 margin.
    assert paired_comparison([0.700, 0.701, 0.700, 0.700, 0.700], [0.701, 0.700, 0.702, 0.700, 0.701],
                             margin=0.001)["verdict"].startswith("inconclusive")
    for cmp in (gain, loss, noisy, tight):
        assert "within noise" not in cmp["verdict"]
        assert verdict(cmp, margin=cmp["margin"]) == cmp["verdict"]


def test_keys_kept_and_new_keys_present():
    cmp = paired_comparison([0.70, 0.75, 0.68], [0.72, 0.71, 0.70])
    assert set(cmp) >= {"delta", "delta_std", "t", "p_value", "n", "alpha", "significant", "verdict",
                        "delta_ci", "mde", "p_holm", "margin"}
    assert cmp["p_value"] == pytest.approx(sps.ttest_rel([0.72, 0.71, 0.70], [0.70, 0.75, 0.68]).pvalue)


def test_mde_is_reported_at_the_holm_level_of_the_table():
    """Four comparisons in one table: significance needs p < alpha/4 at Holm's first step, so the
    detectable effect is the one at alpha/4, larger than the unadjusted one."""
    from dapt.evaluation.stats import apply_holm, minimum_detectable_effect, paired_comparison

    rng = np.random.default_rng(0)
    comps = [paired_comparison(list(rng.normal(0.7, 0.02, 5)), list(rng.normal(0.7, 0.02, 5))) for _ in range(4)]
    unadjusted = [c["mde"] for c in comps]
    apply_holm(comps)
    for c, before in zip(comps, unadjusted):
        assert c["mde_unadjusted"] == before
        assert c["mde"] == pytest.approx(minimum_detectable_effect(c["delta_std"], 5, alpha=0.05 / 4))
        assert c["mde"] > 1.3 * before


def test_no_effect_in_a_holm_family_needs_the_ci_at_alpha_over_m_inside_the_margin():
    """Claiming "no effect" in one of m comparisons is held to the family-wise level as claiming an
    effect is: an unadjusted CI inside ±margin is not enough when the alpha/m CI is wider."""
    from scipy.stats import t

    from dapt.evaluation.stats import apply_holm, paired_comparison

    base = [0.700, 0.710, 0.690, 0.705, 0.695]
    diffs = [0.004, 0.009, -0.001, 0.007, 0.001]
    alone = paired_comparison(base, [b + d for b, d in zip(base, diffs)])
    assert alone["verdict"].startswith("no effect larger than 0.01") and alone["delta_ci"][1] < 0.01
    family = [paired_comparison(base, [b + d for b, d in zip(base, diffs)]) for _ in range(4)]
    apply_holm(family)
    half = t.ppf(1 - 0.05 / 8, 4) * family[0]["delta_std"] / math.sqrt(5)
    assert family[0]["delta"] + half > 0.01  # the alpha/4 interval leaves the margin
    assert family[0]["verdict"].startswith("inconclusive")
    wide_margin = [paired_comparison(base, [b + d for b, d in zip(base, diffs)], margin=0.02) for _ in range(4)]
    apply_holm(wide_margin)
    assert wide_margin[0]["verdict"].startswith("no effect larger than 0.02") and "at alpha/4 for 4 comparisons" in wide_margin[0]["verdict"]
