"""Training callbacks: throughput (tokens/s, optional MFU) and atomic checkpoint writes."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class ThroughputMonitor(pl.Callback):
    """Logs ``train/tokens_per_s`` (and ``train/mfu`` when FLOPs/token and peak are known).

    Time is measured from batch start to batch end on the main process, excluding the first
    ``warmup_steps`` (allocator and kernel warm-up), so the figure is the steady-state rate.
    """

    def __init__(self, warmup_steps: int = 2, flops_per_token: float | None = None, peak_flops: float | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.tokens = 0
        self.measured_tokens = 0
        self.measured_time = 0.0
        self._t0 = 0.0
        self._n = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        n_tokens = int(batch["input_ids"].numel()) * trainer.world_size
        self.tokens += n_tokens
        self._n += 1
        if self._n > self.warmup_steps:
            self.measured_tokens += n_tokens
            self.measured_time += dt
            rate = n_tokens / max(dt, 1e-9)
            pl_module.log("train/tokens_per_s", rate, prog_bar=True, batch_size=1)
            if self.flops_per_token and self.peak_flops:
                pl_module.log("train/mfu", rate * self.flops_per_token / self.peak_flops, batch_size=1)

    @property
    def tokens_per_s(self) -> float | None:
        return self.measured_tokens / self.measured_time if self.measured_time > 0 else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints to a temporary file and renames it, so a killed run never corrupts one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
