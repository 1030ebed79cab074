"""Masking configs: YAML files, validation naming the key, rate schedules, the fixed eval masker,
and the masking-ablation sweep."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from dapt.errors import ConfigError
from dapt.labels import IGNORE_INDEX
from dapt.masking import MaskingConfig, achieved_rate, available_strategies, build_eval_masker, build_masker, eval_generator, rate_at, strategy_class

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
STRATEGIES = ["random", "whole_word", "span", "pmi", "salient"]


class FakeTokenizer:
    """Enough of a tokenizer for maskers of strategies that need no corpus statistics."""

    mask_token_id = 4
    pad_token_id = 0
    all_special_ids = [0, 1, 2, 3, 4]

    def __len__(self) -> int:
        return 1000


def compose(overrides: list[str], hydra_config: bool = False) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dapt.config import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose("train", overrides=overrides, return_hydra_config=hydra_config)


needs_train_yaml = pytest.mark.skipif(not (CONF / "train.yaml").exists(), reason="conf/train.yaml not written yet")


def test_every_strategy_has_a_yaml_and_registered_class() -> None:
    assert sorted(available_strategies()) == sorted(STRATEGIES)
    assert sorted(p.stem for p in (CONF / "masking").glob("*.yaml")) == sorted(STRATEGIES)


@needs_train_yaml
@pytest.mark.parametrize("name", STRATEGIES)
def test_yaml_equals_dataclass_defaults(name: str) -> None:
    """One source of truth: the YAML a run composes is the dataclass's defaults (and validates)."""
    from dapt.config import to_dataclass

    cfg = OmegaConf.to_container(compose([f"masking={name}"]).masking)
    cls = strategy_class(name).config_class
    assert cfg == asdict(cls())
    to_dataclass(cls, cfg, prefix="masking")


@needs_train_yaml
def test_one_override_switches_strategy_and_rate() -> None:
    cfg = compose(["masking=span", "masking.rate=0.4"])
    masker = build_masker(cfg.masking, FakeTokenizer())
    assert type(masker.strategy).__name__ == "SpanMasking" and masker.config.rate == 0.4


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"rate": 0.0}, "masking.rate"),
        ({"rate": 1.5}, "masking.rate"),
        ({"eval_rate": 1.0}, "masking.eval_rate"),
        ({"schedule": "cosine"}, "masking.schedule"),
        ({"schedule": "linear"}, "masking.schedule"),
        ({"schedule_steps": 0}, "masking.schedule_steps"),
        ({"mask_fraction": 0.95, "random_fraction": 0.1}, "masking.mask_fraction"),
        ({"name": "span", "geometric_p": 0.0}, "masking.geometric_p"),
        ({"name": "span", "max_span_words": 0}, "masking.max_span_words"),
        ({"name": "span", "max_span": 3}, "masking.max_span"),
        ({"name": "pmi", "max_ngram": 1}, "masking.max_ngram"),
        ({"name": "pmi", "min_count": 1}, "masking.min_count"),
        ({"name": "salient", "salient_weight": 0.5}, "masking.salient_weight"),
        ({"name": "salient", "stats_max_words": 0}, "masking.stats_max_words"),
        ({"name": "whole_word", "geometric_p": 0.2}, "masking.geometric_p"),
        ({"name": "nope"}, "masking.name"),
        ({"eval_strategy": "nope"}, "masking.eval_strategy"),
    ],
)
def test_bad_values_fail_naming_the_key(cfg: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_masker(cfg, FakeTokenizer(), default_schedule_steps=100)


@pytest.mark.parametrize("name", ["pmi", "salient"])
def test_stats_strategies_without_corpus_say_what_is_missing(name: str) -> None:
    with pytest.raises(ConfigError, match="stats_path"):
        build_masker({"name": name}, FakeTokenizer())


# ---------------------------------------------------------------- schedules

def test_constant_schedule() -> None:
    cfg = MaskingConfig(rate=0.3)
    assert [rate_at(cfg, s, 100) for s in (0, 50, 10**6)] == [0.3, 0.3, 0.3]


@pytest.mark.parametrize(("step", "expected"), [(0, 0.4), (250, 0.3375), (500, 0.275), (1000, 0.15), (5000, 0.15), (-3, 0.4)])
def test_linear_decay_values(step: int, expected: float) -> None:
    cfg = MaskingConfig(rate=0.4, schedule="linear", final_rate=0.15, schedule_steps=1000)
    assert rate_at(cfg, step) == pytest.approx(expected)


def test_linear_schedule_length_defaults_to_max_steps_and_rejects_unbounded() -> None:
    cfg = MaskingConfig(rate=0.4, schedule="linear", final_rate=0.1)
    assert rate_at(cfg, 50, default_steps=100) == pytest.approx(0.25)
    assert rate_at(MaskingConfig(rate=0.4, schedule="linear", final_rate=0.1, schedule_steps=10), 5, 100) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="schedule_steps"):
        rate_at(cfg, 5, default_steps=-1)  # Lightning's "no limit" must not run the schedule backwards
    with pytest.raises(ConfigError, match="schedule_steps"):
        build_masker({"schedule": "linear", "final_rate": 0.1}, FakeTokenizer(), default_schedule_steps=-1)


