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
    from dapt.train import train

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
    """A base trained in bf16 is never served to an fp32 run (the start-model evaluation cache is keyed
    on the base key and the precision too: ``dapt.pipeline.fit.heldout_eval_payload``)."""
    from dapt.train import train

    cpu_feature("AMX")
    overrides = [*TINY_OVERRIDES, "base=general_mlm", "base.steps=2", "base.batch_size=2", "base.max_seq_length=64",
                 "control.enabled=false", "trainer.max_steps=1"]
    bf16_results = train(compose([*overrides, "trainer.precision=auto"]))[1]["results"]
    fp32_results = train(compose([*overrides, "trainer.precision=32-true"]))[1]["results"]
    again = train(compose([*overrides, "trainer.precision=32-true"]))[1]["results"]
    assert bf16_results["precision"]["value"] == BF16 and fp32_results["precision"]["value"] == FP32
    assert not fp32_results["base"]["cached"], "the fp32 run was served the base prepared in bf16"
    assert bf16_results["base"]["cache_key"] != fp32_results["base"]["cache_key"]
    assert again["base"]["cached"] and again["base"]["cache_key"] == fp32_results["base"]["cache_key"]


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


def test_bf16_heldout_perplexity_is_within_a_percent_of_fp32(compose):
    """Same weights, same held-out masks: the perplexity measured under bf16 autocast is within 1% of
    fp32 (the loss is taken from fp32 logits, only the matmuls round)."""
    from dapt.train import train

    ppl = {}
    for precision in (FP32, BF16):
        _, objects = train(compose([*TINY_OVERRIDES, "control.enabled=false", "trainer.max_steps=1",
                                    "data.eval_tokens=4096", f"trainer.precision={precision}"]))
        results = json.loads((objects["run_dir"] / "results.json").read_text())
        ppl[precision] = results["domain_ppl_before"]
    assert abs(ppl[BF16] / ppl[FP32] - 1) < 0.01, ppl


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
    from dapt.train import train

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
    from dapt.train import train

    dtypes: list[torch.dtype] = []

    def fake_peak(dtype=torch.float32, device="cpu", seconds=2.0, *, refresh=False, size=None):
        dtypes.append(dtype)
        return 1e15

    monkeypatch.setattr(flops, "measured_peak_flops", fake_peak)
    for precision in (BF16, FP32):
        train(compose([*TINY_OVERRIDES, "control.enabled=false", "trainer.max_steps=1", f"trainer.precision={precision}"]))
    assert dtypes == [torch.bfloat16, torch.float32]
