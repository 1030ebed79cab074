"""Runs that survive: checkpoints, exact resume, and stopping cleanly on SIGTERM/SIGINT.

Pre-empted and time-limited cluster jobs are the normal case for DAPT, so a run (1) writes a Lightning
checkpoint at an interval, atomically (``checkpoint`` config group); (2) on SIGTERM or SIGINT stops at
the end of the current step, writes a checkpoint, and exits non-zero (143/130) with one line saying
how to resume; (3) with ``resume=auto`` continues the latest interrupted run of the same config in
its own directory: weights, optimizer, scheduler, loop counters (Lightning), the data stream position
and masking generators (``PackedCorpusDataModule.state_dict``), the dropout RNG
(``RngStateCheckpoint``), the W&B run id and the CSV history; (4) holds an exclusive lock on its
run directory while it works in it (``RunLock``), so a second ``resume=auto`` of the same run (a
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
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf

from dapt.errors import ConfigError, RunInterrupted, RunInUseError
from dapt.io import atomic_write_json, atomic_write_text
from dapt.versioning import code_digest

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
WANDB_ID_FILE = "wandb_run_id.txt"
LOCK_FILE = ".run.lock"
LOCK_WAIT_SECONDS = 10.0  # how long a run waits for its folder's lock before refusing (see RunLock.acquire)
# Config keys that do not change what a run computes: a run resumed with other values is the same run.
VOLATILE_KEYS = ("resume", "paths", "hydra", "checkpoint", "logger", "tags", "optimized_metric")
SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


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
    container = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    signature = {k: v for k, v in container.items() if k not in VOLATILE_KEYS}
    signature["data_dir"] = str((container.get("paths") or {}).get("data_dir"))
    signature["code"] = code_digest()
    return json.loads(json.dumps(signature, sort_keys=True, default=str))


def _without_precision(signature: Any) -> Any:
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
        if not same and candidate != run_dir and _without_precision(theirs) == _without_precision(signature):
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


class RunLock:
    """An exclusive claim on a run directory for as long as one process works in it.

    ``flock`` on ``<run dir>/.run.lock``: the kernel drops the lock when its process ends, however it
    ends (SIGKILL, OOM kill, a node's job killed by the scheduler), so a requeued job can always
    take over an interrupted run, and a run that is still alive cannot be taken over. The file holds
    the owner's pid and host for the error message; it is never deleted (deleting a lock file races
    with a process about to lock it). Network file systems: Linux NFSv4 supports ``flock``; on a
    file system without locks, ``acquire`` warns and goes on unlocked rather than refusing to run; a
    file system whose locks are node-local (Lustre mounted with ``localflock``) protects only against
    a second copy on the same node. A process forked by the holder without exec (a dataloader
    worker) inherits the lock until it exits, hence ``acquire``'s short wait.
    Only global rank 0 of a data-parallel job takes it (its ranks share the folder).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def holder(self) -> str:
        """Who holds the lock, as written by its holder ("pid N on host H since T"), or "unknown"."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def held_by_another(self) -> bool:
        """Whether a live process holds the lock now (a probe: nothing is kept)."""
        import fcntl

        if not self.path.is_file():
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
        return False

    def acquire(self, wait: float = 0.0) -> "RunLock":
        """Take the lock, retrying for ``wait`` seconds (a requeued job may start while processes
        forked by its predecessor, e.g. dataloader workers, still hold the inherited lock for a few
        seconds), else raise ``RunInUseError`` naming the holder."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                os.close(fd)
                raise RunInUseError(
                    f"run {self.path.parent} is in use by another process ({self.holder()}): wait for it to end, "
                    "or start a separate run with resume=never"
                ) from None
            except OSError as exc:  # no lock support on this file system
                log.warning("could not lock %s (%s); going on without protection against a second copy of this run", self.path, exc)
                break
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


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

    from dapt.tracking.ddp import secondary_rank_process

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


