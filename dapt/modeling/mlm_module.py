"""``MLMModule``: the LightningModule that adapts a transformers masked LM to a domain.

Training uses the sparse head (masked positions only) with the wrapped model in train mode (dropout
on: ``from_pretrained`` returns models in eval mode and Lightning only switches the LightningModule
itself). Validation runs over the named dev sets (``domain``, ``general``) and testing over the test
sets; each logs per set ``<val|test>/<set>/ppl`` with its document-bootstrap CI
(``ppl_low``/``ppl_high``), ``loss`` and ``acc`` (masked-token accuracy), see ``HeldoutPerplexity``.
"""

from __future__ import annotations

from typing import Any, Sequence

import pytorch_lightning as pl
import torch

from dapt import metric_names
from dapt.errors import TrainingError
from dapt.labels import IGNORE_INDEX
from dapt.modeling.optim import OptimizerConfig, SchedulerConfig, build_optimizer, build_scheduler, clip_gradients, clips_scaled_gradients
from dapt.modeling.perplexity import HeldoutPerplexity
from dapt.modeling.remedies import llrd_scales
from dapt.modeling.sparse_head import sparse_mlm_loss

HELDOUT_KEYS = ("ppl", "ppl_low", "ppl_high", "loss", "acc", "masked_tokens", "documents")


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
        test_names: Sequence[str] | None = None,
        compile_model: bool = False,
        tune_cpu_threads: bool = False,
        penalty: torch.nn.Module | None = None,
        layer_decay: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        # Remedies (dapt.modeling.remedies): a penalty on the weights added to the MLM loss (L2-SP/EWC;
        # a submodule, so its anchors follow the device) and layer-wise learning-rate decay.
        self.penalty = penalty
        self.layer_decay = layer_decay
        if penalty is not None:  # DDP would broadcast these model-sized, never-changing buffers at every forward
            self._ddp_params_and_buffers_to_ignore = [f"penalty.{name}" for name, _ in penalty.named_buffers()]
        self.tune_cpu_threads = tune_cpu_threads
        self._tuner: pl.Callback | None = None
        self.optimizer_cfg = optimizer or OptimizerConfig()
        self.scheduler_cfg = scheduler or SchedulerConfig()
        self.total_steps = total_steps
        self.eval_names = list(eval_names)
        self.test_names = list(eval_names if test_names is None else test_names)
        self.compile_model = compile_model
        self.heldout = torch.nn.ModuleDict(
            {f"val_{n}": HeldoutPerplexity() for n in self.eval_names} | {f"test_{n}": HeldoutPerplexity() for n in self.test_names}
        )
        self.heldout_documents: dict[tuple[str, str], Any] = {}  # (loop, set) -> (doc ids, loss sums, counts)
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
        """With ``tune_cpu_threads`` (``trainer.cpu_threads=auto``), a ``CpuThreadTuner`` on CPU (the best
        thread count changes with the machine's load; see its docstring); it disables itself on GPU and
        under multi-process training. Off by default: switching thread counts changes the bits trained."""
        if not self.tune_cpu_threads:
            return []
        from dapt.modeling.callbacks import CpuThreadTuner

        # one instance: Lightning calls this at every fit/validate/test and swaps in what it returns,
        # so a new tuner per call would drop the history results.json reports after the final evaluation
        self._tuner = self._tuner or CpuThreadTuner()
        return [self._tuner]

    def mlm_loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sparse_mlm_loss(
            self.model,
            batch["input_ids"],
            batch["labels"],
            batch.get("attention_mask"),
            reduction=reduction,
            encoder=self._compiled[0] if self._compiled else None,
        )

    def on_fit_start(self) -> None:
        """Dropout on for training: the wrapped model may arrive in eval mode (``from_pretrained``).

        ``on_fit_start`` runs before Lightning checks for modules in eval mode at the start of training
        (and before its validation loops record, then restore, the modules' modes)."""
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, targets = self.mlm_loss(batch)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite MLM loss ({loss.item()}) at step {self.global_step}: lower optimizer.lr, "
                "raise scheduler warmup or enable gradient clipping (trainer.gradient_clip_val)"
            )
        n_masked = targets.numel()
        self.log(metric_names.TRAIN_LOSS, loss, prog_bar=True, batch_size=max(n_masked, 1))
        if "n_maskable" in batch:
            self.log(metric_names.TRAIN_MASK_RATE, n_masked / max(float(batch["n_maskable"]), 1.0), batch_size=1)
        if self.penalty is not None:  # train/loss stays the MLM loss; the penalty is logged beside it
            penalty = self.penalty(self.model)
            self.log(metric_names.TRAIN_PENALTY, penalty, batch_size=1)
            loss = loss + penalty
        return loss

    def _heldout_step(self, split: str, names: list[str], batch: dict[str, torch.Tensor], dataloader_idx: int) -> None:
        _, logits, targets = self.mlm_loss(batch, reduction="sum")
        if targets.numel():
            docs = batch["doc_ids"][batch["labels"] != IGNORE_INDEX]
            self.heldout[f"{split}_{names[dataloader_idx]}"].update(logits, targets, docs)

    def _log_heldout(self, split: str, names: list[str]) -> None:
        for name in names:
            metric = self.heldout[f"{split}_{name}"]
            values = metric.compute()
            metric.reset()
            if "documents_table" in values:  # per-document sums: paired CIs between arms (pipeline.fit)
                self.heldout_documents[(split, name)] = values["documents_table"]
            for key in HELDOUT_KEYS:
                if key in values:
                    self.log(metric_names.heldout(split, name, key), values[key], prog_bar=key == "ppl", sync_dist=False)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._heldout_step(metric_names.DEV_LOOP, self.eval_names, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._log_heldout(metric_names.DEV_LOOP, self.eval_names)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._heldout_step(metric_names.TEST_LOOP, self.test_names, batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_heldout(metric_names.TEST_LOOP, self.test_names)

    def configure_optimizers(self) -> Any:
        scales = llrd_scales(self.model, self.layer_decay) if self.layer_decay != 1.0 else None
        optimizer = build_optimizer(self.model, self.optimizer_cfg, scaled_clipping=clips_scaled_gradients(self), lr_scales=scales)
        scheduler = build_scheduler(optimizer, self.scheduler_cfg, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)


__all__ = ["MLMModule"]