@pytest.mark.parametrize("name", ["random", "whole_word", "span"])
def test_masker_follows_the_schedule_by_step(name: str) -> None:
    masker = build_masker({"name": name, "rate": 0.4, "schedule": "linear", "final_rate": 0.15}, FakeTokenizer(),
                          default_schedule_steps=100)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (256, 128), generator=g)
    starts = torch.rand(ids.shape, generator=g) < 0.8
    for step, expected in ((0, 0.4), (50, 0.275), (100, 0.15), (400, 0.15)):
        out = masker(ids, starts, g, step=step)
        assert achieved_rate(out["labels"], masker.maskable(ids)) == pytest.approx(expected, abs=0.01)


def test_masker_output_carries_n_maskable_for_the_rate_metric() -> None:
    masker = build_masker({"name": "whole_word", "rate": 0.3}, FakeTokenizer())
    ids = torch.tensor([[1, 10, 11, 12, 2, 0, 0]])
    out = masker(ids, torch.ones_like(ids, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert int(out["n_maskable"]) == 3


def test_achieved_rate_counts_only_maskable() -> None:
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, 7]])
    maskable = torch.tensor([[False, True, True, True]])
    assert achieved_rate(labels, maskable) == pytest.approx(2 / 3)
    assert achieved_rate(labels, torch.zeros_like(maskable)) == 0.0


# ---------------------------------------------------------------- eval masking

@pytest.mark.parametrize("name", ["random", "whole_word", "span"])
def test_eval_masker_is_fixed_random_15_whatever_the_train_strategy(name: str) -> None:
    cfg = {"name": name, "rate": 0.4, "schedule": "linear", "final_rate": 0.2, "schedule_steps": 10}
    ids = torch.randint(10, 1000, (64, 128), generator=torch.Generator().manual_seed(0))
    starts = torch.ones_like(ids, dtype=torch.bool)
    outs = []
    for _ in range(2):
        masker = build_eval_masker(cfg, FakeTokenizer())
        assert type(masker.strategy).__name__ == "RandomTokenMasking"
        out = masker(ids, starts, eval_generator(cfg), step=10**6)
        assert achieved_rate(out["labels"], masker.maskable(ids)) == pytest.approx(0.15, abs=0.002)
        outs.append(out)
    assert torch.equal(outs[0]["labels"], outs[1]["labels"]) and torch.equal(outs[0]["input_ids"], outs[1]["input_ids"])
    # the random-masking eval set is identical across train strategies
    other = build_eval_masker({"name": "random"}, FakeTokenizer())(ids, starts, eval_generator({}))
    assert torch.equal(other["labels"], outs[0]["labels"])


def test_eval_strategy_and_rate_are_configurable() -> None:
    cfg = {"name": "span", "geometric_p": 0.5, "eval_strategy": "span", "eval_rate": 0.3, "eval_seed": 7}
    masker = build_eval_masker(cfg, FakeTokenizer())
    assert masker.config.geometric_p == 0.5 and masker.config.rate == 0.3 and masker.config.schedule == "constant"
    assert eval_generator(cfg).initial_seed() == 7
    assert type(build_eval_masker({"name": "span", "eval_strategy": "whole_word"}, FakeTokenizer()).strategy).__name__ == "WholeWordMasking"


# ---------------------------------------------------------------- the ablation sweep

@needs_train_yaml
def test_ablation_experiment_composes_with_sweep_params() -> None:
    cfg = compose(["experiment=masking_ablation"], hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["masking"].split(",") == STRATEGIES
    assert params["masking.rate"].split(",") == ["0.15", "0.3", "0.4"]
    for name in STRATEGIES:
        job = compose(["experiment=masking_ablation", f"masking={name}", "masking.rate=0.4"])
        assert job.masking.name == name and job.masking.rate == 0.4 and job.masking.eval_rate == 0.15


@pytest.mark.slow
@needs_train_yaml
def test_ablation_multirun_launches_every_combination(tmp_path: Path) -> None:
    """A real ``-m`` sweep over conf/ with a stub task: 15 jobs, one per (strategy, rate)."""
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f"""
        import hydra
        from dapt.config import register_resolvers
        from dapt.pipeline.schemas import register_schemas
        register_resolvers()
        register_schemas()  # conf/'s group YAMLs extend <group>_schema

        @hydra.main(config_path={str(CONF)!r}, config_name="train", version_base=None)
        def main(cfg):
            print("JOB", cfg.masking.name, cfg.masking.rate, flush=True)

        main()
    """))
    result = subprocess.run(
        [sys.executable, str(app), "-m", "experiment=masking_ablation", f"hydra.sweep.dir={tmp_path / 'multirun'}",
         "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = {tuple(line.split()[1:]) for line in result.stdout.splitlines() if line.startswith("JOB")}
    assert jobs == {(s, r) for s in STRATEGIES for r in ("0.15", "0.3", "0.4")}
