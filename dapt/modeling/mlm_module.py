"""``MLMModule``: the LightningModule that adapts a transformers masked LM to a domain.

Training uses the sparse head (masked positions only). Validation runs over named held-out sets
(``domain``, ``general``) and logs per set ``val/<set>/loss``, ``val/<set>/ppl`` (torchmetrics
Perplexity over all masked tokens of the set) and ``val/<set>/acc`` (masked-token accuracy).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from dapt.errors import TrainingError
from dapt.masking import IGNORE_INDEX
from dapt.modeling.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    clips_scaled_gradients,
)
from dapt.modeling.sparse_head import sparse_mlm_loss


class MLMModule(pl.LightningModule):
    """Masked-LM training with sparse prediction, fixed held-out sets and a warmup/decay schedule."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        total_steps: int = 1000,
        eval_names: Sequence[str] = ("domain", "general"),
        compile_model: bool = False,
        tune_cpu_threads: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.tune_cpu_threads = tune_cpu_threads
        self.optimizer_cfg = optimizer or OptimizerConfig()
        self.scheduler_cfg = scheduler or SchedulerConfig()
        self.total_steps = total_steps
        self.eval_names = list(eval_names)
        self.compile_model = compile_model
        self.val_ppl = torch.nn.ModuleDict({n: Perplexity() for n in self.eval_names})
        self.val_loss = torch.nn.ModuleDict({n: MeanMetric() for n in self.eval_names})
        self.val_acc = torch.nn.ModuleDict({n: MeanMetric() for n in self.eval_names})
        # The compiled encoder is kept out of the module registry (a plain tuple): registered, it
        # would duplicate every weight in state_dict and checkpoints under a second prefix.
        self._compiled: tuple[Any, ...] = ()

    def configure_model(self) -> None:
        """With ``compile_model``, compile the encoder only.

        ``sparse_mlm_loss`` calls ``model.base_model`` and the head separately, so compiling the
        whole model would never run the compiled graph. The encoder always sees ``[batch, seq]``
        (packed blocks, no padding): one static graph, recompiled once for the eval batch size. The
        head sees a varying number of masked rows and stays eager (it is two matmuls).
        """
        if self.compile_model and not self._compiled:
            self._compiled = (torch.compile(self.model.base_model),)

    def configure_callbacks(self) -> list[pl.Callback]:
        """On CPU, a ``CpuThreadTuner`` (``make bench``: 1 vs 2 threads made a 1.7× difference on the
        shared 2-core box); it disables itself on GPU and under multi-process training."""
        if not self.tune_cpu_threads:
            return []
        from dapt.modeling.callbacks import CpuThreadTuner

        return [CpuThreadTuner()]

    def mlm_loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sparse_mlm_loss(
            self.model,
            batch["input_ids"],
            batch["labels"],
            batch.get("attention_mask"),
            reduction=reduction,
            encoder=self._compiled[0] if self._compiled else None,
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, targets = self.mlm_loss(batch)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite MLM loss ({loss.item()}) at step {self.global_step}: lower optimizer.lr, "
                "raise scheduler warmup or enable gradient clipping (trainer.gradient_clip_val)"
            )
        n_masked = targets.numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=max(n_masked, 1))
        if "n_maskable" in batch:
            self.log("train/mask_rate", n_masked / max(float(batch["n_maskable"]), 1.0), batch_size=1)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self.eval_names[dataloader_idx]
        loss_sum, logits, targets = self.mlm_loss(batch, reduction="sum")
        n = targets.numel()
        if n == 0:
            return
        self.val_ppl[name].update(logits.float().unsqueeze(0), targets.unsqueeze(0))
        self.val_loss[name].update(loss_sum / n, weight=n)
        self.val_acc[name].update((logits.argmax(-1) == targets).float().mean(), weight=n)
        for key, metric in (("ppl", self.val_ppl[name]), ("loss", self.val_loss[name]), ("acc", self.val_acc[name])):
            self.log(f"val/{name}/{key}", metric, on_step=False, on_epoch=True, add_dataloader_idx=False, prog_bar=key == "ppl")

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model, self.optimizer_cfg, scaled_clipping=clips_scaled_gradients(self))
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


def perplexity_from_loss(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


__all__ = ["MLMModule", "IGNORE_INDEX", "perplexity_from_loss"]
