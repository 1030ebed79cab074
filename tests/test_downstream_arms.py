"""Three arms (base, control, adapted), Holm over the table, cached control scores and the table,
with fine-tuning replaced by fixed per-seed scores (the real loop is covered by test_finetune.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from dapt.evaluation import downstream
from dapt.evaluation.finetuning import DownstreamConfig
from dapt.evaluation.report import format_downstream_table
from tests.helpers import FakeRun, group_option

REPO = Path(__file__).resolve().parents[1]

# test F1 per (model, seed): adapted beats base clearly, and control by about as much as noise.
SCORES = {
    "base": [0.700, 0.710, 0.690, 0.705, 0.695],
    "control": [0.720, 0.700, 0.715, 0.690, 0.710],
    "adapted": [0.740, 0.748, 0.731, 0.744, 0.736],
}


def fake_scores(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Replace prepare/finetune_seed by a lookup in SCORES; returns the (model, seed) calls made."""
    calls: list[tuple[str, int]] = []

    def prepare(source: str, data: Any, cfg: DownstreamConfig) -> Any:
        return (Path(source).name, data.task)

    def finetune_seed(prepared: Any, seed: int, cfg: DownstreamConfig) -> dict[str, Any]:
        name, task = prepared
        calls.append((name, seed))
        value = SCORES[name][seed]
        metrics: dict[str, Any] = {task.metric: value, "per_type": {"Disease": {"f1": value}}, "per_label": {}}
        return {"seed": seed, "dev": {task.metric: value}, "test": metrics, "best_epoch": 1, "epochs_run": 1, "seconds": 0.0}

    monkeypatch.setattr(downstream, "prepare", prepare)
    monkeypatch.setattr(downstream, "finetune_seed", finetune_seed)
    return calls


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, str]:
    out = {}
    for role, name in (("before", "base"), ("control", "control"), ("after", "adapted")):
        path = tmp_path / "models" / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps({"name": name}))  # a distinct content hash each
        out[role] = str(path)
    return out


def train_cfg(data_dir: Path, cache_dir: Path, tasks: list[str], **overrides: Any) -> Any:
    node = group_option("downstream", "tiny")
    return OmegaConf.create({"tasks": tasks, "downstream": OmegaConf.merge(node, {"seeds": [0, 1, 2, 3, 4], **overrides}),
                             "paths": {"data_dir": str(data_dir), "cache_dir": str(cache_dir)}})


def test_three_arms_compare_after_with_base_and_control(monkeypatch, models, data_dir, tmp_path):
    calls = fake_scores(monkeypatch)
    cfg = train_cfg(data_dir, tmp_path / "cache", ["ncbi_disease", "ncbi_disease_hub"][:1])
    run = FakeRun()
    results = downstream.evaluate_downstream(cfg, before=models["before"], after=models["after"], control=models["control"],
                                             run_dir=tmp_path / "run", wandb_run=run)
    entry = results["ncbi_disease"]
    assert [r for r in ("before", "control", "after") if r in entry] == ["before", "control", "after"]
    assert entry["control"]["test_f1"]["values"] == SCORES["control"]
    # after - before at the top level (the keys results.json always had, plus CI / MDE / Holm) ...
    assert entry["delta"] == pytest.approx(0.0398) and entry["delta_ci"][0] > 0 and entry["mde"] > 0
    assert entry["significant"] and entry["verdict"].startswith("significant gain")
    # ... and after - control under vs_control, Holm-adjusted together with it (2 comparisons).
    vs = entry["vs_control"]
    assert vs["delta"] == pytest.approx(sum(SCORES["adapted"]) / 5 - sum(SCORES["control"]) / 5)
    assert entry["holm_m"] == vs["holm_m"] == 2
    assert sorted([entry["p_holm"], vs["p_holm"]]) == pytest.approx(
        sorted([min(1, 2 * min(entry["p_value"], vs["p_value"])), max(2 * min(entry["p_value"], vs["p_value"]), vs["p_value"], entry["p_value"])]))
    assert vs["significant"] == (vs["p_holm"] < 0.05)
    json.dumps(results, allow_nan=False)
    assert json.loads((tmp_path / "run" / "downstream.json").read_text()) == json.loads(json.dumps(results))
    # W&B: control block, CI bounds, MDE, Holm p, and vs_control keys.
    s = run.summary
    assert "downstream/ncbi_disease/control/test_f1/mean" in s and s["downstream/ncbi_disease/test_f1/mean"] == entry["after"]["test_f1"]["mean"]
    assert s["downstream/ncbi_disease/delta_ci_low"] == entry["delta_ci"][0] and s["downstream/ncbi_disease/mde"] == entry["mde"]
    assert s["downstream/ncbi_disease/p_holm"] == entry["p_holm"] and s["downstream/ncbi_disease/vs_control/delta"] == vs["delta"]
    assert len(run.logged[0]["downstream/per_seed"].data) == 3 * 5
    # Control scores are cached like the base: a second run fine-tunes only the adapted model.
    calls.clear()
    again = downstream.evaluate_downstream(cfg, before=models["before"], after=models["after"], control=models["control"],
                                           run_dir=tmp_path / "run2")
    assert {name for name, _ in calls} == {"adapted"}
    assert again["ncbi_disease"]["control"]["cached_seeds"] == [0, 1, 2, 3, 4]


