"""dapt's side of the head-to-head: the same objects ``dapt train`` builds, timed step by step.

``PackedCorpusDataModule`` streams and packs the corpus on the fly (its cost is inside the timed
loop, unlike the HF side's pre-tokenised dataset), masks in ``on_after_batch_transfer`` and
``MLMModule`` trains with the sparse head, under a Lightning ``Trainer`` configured like
``conf/trainer/cpu.yaml`` (or ``gpu.yaml``) with logging and checkpoints off, in ``settings.precision``
(or ``precision``: the bench's fp32 reference run).
"""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch

from dapt.data.datamodule import DataConfig, PackedCorpusDataModule
from dapt.masking import build_masker
from dapt.modeling.mlm_module import MLMModule
from dapt.modeling.optim import OptimizerConfig, SchedulerConfig
from experiments.throughput.common import BenchSettings, RunResult, StepClock, train_source


class _StepClockCallback(pl.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.clock.tick(float(loss.detach()) if torch.is_tensor(loss) else None)


def run_dapt(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: BenchSettings,
    *,
    seed: int,
    compile_model: bool = False,
    optimizer_impl: str = "auto",
    precision: str | None = None,
    clock: StepClock | None = None,
) -> RunResult:
    """Train ``model`` in place with dapt's Lightning path for ``settings.steps`` steps (``clock``: one
    with a held-out-loss probe, for a time-to-quality curve)."""
    started = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    masker = build_masker({"name": "random", "rate": settings.mask_rate}, tokenizer)
    data = DataConfig(
        name="bench",
        train=[train_source(settings)],
        max_seq_length=settings.seq_len,
        batch_size=settings.batch_size,
        shuffle_buffer=0,  # corpus order, like the HF side's sequential sampler
        num_workers=0,
    )
    datamodule = PackedCorpusDataModule(data, tokenizer, masker, data_dir=settings.data_dir, seed=seed)
    module = MLMModule(
        model,
        optimizer=OptimizerConfig(lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6, implementation=optimizer_impl),
        scheduler=SchedulerConfig(name="linear", warmup_steps=settings.warmup_steps),
        total_steps=settings.steps,
        eval_names=(),
        compile_model=compile_model,
    )
    clock = clock or StepClock()
    on_gpu = settings.device == "cuda"
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        precision=precision or settings.precision,
        max_steps=settings.steps,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        callbacks=[_StepClockCallback(clock)],
    )
    setup_s = time.perf_counter() - started
    trainer.fit(module, datamodule=datamodule)
    return RunResult(
        name="dapt",
        step_ends=clock.ends,
        losses=clock.losses,
        tokens_per_step=settings.batch_size * settings.seq_len,
        warmup_steps=settings.warmup_steps,
        setup_s=setup_s,
        extra={"compile": compile_model, "optimizer": optimizer_impl, "precision": precision or settings.precision,
               "cpu_thread_choices": _thread_choices(trainer), "curve": clock.curve},
    )


def _thread_choices(trainer: pl.Trainer) -> list[tuple[int, int]]:
    """(step, threads) picked by the CPU thread tuner that ``MLMModule`` adds on CPU, if any."""
    from dapt.modeling.callbacks import CpuThreadTuner

    return [c for cb in trainer.callbacks if isinstance(cb, CpuThreadTuner) for c in cb.history]
