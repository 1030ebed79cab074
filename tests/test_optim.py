"""Optimizer construction and gradient clipping across precisions (the GPU recipe runs bf16-mixed
with fused AdamW and clipping; Lightning's AMP plugin refused that combination before dapt clipped
bf16 gradients itself)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from dapt.errors import ConfigError
from dapt.modeling.optim import OptimizerConfig, build_optimizer, clip_gradients, param_groups
from tests.conftest import TINY_OVERRIDES


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)


def _attach(module: pl.LightningModule, precision: str) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    module.trainer = trainer
    return trainer


def test_no_weight_decay_on_biases_and_layernorm_and_tied_weights_once() -> None:
    module = _Tiny()
    module.tied = module.layer  # the same parameters under a second name (tied decoder)
    decay, no_decay = param_groups(module.named_parameters(), 0.01)
    assert [p.shape for p in decay["params"]] == [torch.Size([8, 8])] and decay["weight_decay"] == 0.01
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0  # linear bias, LN weight and bias


def test_auto_is_fused_unless_gradients_are_clipped_under_loss_scaling() -> None:
    module = _Tiny()
    assert build_optimizer(module, OptimizerConfig()).defaults["fused"] is True
    fallback = build_optimizer(module, OptimizerConfig(), scaled_clipping=True)
    assert not fallback.defaults["fused"] and fallback.defaults["foreach"] is True
    with pytest.raises(ConfigError, match="optimizer.implementation=fused"):
        build_optimizer(module, OptimizerConfig(implementation="fused"), scaled_clipping=True)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_gradients_are_clipped(precision: str) -> None:
    module = _Tiny()
    _attach(module, precision)
    optimizer = build_optimizer(module, OptimizerConfig())
    assert optimizer.defaults["fused"] is True
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip_gradients(module, optimizer, 1.0, "norm")
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in module.parameters()]))
    assert total.item() == pytest.approx(1.0, rel=1e-4)


def test_bf16_mixed_training_runs_end_to_end(compose) -> None:
    """``trainer=gpu``'s precision and optimizer on the CPU: autocast bf16, fused AdamW, clipping."""
    from dapt.pipeline.run import train

    metrics, objects = train(compose([*TINY_OVERRIDES, "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0"]))
    assert objects["trainer"].precision == "bf16-mixed"
    assert metrics["domain_ppl_after"] < metrics["domain_ppl_before"] < float("inf")


def test_fsdp_clips_by_norm_through_the_root_wrapper() -> None:
    """Under FSDP the norm spans all shards: only the root wrapper's ``clip_grad_norm_`` computes it
    (Lightning refuses norm clipping there). Lightning's FSDP needs a GPU, so the trainer is faked."""
    from types import SimpleNamespace
    from unittest.mock import MagicMock

    from pytorch_lightning.strategies import FSDPStrategy

    module = _Tiny()
    root = MagicMock()
    module._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), model=root, precision_plugin=None)
    clip_gradients(module, MagicMock(), 0.5, "norm")
    root.clip_grad_norm_.assert_called_once_with(0.5)