def test_holm_family_is_the_whole_table(monkeypatch, models, data_dir, tmp_path):
    fake_scores(monkeypatch)
    cfg = train_cfg(data_dir, tmp_path / "cache", ["ncbi_disease", "chemprot"])
    results = downstream.evaluate_downstream(cfg, before=models["before"], after=models["after"], control=models["control"],
                                             run_dir=tmp_path / "run")
    comparisons = [c for e in results.values() for c in downstream.comparisons_of(e)]
    assert len(comparisons) == 4 and all(c["holm_m"] == 4 for c in comparisons)
    from dapt.evaluation.stats import holm_adjust

    assert [c["p_holm"] for c in comparisons] == pytest.approx(holm_adjust([c["p_value"] for c in comparisons]))


def test_two_arms_have_no_vs_control(monkeypatch, models, data_dir, tmp_path):
    fake_scores(monkeypatch)
    cfg = train_cfg(data_dir, tmp_path / "cache", ["ncbi_disease"], seeds=[0, 1, 2])
    entry = downstream.evaluate_downstream(cfg, before=models["before"], after=models["after"], run_dir=tmp_path / "run")["ncbi_disease"]
    assert "vs_control" not in entry and "control" not in entry and entry["holm_m"] == 1
    assert {"delta", "delta_ci", "mde", "p_value", "p_holm", "significant", "verdict"} <= set(entry)


def test_unknown_role_is_a_config_error(models, data_dir):
    from dapt.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown model roles"):
        downstream.evaluate_models(["ncbi_disease"], {"adapted": models["after"]}, DownstreamConfig(), data_dir=data_dir, cache_dir=None)


def _three_arm_entry(n: int = 3) -> dict[str, Any]:
    from dapt.evaluation.stats import apply_holm, paired_comparison

    def block(name: str) -> dict[str, Any]:
        vals = SCORES[name][:n]
        mean = sum(vals) / n
        return {"model": f"/models/{name}", "test_f1": {"mean": mean, "std": 0.01, "values": vals, "n": n}}

    entry: dict[str, Any] = {"metric": "f1", "budget": "demo", "before": block("base"), "control": block("control"),
                             "after": block("adapted")}
    entry.update(paired_comparison(SCORES["base"][:n], SCORES["adapted"][:n]))
    entry["vs_control"] = paired_comparison(SCORES["control"][:n], SCORES["adapted"][:n])
    apply_holm([entry, entry["vs_control"]])
    return entry


def test_table_shows_three_arms_with_cis_in_100_columns():
    from rich.console import Console

    results = {"ncbi_disease": _three_arm_entry(5), "chemprot": _three_arm_entry(3)}
    console = Console(record=True, width=100)
    console.print(format_downstream_table(results))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 100
    for header in ("base", "control", "adapted", "Δ vs base", "Δ vs control", "MDE", "gain", "inconclusive"):
        assert header in text, header
    entry = results["ncbi_disease"]
    lo, hi = entry["delta_ci"]
    assert f"{entry['delta']:+.3f}" in text and f"{lo:+.3f}..{hi:+.3f}" in text
    assert f"{entry['mde']:.3f}" in text and "within noise" not in text
    assert "0.740" in text and "0.748" in text  # per-seed scores are kept
