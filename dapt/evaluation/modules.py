"""Lightning modules that fine-tune an encoder on one downstream task.

One small base class owns what every task shares (AdamW with linear warmup/decay as in the
RoBERTa / Don't Stop Pretraining recipe, dev scoring at the end of every validation, keeping the
best-dev weights in memory); the two subclasses only say how logits become predictions.
The best weights are kept in memory rather than in checkpoint files: the model is small, and the test
score must come from the best dev epoch without writing gigabytes per seed.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch

from dapt.evaluation.encoding import decode_ner

Scorer = Callable[[dict[int, Any]], dict[str, Any]]


class FinetuneModule(pl.LightningModule):
    """Shared training loop. ``dev_scorer`` maps ``{example index: prediction}`` to metrics.

    After every validation the dev metrics are computed, ``dev_score`` (the task's primary metric)
    is logged for ``EarlyStopping``, and the weights are copied when it improves.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float,
        warmup_ratio: float,
        total_steps: int,
        dev_scorer: Scorer,
        metric: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.total_steps = max(1, total_steps)
        self.dev_scorer = dev_scorer
        self.metric = metric
        self._dev_predictions: dict[int, Any] = {}
        self.best_score: float = float("-inf")
        self.best_epoch: int = 0
        self.best_dev: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.dev_history: list[float] = []

    # -- prediction: what subclasses define ------------------------------------------------------
    def predictions(self, batch: dict[str, Any], logits: torch.Tensor) -> list[Any]:
        raise NotImplementedError

    def _logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # -- Lightning hooks -------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train_loss", out.loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._dev_predictions = {}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        preds = self.predictions(batch, self._logits(batch))
        self._dev_predictions.update(zip(batch["index"], preds))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self.dev_scorer(self._dev_predictions)
        score = float(metrics[self.metric])
        self.dev_history.append(score)
        self.log("dev_score", score, prog_bar=True)
        if score > self.best_score:
            self.best_score = score
            self.best_epoch = self.current_epoch + 1
            self.best_dev = metrics
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[tuple[int, Any]]:
        return list(zip(batch["index"], self.predictions(batch, self._logits(batch))))

    def configure_optimizers(self) -> Any:
        from transformers import get_linear_schedule_with_warmup

        from dapt.modeling.optim import OptimizerConfig, build_optimizer, clips_scaled_gradients

        # The BERT fine-tuning recipe: AdamW with torch's default betas/eps, no weight decay on
        # biases and LayerNorm weights (dapt.modeling.optim.param_groups), linear warm-up and decay.
        config = OptimizerConfig(lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.999), eps=1e-8)
        optimizer = build_optimizer(self.model, config, scaled_clipping=clips_scaled_gradients(self))
        warmup = int(round(self.warmup_ratio * self.total_steps))
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        from dapt.modeling.optim import clip_gradients

        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def restore_best(self) -> None:
        """Load the best-dev weights (no-op when dev was never scored)."""
        if self.best_state is not None:
            self.model.load_state_dict(copy.copy(self.best_state))


class TokenClassificationModule(FinetuneModule):
    """NER: argmax per token, read back at each word's first sub-token."""

    def __init__(self, model: torch.nn.Module, *, id2label: Sequence[str], **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.id2label = list(id2label)

    def predictions(self, batch: dict[str, Any], logits: torch.Tensor) -> list[Any]:
        return decode_ner(logits.argmax(-1).cpu(), batch["word_starts"], self.id2label)


class SequenceClassificationModule(FinetuneModule):
    """Classification: argmax over labels of the pooled first token."""

    def predictions(self, batch: dict[str, Any], logits: torch.Tensor) -> list[Any]:
        return logits.argmax(-1).cpu().tolist()
