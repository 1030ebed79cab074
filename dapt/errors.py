"""User-facing errors.

Every problem a researcher can cause (bad path, bad config value, malformed data line) is raised as a
``DaptError`` whose message is one line naming the file/line/key. The CLI prints just that line instead
of a traceback, so the fix is obvious before any compute is spent.
"""

from __future__ import annotations


class DaptError(Exception):
    """Base class for errors caused by the user's input, printed as one line by the CLI."""


class ConfigError(DaptError):
    """A config key or value is invalid (unknown key, out-of-range value, conflicting options)."""


class DataError(DaptError):
    """Input data is missing, empty or malformed."""


class TrainingError(DaptError):
    """Training went wrong in a way the user must act on (e.g. a non-finite loss)."""


class RunInUseError(DaptError):
    """Another live process holds the run directory (``dapt.pipeline.run_lock.RunLock``): two
    processes continuing one run would overwrite each other's checkpoints and results."""


class RunInterrupted(DaptError):
    """The run was stopped by a signal (SIGTERM from a scheduler/``timeout``/``docker stop``, or SIGINT).

    ``exit_code`` is the shell convention 128 + signal number (143 for SIGTERM, 130 for SIGINT), so
    schedulers and sweep drivers see a failure, never the exit status 0 of a finished run.
    """

    def __init__(self, message: str, *, signum: int, step: int | None = None, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class IncompleteRunError(DaptError):
    """A stage after training (model save, downstream evaluation) failed; results.json was still
    written with everything that finished plus an ``error`` block, and the message names it."""
