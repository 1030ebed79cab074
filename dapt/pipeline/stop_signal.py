"""Stop cleanly on SIGTERM/SIGINT: at a step boundary, with a checkpoint, and a non-zero exit status.

Pre-empted and time-limited cluster jobs are the normal case for DAPT; Lightning's own SIGTERM
handling exits 0, which a scheduler reads as success. See ``dapt.pipeline.resume`` for how the run
continues afterwards.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from dapt.errors import RunInterrupted

log = logging.getLogger(__name__)

SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


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
        if first:  # no training step to finish (preparation, control arm, evaluation): stop now, said all the same
            log.warning("received %s: stopping now (no training step to finish)", name)
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
