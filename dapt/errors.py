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


class IncompleteRunError(DaptError):
    """A stage after training (model save, downstream evaluation) failed; results.json was still
    written with everything that finished plus an ``error`` block, and the message names it."""
