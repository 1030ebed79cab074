"""A progress bar that counts optimizer steps towards ``max_steps`` (streams have no length).

On a terminal it is a live TQDM bar. When output is not a terminal (CI, SLURM logs, ``| tee``), a
redrawing bar would write thousands of carriage-return updates into the log, so the bars are off and
a plain line is printed about every tenth of the run instead. ``iter_progress`` does the same for a
stream of items (documents scanned by data selection).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Iterable, Iterator, TypeVar

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

LOG_LINES = 10  # plain progress lines per run when output is not a terminal
T = TypeVar("T")
log = logging.getLogger(__name__)


class StepProgressBar(TQDMProgressBar):
    """TQDM bar over training steps with loss and tokens/s; works for endless iterable datasets."""

    def __init__(self, description: str = "train", refresh_rate: int = 1, interactive: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.description = description
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        if not self.interactive:
            self.disable()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_steps and trainer.max_steps > 0 and self.train_progress_bar is not None:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = 0
            self.train_progress_bar.set_description(self.description)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.interactive or not trainer.is_global_zero:
            return
        total, step = trainer.max_steps, trainer.global_step
        every = max(1, total // LOG_LINES) if total and total > 0 else 100
        if step % every == 0 or step == total:
            metrics = self.get_metrics(trainer, pl_module)
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
            print(f"{self.description}: step {step}/{total}" + (f" ({shown})" if shown else ""), flush=True)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def iter_progress(items: Iterable[T], total: int | None, description: str) -> Iterator[T]:
    """Count ``items`` as they stream: a live tqdm bar on a terminal; otherwise, like
    ``StepProgressBar``, about ``LOG_LINES`` plain log lines (no carriage-return flood)."""
    if sys.stdout.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=description, unit="doc")
        return
    every = max(1, total // LOG_LINES) if total else 10_000
    n = 0
    for n, item in enumerate(items, start=1):
        yield item
        if n % every == 0:
            log.info("%s: %d%s documents", description, n, f"/{total}" if total else "")
    log.info("%s: %d documents, done", description, n)
