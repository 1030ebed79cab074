"""``dapt train``: the Hydra application around ``dapt.pipeline.run.train``.

Overrides, ``-m`` sweeps and ``--help`` are Hydra's; here a sweep job's failure is recorded instead of
ending the sweep, a user error is one line with exit status 2, and a signal ends the process with
128 + its number after recording where to resume.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from dapt.errors import DaptError, RunInterrupted


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _objective(cfg: Any, metrics: dict[str, Any], *, strict: bool = False) -> float | None:
    """The value of ``optimized_metric`` for sweepers (``None`` on DDP ranks other than 0).

    ``strict`` (optimising sweepers such as Optuna): a NaN/inf objective raises, so the trial is
    recorded as failed instead of poisoning the study (optuna 2.x aborts the sweep on NaN).
    """
    key = cfg.get("optimized_metric")
    if not key or not metrics:
        return None
    if key not in metrics:
        raise DaptError(f"optimized_metric '{key}' is not among this run's metrics: {', '.join(sorted(metrics))}")
    value = float(metrics[key])
    if strict and not math.isfinite(value):
        from dapt.errors import TrainingError

        raise TrainingError(f"optimized_metric '{key}' is {value}")
    return value


def _train_task(cfg: Any) -> float | None:
    """The Hydra task: run ``train``; in a sweep a failed job is recorded, not fatal.

    A failed sweep job writes ``failure.json`` into its folder and marks its W&B run failed; the basic
    sweeper then gets NaN and goes on, an optimising sweeper (Optuna) gets the exception and records
    the trial as failed (``hparams_search`` configs set ``max_failure_rate`` so the study goes on).
    DDP ranks of script-launched strategies are started by ``train`` so they share the run's folder.
    Only global rank 0 records failures (the ranks share the folder).
    """
    from dapt.launch.ddp import secondary_rank_process
    from dapt.launch.sweeps import current_job, record_failure, sweeper_tracks_failures
    from dapt.pipeline.run import train
    from dapt.pipeline.run_config import run_dir_of
    from dapt.tracking.loggers import finish_wandb

    _quiet_libraries()
    job = current_job()
    strict = sweeper_tracks_failures(job)
    job_dir = None
    try:
        job_dir = run_dir_of(cfg)  # resume=auto may move the run to an earlier folder: failures are recorded in both
        # DDP ranks of script-launched strategies are started inside train(), once rank 0 has resolved the run
        metrics, _ = train(cfg, rank_overrides=job.overrides if job else [], rank_cwd=job.cwd if job else None)
        return _objective(cfg, metrics, strict=strict)
    except RunInterrupted as exc:
        # Pre-empted (SIGTERM) or stopped (SIGINT): record it, say how to resume, and end the whole
        # process with 128 + signal, in a sweep too (the remaining jobs were pre-empted with it).
        # SystemExit, not an exception: Hydra would print a traceback and exit 1.
        finish_wandb(exit_code=1)
        for folder in ([] if secondary_rank_process() else _failure_folders(cfg, job_dir)):
            record_failure(folder, exc, job, extra={"signal": exc.signum, "step": exc.step, "checkpoint": exc.checkpoint})
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:
        finish_wandb(exit_code=1)
        if job is not None and not job.multirun and isinstance(exc, DaptError):
            # Hydra would print a traceback and exit 1; a user error is one line and exit status 2.
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        if not (job and job.multirun):
            raise
        paths = [record_failure(folder, exc, job) for folder in ([] if secondary_rank_process() else _failure_folders(cfg, job_dir))]
        path = paths[0] if paths else "nowhere: the output folder is unusable"
        logging.getLogger("dapt").error("job %s failed (recorded in %s): %s: %s", job.num, path, type(exc).__name__, exc)
        if strict:
            raise
        return math.nan


def _failure_folders(cfg: Any, job_dir: Any) -> list[Any]:
    """Where a failure is recorded: the run's folder and, when ``resume=auto`` continued an earlier
    run elsewhere, also this job's own folder (so that its sweep sees the failure)."""
    from dapt.pipeline.run_config import run_dir_of

    try:
        run_dir = run_dir_of(cfg)
    except Exception:  # noqa: BLE001 - an unusable output dir: record where we can
        run_dir = None
    return list(dict.fromkeys(f for f in (run_dir, job_dir) if f is not None))


def main() -> None:
    """``dapt train``: compose, check overrides in one line, run (or sweep) ``train``."""
    import hydra

    from dapt.config import config_dir, register_resolvers

    register_resolvers()
    from dapt.launch.sweeps import check_overrides

    check_overrides(sys.argv[1:], config_dir())  # unknown option/key: one line listing the valid ones
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)()
    from dapt.launch.sweeps import SWEEP_FAILURES

    if SWEEP_FAILURES:  # the sweep ran all its jobs; it must not report success when some failed
        print(f"error: {len(SWEEP_FAILURES)} sweep job(s) failed:", file=sys.stderr)
        for line in SWEEP_FAILURES:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1)
