"""Runs that survive: checkpoints, exact resume, and stopping cleanly on SIGTERM/SIGINT.

Pre-empted and time-limited cluster jobs are the normal case for DAPT, so a run (1) writes a Lightning
checkpoint at an interval, atomically (``checkpoint`` config group); (2) on SIGTERM or SIGINT stops at
the end of the current step, writes a checkpoint, and exits non-zero (143/130) with one line saying
how to resume; (3) with ``resume=auto`` continues the latest interrupted run of the same config in
its own directory: weights, optimizer, scheduler, loop counters (Lightning), the data stream position
and masking generators (``PackedCorpusDataModule.state_dict``), the dropout RNG
(``RngStateCheckpoint``), the W&B run id and the CSV history; (4) holds an exclusive lock on its
run directory while it works in it (``dapt.pipeline.run_lock.RunLock``), so a second ``resume=auto`` of the same run (a
requeued job whose first copy is still alive, a sweep launched twice) stops with a one-line error
instead of both writing the same checkpoint and results; and (5) counts its wall time over all its
attempts (``RunClock``).

"The same config" is the resolved config without the keys that only say where to write, whether
to resume, how often to checkpoint and how to log (``VOLATILE_KEYS``); it is stored in each run
directory as ``run_config.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf

from dapt.errors import ConfigError, RunInUseError
from dapt.io import atomic_write_json, atomic_write_text
from dapt.pipeline.run_lock import RunLock
from dapt.versioning import code_digest

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
WANDB_ID_FILE = "wandb_run_id.txt"
# Config keys that do not change what a run computes: a run resumed with other values is the same run.
VOLATILE_KEYS = ("resume", "paths", "hydra", "checkpoint", "logger", "tags", "optimized_metric")


@dataclass
class CheckpointConfig:
    """The ``checkpoint`` config group.

    Attributes:
        enabled: write ``<run dir>/checkpoints/last.ckpt`` during training (atomically).
        every_n_steps: interval in optimizer steps; when null, ``every_minutes`` is used.
        every_minutes: interval in minutes of training time (used when ``every_n_steps`` is null).
        keep: keep the checkpoint after the run finished (it holds the optimizer state: ~3x the
            model's size); by default it is deleted once results.json is written.
    """

    enabled: bool = True
    every_n_steps: int | None = None
    every_minutes: float | None = 10.0
    keep: bool = False

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ConfigError(f"checkpoint.every_n_steps={self.every_n_steps}: must be >= 1 (or null to use every_minutes)")
        if self.every_n_steps is None and (self.every_minutes is None or self.every_minutes <= 0):
            raise ConfigError("checkpoint: set every_n_steps >= 1 or every_minutes > 0 (or checkpoint.enabled=false)")


@dataclass
class ResumePoint:
    """A run to continue: its folder and checkpoint, or ``finished`` (its results.json is final)."""

    run_dir: Path
    checkpoint: Path | None
    step: int
    finished: bool = False


def run_signature(cfg: Any) -> dict[str, Any]:
    """What must match for a run to be resumed (or its results reused): the resolved config minus
    ``VOLATILE_KEYS``, plus the data folder and a digest of dapt's source code, so that a run made
    by other code (a bug fixed since) or read from another data folder is never continued or reused.
    (A changed corpus under the same path is not detected; ``resume=<run dir>`` overrides all this.)"""
    if OmegaConf.is_config(cfg):  # resolve key by key: a volatile key (paths.output_dir -> ${hydra:...}) is never
        # resolved, so the signature can also be computed from a config composed outside a Hydra run (dapt study)
        signature = {k: (OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k])
                     for k in cfg if k not in VOLATILE_KEYS}
        data_dir = OmegaConf.select(cfg, "paths.data_dir")
    else:
        signature = {k: v for k, v in dict(cfg).items() if k not in VOLATILE_KEYS}
        data_dir = (dict(cfg).get("paths") or {}).get("data_dir")
    signature["data_dir"] = str(data_dir)
    signature["code"] = code_digest()
    return json.loads(json.dumps(signature, sort_keys=True, default=str))


def without_precision(signature: Any) -> Any:
    """A run signature with the (resolved) trainer and downstream precisions left out."""
    if not isinstance(signature, dict):
        return None
    out = dict(signature)
    for group in ("trainer", "downstream"):
        if isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k != "precision"}
    return out


def write_run_config(run_dir: Path, cfg: Any) -> None:
    atomic_write_json(run_dir / RUN_CONFIG, run_signature(cfg))


def checkpoint_step(path: Path) -> int:
    """The optimizer step a Lightning checkpoint was written at."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["global_step"])
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise ConfigError(f"resume: checkpoint {path} is unreadable ({type(exc).__name__}: {exc})") from None


def _candidates(run_dir: Path) -> list[Path]:
    """Run directories a ``resume=auto`` run may continue: this one, its siblings
    (``outputs/<experiment>/<time>``) and, for a sweep job ``<sweep>/<num>``, the same job folders
    of other sweeps of the experiment."""
    found = {run_dir}
    found.update(p.parent for p in run_dir.parent.glob(f"*/{RUN_CONFIG}"))
    if run_dir.name.isdigit():
        found.update(p.parent for p in run_dir.parent.parent.glob(f"*/*/{RUN_CONFIG}"))
    return sorted(found)


def _complete(results: Path) -> bool:
    """A results.json without an ``error`` block (a late stage that failed is run again on resume)."""
    try:
        return "error" not in json.loads(results.read_text())
    except (OSError, ValueError):
        return False


def find_resume_point(cfg: Any, run_dir: Path) -> ResumePoint | None:
    """Where ``cfg.resume`` says to continue from (None: start a new run).

    ``resume=auto``: the most recent run whose ``run_config.json`` equals this config's signature:
    unfinished with a checkpoint (continue it; also a run whose results.json records a failed late
    stage, which keeps its checkpoint) or finished (``finished=True``: its results are
    reused, so a requeued job or a re-launched sweep does not compute a finished run again). None
    found is not an error: a new run starts, so a requeued job can always pass ``resume=auto``.
    ``resume=<run dir or .ckpt>``: that run, which must hold a checkpoint (its config is not
    compared: the user named it).
    """
    mode = cfg.get("resume")
    if mode in (None, False, "", "never", "none"):
        return None
    if mode != "auto":
        target = Path(str(mode))
        ckpt = target / CHECKPOINT_DIR / LAST_CHECKPOINT if target.is_dir() else target
        if not ckpt.is_file():
            raise ConfigError(f"resume={mode}: no checkpoint at {ckpt} (expected a run directory or a .ckpt file)")
        if ckpt.parent.name != CHECKPOINT_DIR:
            raise ConfigError(f"resume={mode}: a checkpoint must lie in a run folder's {CHECKPOINT_DIR}/ (the run continues in that folder)")
        point = ResumePoint(run_dir=ckpt.parent.parent, checkpoint=ckpt, step=checkpoint_step(ckpt))
        try:
            if json.loads((point.run_dir / RUN_CONFIG).read_text()) != run_signature(cfg):
                log.warning("resume=%s: that run's config (%s) differs from this one; continuing it with this config",
                            mode, point.run_dir / RUN_CONFIG)
        except (OSError, ValueError):
            pass
        return point
    signature = run_signature(cfg)
    best: tuple[float, Path, bool] | None = None
    other_precision: list[tuple[Path, Any]] = []
    for candidate in _candidates(run_dir):
        results, ckpt = candidate / "results.json", candidate / CHECKPOINT_DIR / LAST_CHECKPOINT
        try:
            theirs = json.loads((candidate / RUN_CONFIG).read_text())
            same = theirs == signature
        except (OSError, ValueError):
            theirs, same = None, False
        if not same and candidate != run_dir and without_precision(theirs) == without_precision(signature):
            other_precision.append((candidate, (theirs.get("trainer") or {}).get("precision")))
        if results.is_file() and _complete(results):
            stamp, finished = results.stat().st_mtime, True
        elif ckpt.is_file():
            stamp, finished = ckpt.stat().st_mtime, False
        else:
            if same and candidate != run_dir and RunLock(candidate).held_by_another():
                # the same config running now, before its first checkpoint: a second copy would duplicate it
                raise RunInUseError(f"resume=auto: the same run is in progress in {candidate} ({RunLock(candidate).holder()}): "
                                    "wait for it to end, or start a separate run with resume=never")
            continue
        if same and (best is None or stamp > best[0]):
            best = (stamp, candidate, finished)
    if best is None:
        for candidate, precision in other_precision:  # e.g. a requeued job landed on a node without native bf16
            log.warning("resume=auto: %s ran this config in precision %s, and this run's trainer.precision is %s; "
                        "not continued (different numerics). Pass trainer.precision=%s to continue it.", candidate, precision,
                        (signature.get("trainer") or {}).get("precision"), precision)
        log.info("resume=auto: no earlier run of this config next to %s; starting a new run", run_dir)
        return None
    _, found, finished = best
    if finished:
        return ResumePoint(run_dir=found, checkpoint=None, step=-1, finished=True)
    ckpt = found / CHECKPOINT_DIR / LAST_CHECKPOINT
    try:
        return ResumePoint(run_dir=found, checkpoint=ckpt, step=checkpoint_step(ckpt))
    except ConfigError as exc:  # a requeued job must not fail forever on a damaged checkpoint
        log.warning("resume=auto: %s; starting a new run", exc)
        return None


class RunClock(pl.Callback):
    """Wall time of a run over all its attempts (``results.json`` ``train_seconds`` and ``attempts``).

    Each checkpoint stores the time spent up to it; a resumed attempt adds its own time to that.
    Time an interrupted attempt spent after its last checkpoint is not counted (those steps are
    trained, and timed, again by the next attempt), nor is the time between attempts.
    """

    def __init__(self) -> None:
        self.started = time.time()
        self.before = 0.0
        self.attempts = 1

    def start(self) -> None:
        self.started = time.time()

    def seconds(self) -> float:
        return self.before + time.time() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds(), "attempts": self.attempts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))
        self.attempts = int(state_dict.get("attempts", 1)) + 1


