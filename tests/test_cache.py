"""The downstream result cache keys on everything that changes a score, and heals corrupt entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dapt.evaluation import cache as cache_mod
from dapt.evaluation.cache import CACHE_VERSION, recipe_fingerprint, score_cache_key

# The fine-tuning + scoring recipe's code (cache.recipe_sources()) pinned next to its version.
# If this fails you changed that code: if cached scores may differ, bump CACHE_VERSION in
# dapt/evaluation/cache.py and add {new version: new fingerprint} here; if the edit cannot change a
# score (comments, docstrings, a pure refactor), update the fingerprint of the current version.
PINNED_RECIPE = {2: "39e2551e86091b29"}  # re-pinned: load_task's dev carve moved into tasks.carve_dev unchanged (selection reuses it); re-pinned for the remedies (issue 14): optim.param_groups/build_optimizer gained optional lr scales that fine-tuning never passes; re-pinned: the one-way restructuring (issue 13) moved code, removed the unread task `domain` key (its cache key changes once; scores do not) and added the optimizer module and dapt.labels, which fine-tuning runs through, to the fingerprint


def test_recipe_code_is_pinned_to_cache_version():
    assert CACHE_VERSION in PINNED_RECIPE, (
        f"CACHE_VERSION={CACHE_VERSION} has no pinned recipe fingerprint: add {CACHE_VERSION}: "
        f"'{recipe_fingerprint()}' to PINNED_RECIPE in tests/test_cache.py")
    assert recipe_fingerprint() == PINNED_RECIPE[CACHE_VERSION], (
        f"the fine-tuning/scoring code changed (fingerprint {recipe_fingerprint()}, pinned "
        f"{PINNED_RECIPE[CACHE_VERSION]} for CACHE_VERSION={CACHE_VERSION}): bump CACHE_VERSION in "
        "dapt/evaluation/cache.py so stale cached downstream scores are not reused, and pin the new "
        "fingerprint in tests/test_cache.py (only update the fingerprint if no score can change)")


def test_cache_version_bumped_since_the_optimizer_change():
    assert CACHE_VERSION >= 2


KEY_ARGS = dict(model_fp="m" * 64, task_fp={"spec": {"name": "t"}, "data": "d"}, seed=0, hyperparameters={"lr": 1e-4})


def test_key_depends_on_recipe_version_and_library_versions(monkeypatch):
    key = score_cache_key(**KEY_ARGS)
    assert key == score_cache_key(**KEY_ARGS)
    for changed in ({"seed": 1}, {"hyperparameters": {"lr": 2e-4}}, {"model_fp": "n" * 64},
                    {"task_fp": {"spec": {"name": "t"}, "data": "e"}}):
        assert score_cache_key(**{**KEY_ARGS, **changed}) != key, changed
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", CACHE_VERSION + 1)
    assert score_cache_key(**KEY_ARGS) != key
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", CACHE_VERSION)
    real = cache_mod.library_versions

    def upgraded(names=cache_mod.SCORE_LIBRARIES):
        return {**real(names), "transformers": "99.0.0"}

    monkeypatch.setattr(cache_mod, "library_versions", upgraded)
    assert score_cache_key(**KEY_ARGS) != key
    assert {"torch", "transformers", "tokenizers"} <= set(real(cache_mod.SCORE_LIBRARIES))


def test_corrupt_entry_is_a_miss_and_is_rewritten(monkeypatch, data_dir, tmp_path):
    from dapt.evaluation import downstream
    from dapt.evaluation.finetuning import DownstreamConfig
    from tests.test_downstream_arms import fake_scores

    calls = fake_scores(monkeypatch)
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    dcfg = DownstreamConfig(seeds=[0, 1])
    run = lambda: downstream.evaluate_models(["ncbi_disease"], {"before": str(model)}, dcfg,  # noqa: E731
                                             data_dir=data_dir, cache_dir=tmp_path / "cache")
    first = run()["ncbi_disease"]["before"]
    entries = sorted((tmp_path / "cache" / "downstream").glob("*.json"))
    assert len(entries) == 2 and first["cached_seeds"] == []
    meta = json.loads(entries[0].read_text())["meta"]
    assert meta["recipe_fingerprint"] == recipe_fingerprint()
    corrupt: Path = entries[0]
    corrupt.write_text('{"meta": {}, "result": {"seed": 0, "te')  # a truncated write
    calls.clear()
    second = run()["ncbi_disease"]["before"]
    assert len(calls) == 1 and len(second["cached_seeds"]) == 1  # the corrupt seed recomputed, the other read
    assert second["test_f1"] == first["test_f1"]
    assert json.loads(corrupt.read_text())["result"]["test"]["f1"] == first["per_seed"][calls[0][1]]["test"]["f1"]
    calls.clear()
    assert run()["ncbi_disease"]["before"]["cached_seeds"] == [0, 1] and calls == []  # healed


@pytest.mark.parametrize("bad", ["", "[]", '{"result": 3}', "\x00\x01"])
def test_unreadable_entries_are_misses(tmp_path, bad):
    from dapt.evaluation.cache import ResultCache

    cache = ResultCache(tmp_path)
    cache.root.mkdir(parents=True)
    cache.path("k").write_text(bad)
    assert cache.get("k") is None
    cache.put("k", {"a": 1}, meta={})
    assert cache.get("k") == {"a": 1}


# --- the start model's held-out evaluation ------------------------------------------------------------

class _Sets:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def heldout_fingerprint(self) -> dict:
        return {"eval_sample_seed": self.seed}


def _run(precision: str = "32-true"):
    from types import SimpleNamespace

    return SimpleNamespace(trainer={"precision": precision, "accelerator": "cpu"}, model=SimpleNamespace(attn_implementation="sdpa"))


def test_start_evaluation_cache_keys_on_model_sets_and_numerics_and_heals(tmp_path):
    from dapt.pipeline.fit import DOCUMENTS, cached_start_evaluation

    calls = []

    def compute(value: float):
        def run_eval():
            calls.append(value)
            return {"domain_ppl": value, DOCUMENTS: {}}
        return run_eval

    start = {"files_sha256": "abc"}
    first, cached = cached_start_evaluation(tmp_path, start, _run(), _Sets(), compute(1.0), write=True)
    assert (first["domain_ppl"], cached) == (1.0, False)
    again, cached = cached_start_evaluation(tmp_path, start, _run(), _Sets(), compute(2.0), write=True)
    assert (again["domain_ppl"], cached) == (1.0, True) and calls == [1.0]
    # another start model, other held-out sets, other precision: each a miss
    for args in (({"files_sha256": "abd"}, _run(), _Sets()), (start, _run(), _Sets(seed=1)), (start, _run("bf16-mixed"), _Sets())):
        out, cached = cached_start_evaluation(tmp_path, *args, compute(3.0), write=True)
        assert not cached and out["domain_ppl"] == 3.0
    # a truncated entry is recomputed and rewritten
    for entry in (tmp_path / "evals").glob("*.json"):
        entry.write_text('{"heldout": {"domain_pp')
    out, cached = cached_start_evaluation(tmp_path, start, _run(), _Sets(), compute(4.0), write=True)
    assert (out["domain_ppl"], cached) == (4.0, False)
    assert cached_start_evaluation(tmp_path, start, _run(), _Sets(), compute(5.0), write=True)[0]["domain_ppl"] == 4.0
