"""Runs that survive (issue #12): bad input caught before the compute, finished work kept after a late
failure, damaged caches rebuilt, and the small tools failing in one line.

The claims about ``dapt train`` / ``dapt compare`` / ``dapt doctor`` as a user meets them are tested
through the CLI in a subprocess (exit status, one ``error:`` line, no traceback, what is on disk).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dapt.errors import ConfigError, DataError
from tests.conftest import TINY_OVERRIDES
from tests.helpers import fail_message, needs_shared_data, run_dapt

REPO = Path(__file__).resolve().parents[1]
# Faster than TINY_OVERRIDES for runs whose numbers are not the point (still the real pipeline).
QUICK = [*TINY_OVERRIDES, "trainer.max_steps=2", "trainer.val_check_interval=2"]


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The CLI's user-error contract: exit status 2, no traceback, an ``error:`` line with ``fragments``."""
    assert proc.returncode == 2, fail_message(proc)
    assert "Traceback" not in proc.stderr, fail_message(proc)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, fail_message(proc)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def _train(tmp_path: Path, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return run_dapt(["train", *overrides, f"paths.output_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                    cwd=tmp_path, timeout=timeout)


# --- 1. pre-flight checks ------------------------------------------------------------------------------

def test_sequence_length_above_the_model_positions_fails_before_training(tmp_path):
    proc = _train(tmp_path, [*QUICK, "data.max_seq_length=1024"])
    _one_line_error(proc, "data.max_seq_length=1024", "512")
    assert not (tmp_path / "run" / "csv").exists(), "training started before the check"


def test_roberta_padding_offset_is_subtracted_from_the_positions():
    from transformers import BertConfig, RobertaConfig

    from dapt.pipeline.preflight import check_sequence_length, usable_positions

    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert usable_positions(roberta) == 512
    check_sequence_length(roberta, 512, "data.max_seq_length")
    with pytest.raises(ConfigError, match=r"data.max_seq_length=513 exceeds the model's 512 positions .*max_position_embeddings=514"):
        check_sequence_length(roberta, 513, "data.max_seq_length")
    assert usable_positions(BertConfig(max_position_embeddings=512)) == 512


def test_base_sequence_length_is_checked_when_a_base_is_prepared(compose, tmp_path):
    from dapt.pipeline.preflight import preflight
    from dapt.pipeline.run_config import validate

    cfg = compose([*QUICK, "base_prep=general_mlm", "base_prep.max_seq_length=600"])
    with pytest.raises(ConfigError, match=r"base_prep.max_seq_length=600 exceeds the model's 512 positions"):
        preflight(validate(cfg), tmp_path)
    preflight(validate(compose([*QUICK, "base_prep.max_seq_length=600"])), tmp_path)  # base_prep=none: never used


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_gpu_trainer_without_a_gpu_says_so_and_suggests_cpu(tmp_path):
    proc = _train(tmp_path, [*QUICK, "trainer=gpu"])
    _one_line_error(proc, "trainer.accelerator=gpu", "no CUDA GPU", "trainer=cpu")


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
def test_unwritable_output_dir_is_a_one_line_error_naming_it(tmp_path, kind):
    if kind == "under_a_file":
        blocker = tmp_path / "a_file"
        blocker.write_text("not a folder")
        out = blocker / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        out = tmp_path / "locked"
        out.mkdir()
        out.chmod(0o500)
    proc = run_dapt(["train", *QUICK, f"paths.output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"], cwd=tmp_path, timeout=300)
    _one_line_error(proc, f"output directory {out} is not writable", "paths.output_dir")


def test_free_disk_below_the_model_size_names_path_needed_and_free(compose, tmp_path, monkeypatch):
    from collections import namedtuple

    from dapt.modeling.loading import load_mlm_model
    from dapt.pipeline import preflight as pf
    from dapt.pipeline.run_config import validate

    run = validate(compose(QUICK))
    params = sum(p.numel() for p in load_mlm_model(run.model.source, random_init=True,
                                                   config_overrides=run.model.config_overrides).model.parameters())
    needed = params * 4 * 3
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: usage(10**12, 0, needed - 1))
    with pytest.raises(ConfigError) as err:
        pf.preflight(run, tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and f"{needed:,} bytes" in message and f"{needed - 1:,} free" in message
    assert "\n" not in message
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda path: usage(10**12, 0, needed))
    pf.preflight(run, tmp_path)  # exactly enough passes


# --- 1b. downstream task files parsed at start-up ---------------------------------------------------------

def _ner_task(tmp_path: Path, test_body: str) -> str:
    """An inline NER task override whose test file is ``test_body`` (train and dev are fine)."""
    for name, body in (("train", "a B-X\nb O\n\nc O\nd B-X\n"), ("dev", "a B-X\nb O\n"), ("test", test_body)):
        (tmp_path / f"{name}.txt").write_text(body)
    return ("tasks=[{name: toy, type: ner, metric: f1, reader: {format: conll, label_column: 1}, "
            f"train: {tmp_path / 'train.txt'}, dev: {tmp_path / 'dev.txt'}, test: {tmp_path / 'test.txt'}}}]")


@needs_shared_data
def test_malformed_task_file_fails_at_start_up_with_file_and_line(tmp_path):
    task = _ner_task(tmp_path, "a B-X\nb O extra-column\n")
    proc = _train(tmp_path, [*QUICK, task])
    _one_line_error(proc, f"{tmp_path / 'test.txt'}:2", "malformed CoNLL line")
    assert not (tmp_path / "run" / "csv").exists(), "pretraining ran before the task file was read"


def test_ner_test_split_without_an_entity_is_refused(tmp_path):
    from dapt.evaluation.tasks import load_task, resolve_task

    _ner_task(tmp_path, "a O\nb O\n")
    spec = {"name": "toy", "type": "ner", "metric": "f1", "reader": {"format": "conll", "label_column": 1},
            "train": "train.txt", "dev": "dev.txt", "test": "test.txt"}
    with pytest.raises(DataError, match=r"task toy: test split \(test.txt\) has no entity"):
        load_task(resolve_task(spec), tmp_path)
    # entities only of a type train never saw are tagged O (unseen_labels=ignore): nothing to score either
    (tmp_path / "test.txt").write_text("a B-Y\nb I-Y\n")
    with pytest.raises(DataError, match="has no entity"):
        load_task(resolve_task(spec), tmp_path)
    (tmp_path / "test.txt").write_text("a B-X\nb O\n")
    assert load_task(resolve_task(spec), tmp_path).test[0].tags == ("B-X", "O")


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_classification_split_with_only_empty_texts_is_refused(tmp_path, split):
    from dapt.evaluation.tasks import load_task, resolve_task

    rows = {s: [{"text": f"{s} text {i}", "label": "AB"[i % 2]} for i in range(4)] for s in ("train", "dev", "test")}
    rows[split] = [{**row, "text": " " * (i % 2)} for i, row in enumerate(rows[split])]
    for s, records in rows.items():
        (tmp_path / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"name": "toy", "type": "classification", "metric": "accuracy", "reader": {"format": "jsonl"},
            "train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl"}
    with pytest.raises(DataError, match=rf"task toy: every text in the {split} split \({split}.jsonl\) is empty"):
        load_task(resolve_task(spec), tmp_path)


def test_check_downstream_parses_tsv_rows_not_only_file_existence(compose, tmp_path):
    from dapt.evaluation.downstream import check_downstream

    good = "".join(f"{'AB'[i % 2]}\ttext {i}\n" for i in range(4))
    for name in ("train", "dev"):
        (tmp_path / f"{name}.tsv").write_text(good)
    (tmp_path / "test.tsv").write_text(good + "no tab on this line\n")
    task = (f"tasks=[{{name: toy, type: classification, metric: accuracy, reader: {{format: tsv}}, train: {tmp_path / 'train.tsv'}, "
            f"dev: {tmp_path / 'dev.tsv'}, test: {tmp_path / 'test.tsv'}}}]")
    with pytest.raises(DataError, match=rf"{tmp_path / 'test.tsv'}:5: malformed line"):
        check_downstream(compose([*QUICK, task]))


# --- 2. a late failure keeps finished work ---------------------------------------------------------------

_INJECT = """
import sys
import dapt.pipeline.run
from dapt.cli import main

def boom(*args, **kwargs):
    raise {exc}

dapt.pipeline.run.{target} = boom
sys.exit(main(["train", *sys.argv[1:]]))
"""


def _train_with_failure(tmp_path: Path, target: str, exc: str, overrides: list[str]) -> subprocess.CompletedProcess:
    """``dapt train`` in a subprocess whose ``dapt.pipeline.run.<target>`` raises ``exc``."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "DAPT_NO_REEXEC": "1"}
    args = [*overrides, f"paths.output_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    return subprocess.run([sys.executable, "-c", _INJECT.format(target=target, exc=exc), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@needs_shared_data
def test_downstream_failure_keeps_perplexities_control_and_model(tmp_path):
    proc = _train_with_failure(tmp_path, "_downstream", "RuntimeError('injected fine-tuning crash')", QUICK)
    results_path = tmp_path / "run" / "results.json"
    _one_line_error(proc, "downstream failed (RuntimeError: injected fine-tuning crash)", str(results_path))
    results = json.loads(results_path.read_text())
    assert results["error"] == {"stage": "downstream", "type": "RuntimeError", "message": "injected fine-tuning crash"}
    for key in ("domain_ppl_before", "domain_ppl_after", "general_ppl_after", "domain_dev_ppl_after"):
        assert isinstance(results[key], float) and results[key] > 1, key
    assert results["control"]["domain_ppl_after"] > 1 and results["changes"]
    assert results["metrics"]["domain_ppl_after"] == results["domain_ppl_after"]
    from dapt.modeling.loading import load_mlm_model

    assert load_mlm_model(results["model_dir"]).model is not None  # the adapted model was saved and loads
    # dapt compare shows the run as failed, with the stage, and still its perplexities
    from dapt.reporting import load_run

    run = load_run(tmp_path / "run")
    assert run.status == "failed" and "downstream" in run.error and run.metrics["domain_ppl_after"] == results["domain_ppl_after"]


@needs_shared_data
def test_model_save_failure_still_writes_results_with_the_error(tmp_path):
    proc = _train_with_failure(tmp_path, "atomic_save_dir", "OSError(28, 'No space left on device')",
                               [*QUICK, "control.enabled=false"])
    results_path = tmp_path / "run" / "results.json"
    _one_line_error(proc, "save_model failed (OSError", "No space left on device", str(results_path))
    results = json.loads(results_path.read_text())
    assert results["error"]["stage"] == "save_model" and results["error"]["type"] == "OSError"
    assert results["model_dir"] is None and "downstream" not in results
    assert results["domain_ppl_after"] > 1 and results["steps"] == 2


# --- 3. caches heal ----------------------------------------------------------------------------------------

def _saved_tiny_model(path: Path) -> Path:
    from dapt.modeling.loading import load_mlm_model
    from tests.helpers import MINILM, minilm_tokenizer

    model = load_mlm_model(MINILM, random_init=True, config_overrides={"num_hidden_layers": 1, "hidden_size": 32,
                                                                        "num_attention_heads": 2, "intermediate_size": 64}).model
    model.save_pretrained(path)
    minilm_tokenizer().save_pretrained(path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@needs_shared_data
@pytest.mark.parametrize("marker_kind", ["hashed", "written_before_hashes"])
def test_truncated_cached_base_is_detected_named_and_rebuilt(tmp_path, caplog, marker_kind):
    from dapt.cached_weights import DIGEST_KEY, weights_digest
    from dapt.config import default_data_dir
    from dapt.modeling.loading import ModelConfig, load_mlm_model
    from dapt.pipeline import base_prep
    from tests.helpers import minilm_tokenizer

    source = _saved_tiny_model(tmp_path / "start")
    cfg = base_prep.BasePrepConfig(steps=2, batch_size=2, max_seq_length=32,
                               data=[{"type": "jsonl", "path": "general/wikipedia/enwiki2015.jsonl", "max_documents": 20}])

    def prepare():
        return base_prep.prepare_base(model=load_mlm_model(str(source)).model, tokenizer=minilm_tokenizer(),
                                      model_cfg=ModelConfig(source=str(source)), model_path=str(source), base_cfg=cfg,
                                      data_dir=default_data_dir(), cache_dir=str(tmp_path / "cache"))

    first = prepare()
    target = Path(first.path)
    marker = json.loads((target / base_prep.MARKER).read_text())
    assert marker[DIGEST_KEY] == weights_digest(target) and "model.safetensors" in marker[DIGEST_KEY]
    if marker_kind == "written_before_hashes":
        del marker[DIGEST_KEY]
        (target / base_prep.MARKER).write_text(json.dumps(marker))
    _truncate(target / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        second = prepare()
    assert not second.cached and second.path == first.path and second.cache_key == first.cache_key  # same key, rebuilt
    warning = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warning) == 1 and str(target) in warning[0] and "model.safetensors" in warning[0]
    assert load_mlm_model(str(target)).model is not None
    third = prepare()
    assert third.cached, "the rebuilt base was not reused"


@pytest.mark.slow  # two tiny DAPT runs with a control arm (minutes on a shared 2-core box)
@needs_shared_data
def test_truncated_cached_control_is_rebuilt_with_the_same_numbers(compose, caplog):
    from dapt.pipeline.run import train

    overrides = [*QUICK, "control.data=${data.train}"]
    _, first = train(compose(overrides))
    control = first["results"]["control"]
    _truncate(Path(control["path"]) / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        _, second = train(compose(overrides))
    again = second["results"]["control"]
    assert not again["cached"] and again["cache_key"] == control["cache_key"]
    assert any("damaged" in r.getMessage() and control["path"] in r.getMessage() for r in caplog.records)
    assert again["domain_ppl_after"] == control["domain_ppl_after"]  # rebuilt by the same recipe
    # the rebuilt entry records its weights' hashes and passes the check the next run makes
    from dapt.cached_weights import DIGEST_KEY, intact_marker, weights_digest
    from dapt.pipeline.control import MARKER

    info = intact_marker(again["path"], MARKER, "control arm")
    assert info is not None and info[DIGEST_KEY] == weights_digest(again["path"])


# --- 4. small ones ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["[1, 2, 3]", '"done"', "null"])
def test_compare_on_results_that_is_not_an_object_names_the_file(tmp_path, content):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(content)
    proc = run_dapt(["compare", str(tmp_path / "runs")], cwd=tmp_path, timeout=120)
    _one_line_error(proc, f"{run / 'results.json'}: expected a JSON object")


def test_wandb_online_failure_falls_back_to_offline_with_a_warning(tmp_path, monkeypatch, caplog):
    import wandb

    from dapt.tracking.loggers import LoggerConfig, WandbConfig, build_loggers, finish_wandb

    real_init = wandb.init
    modes: list[str] = []

    def init(*args, **kwargs):
        modes.append(kwargs.get("mode"))
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = LoggerConfig(wandb=WandbConfig(mode="online"))
    with caplog.at_level(logging.WARNING):
        loggers = build_loggers(cfg, tmp_path, run_name="r", group="g", tags=[], config={"a": 1})
    try:
        wandb_logger = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"][0]
        run = wandb_logger.experiment
        assert modes == ["online", "offline"]
        assert run.settings.mode == "offline" or run.offline
        run.log({"x": 1.0})
    finally:
        finish_wandb()
    warnings = [r.getMessage() for r in caplog.records if "W&B online failed" in r.getMessage()]
    assert len(warnings) == 1 and "CommError" in warnings[0] and "offline" in warnings[0] and "\n" not in warnings[0]
    assert list(tmp_path.glob("wandb/offline-run-*")), "the run was not written offline"


def test_doctor_on_an_empty_corpus_errors_instead_of_reporting_a_shift(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_dapt(["doctor", "--max-documents", "50", f"data.train=[{{type: jsonl, path: {empty}, text_field: text}}]"],
                    cwd=tmp_path, timeout=300)
    assert "domain shift" not in proc.stdout, fail_message(proc)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, fail_message(proc)
    assert "empty" in proc.stderr and "error: " in proc.stderr, fail_message(proc)