class StopOnSignal(pl.Callback):
    """SIGTERM/SIGINT during the run: stop at the next optimizer-step boundary, checkpoint, exit non-zero.

    Lightning's own signal handling is switched off for the DAPT trainer (``setup`` replaces its
    ``register_signal_handlers``): its SIGTERM handler raises the stop flag at once (inside a
    gradient-accumulation group, whose partial gradients a checkpoint does not hold), and under DDP
    runs a collective inside the handler on one rank; under SLURM its SIGUSR handler saves a
    checkpoint from inside the handler. This callback's handler stays installed instead.

    The first signal only records the stop. **During fit** the flag that Lightning's loops act on
    is raised at the end of the batch that completes an optimizer step, or at once between two
    steps; a flag raised before a step's first batch waits for that step's end, so a stop never lands
    inside a gradient-accumulation group. An evaluation inside fit is never cut short (the flag is
    parked while it runs): the stop lands on the next step boundary, and the validation at the
    checkpoint's step is in the history. **Under DDP** the ranks agree at
    each optimizer-step boundary (one all-reduce of the signal number) and all stop after the same
    step, so they write the checkpoint together (its per-rank state is gathered). **In the other
    trainer calls** (the start model's and final evaluations) a single process stops at once, while
    under DDP the ranks agree after the call (``raise_if_signalled``). ``raise_if_signalled`` after every
    trainer call also catches a signal that arrived on a last batch. The checkpoint is written in
    ``on_exception``; ``train`` turns Lightning's ``SIGTERMException`` (a ``SystemExit`` with status 0)
    into ``RunInterrupted``. Outside that trainer (base preparation, control arm, downstream tasks,
    whose caches are written atomically at their end) and on a second signal, the handler raises
    ``RunInterrupted`` at once; under DDP that rank then leaves the others, which dapt's rank
    watcher (or the cluster's launcher) stops.

    Under SLURM with submitit, a time limit is announced with SIGUSR2, which submitit handles itself
    (requeue, then exit): the requeued job continues from the last periodic checkpoint.
    """

    def __init__(self, checkpoint_path: Path | None) -> None:
        self.checkpoint_path = checkpoint_path
        self.signum: int | None = None
        self.saved: Path | None = None
        self.step = 0
        self._trainer: pl.Trainer | None = None
        self._step_at_batch_start = 0
        self._in_step = False  # from the first batch of an optimizer step to the end of its last
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopOnSignal":
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                previous = signal.signal(signum, self._handle)
                self._previous.setdefault(signum, previous)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @staticmethod
    def _distributed(trainer: pl.Trainer) -> bool:
        return trainer.world_size > 1

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        name = SIGNAL_NAMES.get(signum, str(signum))
        trainer = self._trainer
        if first and trainer is not None:
            if not self._distributed(trainer) and (trainer.state.fn != "fit" or not (
                    self._in_step or trainer.validating or trainer.sanity_checking)):
                self._request_stop(trainer)  # an evaluation call, or between two optimizer steps: stop now
            log.warning("received %s: stopping after the current step and writing a checkpoint (send it again to stop now)", name)
            return
        raise RunInterrupted(f"interrupted by {name}", signum=signum)

    def _request_stop(self, trainer: pl.Trainer) -> None:
        trainer._signal_connector.received_sigterm = True

    def _agreed_signal(self) -> int:
        """The signal any rank received (0: none); a collective under DDP."""
        from dapt.distributed import all_ranks_max

        signum = all_ranks_max(int(self.signum or 0))
        if signum and self.signum is None:
            self.signum = signum  # another rank was signalled: this one stops with it
        return signum

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Runs before Lightning installs its signal handlers for the call: it installs none (see the
        class docstring); its flag starts clear, or raised for an evaluation call when a signal is
        already pending on a single process."""
        self._trainer = trainer
        connector = trainer._signal_connector

        def register_signal_handlers() -> None:
            connector.received_sigterm = self.signum is not None and trainer.state.fn != "fit" and not self._distributed(trainer)
            connector._original_handlers = {}
            self.install()

        connector.register_signal_handlers = register_signal_handlers

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit":  # never cut a validation inside fit short (DDP ranks hold different batch counts)
            trainer._signal_connector.received_sigterm = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step
        if not self._in_step:  # the first batch of an optimizer step: a stop raised before it waits for the step's end
            self._in_step = True
            trainer._signal_connector.received_sigterm = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside a gradient-accumulation group: never stop here
        self._in_step = False
        if self._distributed(trainer):
            if self._agreed_signal():  # every rank calls this after every optimizer step
                self._request_stop(trainer)
        elif self.signum is not None:
            self._request_stop(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Flush the CSV history with every checkpoint: Lightning writes it every 100 steps, and a
        run killed after its checkpoint must not leave a gap in the history it resumes."""
        from pytorch_lightning.loggers import CSVLogger

        for lg in trainer.loggers:
            if isinstance(lg, CSVLogger):
                lg.save()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None
        self._in_step = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        self.step = trainer.global_step
        if isinstance(exception, SIGTERMException) and self.checkpoint_path is not None and trainer.state.fn == "fit":
            trainer.save_checkpoint(str(self.checkpoint_path))
            self.saved = self.checkpoint_path

    def raise_if_signalled(self, trainer: pl.Trainer, *, resume_hint: str, training_done: bool = False) -> None:
        """After a trainer call: a signal that Lightning did not act on (it arrived on a last batch)
        stops the run here; after a finished fit, the final state is checkpointed first."""
        if not self._agreed_signal():  # every rank calls this after every trainer call
            return
        self.step = trainer.global_step
        if training_done and self.checkpoint_path is not None and self.saved is None:
            trainer.save_checkpoint(str(self.checkpoint_path))
            self.saved = self.checkpoint_path
        raise self.interrupted(resume_hint=resume_hint)

    def interrupted(self, *, resume_hint: str) -> RunInterrupted:
        """The error ``train`` raises after Lightning stopped on this callback's request."""
        signum = self.signum or signal.SIGTERM
        name = SIGNAL_NAMES.get(signum, str(signum))
        checkpoint = self.saved
        if checkpoint is None and self.checkpoint_path is not None and self.checkpoint_path.is_file():
            checkpoint = self.checkpoint_path  # no stop checkpoint, but the last periodic one
        if checkpoint is not None:
            message = f"interrupted by {name} at step {self.step}; checkpoint {checkpoint}; resume with: {resume_hint}"
        else:
            message = f"interrupted by {name} (step {self.step}); no checkpoint to resume from (not training yet, or checkpoint.enabled=false)"
        return RunInterrupted(message, signum=signum, step=self.step, checkpoint=str(checkpoint) if checkpoint else None)


def resume_command(argv: list[str]) -> str:
    """The command that resumes this run: the same arguments with ``resume=auto``."""
    args = [a for a in argv[1:] if not a.startswith(("resume=", "+resume="))]
    return " ".join(["dapt train", *args, "resume=auto"])
