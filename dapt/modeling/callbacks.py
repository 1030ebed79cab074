"""Training callbacks: throughput (tokens/s, optional MFU), CPU thread tuning, atomic checkpoint writes."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from dapt import metric_names
from dapt.io import atomic_write_file

log = logging.getLogger(__name__)


class ThroughputMeter(pl.Callback):
    """Logs ``train/tokens_per_s`` (and ``train/mfu`` when FLOPs/token and peak are known).

    Not Lightning's ``ThroughputMonitor``: that one counts samples and needs a FLOP count per batch;
    this one counts the tokens the MLM trained on and divides by dapt's FLOP model and measured peak.

    Time is measured from batch start to batch end on the main process, excluding the first
    ``warmup_steps`` (allocator and kernel warm-up), so the figure is the steady-state rate.
    ``train/mfu`` is the mean over the measured steps so far (after the first few, one short step
    cannot make it spike) and divides the job's FLOP/s by ``peak_flops`` × the number of ranks
    (``peak_per_rank``: one GPU's peak) or × the number of hosts (a CPU peak, which local ranks share). It is never above 1: a value above 1 means
    the peak was measured too low (a busy machine), so the peak is measured again once
    (``remeasure_peak``); if training still beats it over ``MIN_STEPS_FOR_VERDICT`` measured steps,
    MFU is not reported for the run, with a warning, rather than reported wrong.
    """

    MIN_STEPS_FOR_VERDICT = 5

    def __init__(self, warmup_steps: int = 2, flops_per_token: float | None = None, peak_flops: float | None = None,
                 remeasure_peak: Callable[[], float | None] | None = None, peak_per_rank: bool = True) -> None:
        self.warmup_steps = warmup_steps
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.remeasure_peak = remeasure_peak
        self.peak_per_rank = peak_per_rank
        self.tokens = 0
        self.measured_tokens = 0
        self.measured_time = 0.0
        self._t0 = 0.0
        self._n = 0
        self._world = 1
        self._peak_rechecked = False
        self._peak_too_low = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        # how many peaks the job's rate is spread over: every rank's device, or every host's CPU
        self._world = trainer.world_size if self.peak_per_rank else int(getattr(trainer, "num_nodes", 1) or 1)
        n_tokens = int(batch["input_ids"].numel()) * trainer.world_size
        self.tokens += n_tokens
        self._n += 1
        if self._n > self.warmup_steps:
            self.measured_tokens += n_tokens
            self.measured_time += dt
            pl_module.log(metric_names.TOKENS_PER_S, n_tokens / max(dt, 1e-9), prog_bar=True, batch_size=1)
            mean_mfu = self.mfu
            if mean_mfu is not None:
                pl_module.log(metric_names.MFU, mean_mfu, batch_size=1)

    def _utilisation(self, rate: float) -> float | None:
        """``rate`` tokens/s as a fraction of the peak; None (with one warning) when it exceeds the peak."""
        if not self.flops_per_token or not self.peak_flops or self._peak_too_low:
            return None
        from dapt.modeling.flops import mfu

        value = mfu(rate, self.flops_per_token, self.peak_flops, self._world)
        if value > 1.0 and not self._peak_rechecked and self.remeasure_peak is not None:
            self._peak_rechecked = True
            fresh = self.remeasure_peak()
            if fresh:
                self.peak_flops = max(self.peak_flops, fresh)
                value = mfu(rate, self.flops_per_token, self.peak_flops, self._world)
        if value <= 1.0:
            return value
        if self._n - self.warmup_steps >= self.MIN_STEPS_FOR_VERDICT:
            self._peak_too_low = True
            log.warning("MFU would be %.2f (> 1): training beat the measured matmul peak (%.1f GFLOP/s per rank), so that "
                        "peak is too low for this machine now; MFU is not reported for this run", value, self.peak_flops / 1e9)
        return None

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed so that a resumed run reports the tokens of the whole run, not of its last leg."""
        return {"tokens": self.tokens, "measured_tokens": self.measured_tokens, "measured_time": self.measured_time}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens = int(state_dict.get("tokens", 0))
        self.measured_tokens = int(state_dict.get("measured_tokens", 0))
        self.measured_time = float(state_dict.get("measured_time", 0.0))

    @property
    def tokens_per_s(self) -> float | None:
        return self.measured_tokens / self.measured_time if self.measured_time > 0 else None

    @property
    def mfu(self) -> float | None:
        """Mean model FLOP utilisation over the measured steps, in [0, 1] (None without FLOPs/peak,
        or when training beat the peak; see the class docstring)."""
        rate = self.tokens_per_s
        return None if rate is None else self._utilisation(rate)


CPU_THREADS = "cpu_threads"  # the trainer config key that chooses between fixed threads and this tuner
START_THREADS = torch.get_num_threads()  # the process's count before any run set one ("all")


class CpuThreadTuner(pl.Callback):
    """On CPU, trains with the intra-op thread count that is fastest *now*, re-checked as load changes.

    Why: no static ``torch.set_num_threads`` is right on a shared machine. When other jobs take
    cores, fewer threads train faster (OpenMP threads spin at every barrier waiting for a sibling
    the scheduler has parked), while on an idle machine all threads are the faster choice; how
    large the difference is, per machine, is in experiments/throughput/README.md (the "1 thread
    instead of 2" lever of ``make bench``). So the tuner times real training steps: after
    ``warmup_steps`` it alternates the candidates (all threads, half, one) for ``probe_steps`` steps
    each, keeps the one with the lowest median step time, and probes again every ``every_n_steps``.
    A probe costs a few steps at a slower setting (``len(candidates) × probe_steps`` of every
    ``every_n_steps``, a small share of a run at the defaults). Off on GPU and
    under multi-process training (ranks must not drift apart), and when only one thread is allowed.
    """

    def __init__(self, warmup_steps: int = 1, probe_steps: int = 2, every_n_steps: int = 100) -> None:
        self.warmup_steps = warmup_steps
        self.probe_steps = probe_steps
        self.every_n_steps = every_n_steps
        self.enabled = False
        self.max_threads = torch.get_num_threads()
        self.candidates: list[int] = []
        self.chosen: int | None = None
        self.history: list[tuple[int, int]] = []  # (step, chosen threads) after each probe
        self._plan: list[int] = []
        self._samples: dict[int, list[float]] = {}
        self._current = 0
        self._step = 0
        self._last_probe = 0
        self._t0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.max_threads = torch.get_num_threads()
        on_cpu = pl_module.device.type == "cpu"
        self.enabled = on_cpu and trainer.world_size == 1 and self.max_threads > 1
        self.candidates = sorted({self.max_threads, max(1, self.max_threads // 2), 1}, reverse=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        due = self.chosen is None or self._step - self._last_probe >= self.every_n_steps
        if not self._plan and self._step >= self.warmup_steps and due:
            self._plan = [n for _ in range(self.probe_steps) for n in self.candidates]
            self._samples = {n: [] for n in self.candidates}
        if self._plan:
            self._current = self._plan.pop(0)
            torch.set_num_threads(self._current)
            self._t0 = time.perf_counter()
        else:
            self._current = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        self._step += 1
        if self._current:
            self._samples[self._current].append(time.perf_counter() - self._t0)
            if not self._plan:  # probe finished: keep the fastest
                self.chosen = min(self._samples, key=lambda n: sorted(self._samples[n])[len(self._samples[n]) // 2])
                torch.set_num_threads(self.chosen)
                self._last_probe = self._step
                self.history.append((trainer.global_step, self.chosen))
        pl_module.log(metric_names.CPU_THREADS, float(torch.get_num_threads()), batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:
            torch.set_num_threads(self.max_threads)  # evaluation and later work start from the full count


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints to a temporary file and renames it, so a killed run never corrupts one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_write_file(path, lambda tmp: torch.save(checkpoint, tmp))


class RngStateCheckpoint(pl.Callback):
    """Saves the global RNG states (dropout) in each checkpoint and restores them on resume.

    Lightning restores weights, optimizer, scheduler and loop counters but not the RNGs, so a resumed
    run would draw different dropout masks from the one that was interrupted. The states are
    captured when a checkpoint is written (the end of a training step) and put back at the start of
    the first training step after the resume, not at load time: Lightning draws from the global RNG
    in between (a DataLoader iterator takes its base seed from it), and nothing draws from it
    between a step's end and the next step's start in an uninterrupted run (evaluation loaders own
    their generators and masks come from the datamodule's generator), so the resumed steps see
    exactly the states the uninterrupted ones did. Under DDP the checkpoint holds every rank's
    states and each rank resumes with its own.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        # plain lists and tensors only: checkpoints load with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        from dapt.distributed import with_all_ranks

        return with_all_ranks(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from dapt.distributed import own_rank_state

        self._pending = dict(own_rank_state(state_dict, "dropout RNG"))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        import random

        import numpy as np

        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