def checkpoint_callback(cfg: CheckpointConfig, run_dir: Path) -> pl.Callback:
    """Lightning's ModelCheckpoint writing only ``last.ckpt`` (through ``AtomicCheckpointIO``), and
    only at the end of a batch that completed an optimizer step: a time-based save inside a
    gradient-accumulation group would lose the group's partial gradients on resume."""
    from datetime import timedelta

    from pytorch_lightning.callbacks import ModelCheckpoint

    class StepBoundaryCheckpoint(ModelCheckpoint):
        _step_at_batch_start = 0

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
            self._step_at_batch_start = trainer.global_step

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step != self._step_at_batch_start:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    interval: dict[str, Any] = (
        {"every_n_train_steps": cfg.every_n_steps} if cfg.every_n_steps else {"train_time_interval": timedelta(minutes=float(cfg.every_minutes or 0))}
    )
    # enable_version_counter=False: a last.ckpt written by a stop (not by this callback) must be
    # overwritten by the next periodic save, not joined by last-v1.ckpt, which resume never reads
    return StepBoundaryCheckpoint(dirpath=str(run_dir / CHECKPOINT_DIR), save_last=True, save_top_k=0, enable_version_counter=False,
                                  **interval)


def keep_csv_history(run_dir: Path, up_to_step: int) -> list[dict[str, str]]:
    """Rows of the interrupted run's ``csv/metrics.csv`` logged at steps < ``up_to_step`` (the rest
    are logged again by the resumed steps); Lightning's CSV logger deletes the file when it starts."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < up_to_step]


def restore_csv_history(loggers: list[Any], rows: list[dict[str, str]]) -> None:
    """Write ``rows`` back under the CSV logger (after it has started) so the history is whole."""
    from pytorch_lightning.loggers import CSVLogger

    from dapt.launch.ddp import secondary_rank_process

    if not rows or secondary_rank_process():  # rank 0 writes the history (other ranks' loggers are dummies)
        return
    for lg in loggers:
        if isinstance(lg, CSVLogger):
            writer = lg.experiment  # creating it deletes the old file
            keys = sorted({k for r in rows for k in r})
            text = io.StringIO()
            table = csv.DictWriter(text, fieldnames=keys)
            table.writeheader()
            table.writerows(rows)
            atomic_write_text(writer.metrics_file_path, text.getvalue())
            writer.metrics_keys = keys


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, created once: a resumed run logs into the same W&B run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    atomic_write_text(path, run_id + "\n")
    return run_id


def resume_command(argv: list[str]) -> str:
    """The command that resumes this run: the same arguments with ``resume=auto``."""
    args = [a for a in argv[1:] if not a.startswith(("resume=", "+resume="))]
    return " ".join(["dapt train", *args, "resume=auto"])
