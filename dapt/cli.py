"""The ``dapt`` command: ``dapt <subcommand> [args]``.

``train`` and ``finetune`` are Hydra applications (overrides, ``-m`` sweeps, ``--help``); the
other subcommands are plain argparse tools. Errors caused by the user's input are printed as one line
(``error: ...``) with exit status 2 instead of a traceback.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from typing import Any, Callable

from dapt.errors import DaptError, RunInterrupted

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dapt.cli:train_main", "domain-adaptive pretraining run (Hydra: overrides, -m sweeps)"),
    "finetune": ("dapt.finetune:main", "fine-tune one downstream task on any checkpoint (Hydra)"),
    "doctor": ("dapt.diagnostics.cli:main", "diagnose corpus size, noise, vocabulary overlap and fragmentation"),
    "compare": ("dapt.tracking.compare:main", "compare runs: table, CSV/Markdown, plots"),
    "masking-stats": ("dapt.masking.cli:main", "compute and cache PMI n-grams / salient domain terms"),
    "bench": ("experiments.throughput.bench:main", "throughput benchmark vs the HF Trainer recipe"),
}


# Process environment the CLI starts with; a value the user exported wins. glibc's allocator by
# default hands every freed block above 128 KB-32 MB back to the kernel and re-faults it in zeroed
# on the next step (~1.2M page faults per 50 MLM-sized steps measured here); with these thresholds
# freed tensors stay in the heap and are reused (RSS stays at its high-water mark instead).
# `make bench` measured the training step 1.07x faster (median of 6 paired runs, 1.00-1.25x).
# glibc reads GLIBC_TUNABLES only when a process starts, hence the one-time re-exec below.
RUNTIME_ENV: dict[str, str] = {
    "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296",
}


def _restart_with_runtime_env(argv: list[str]) -> None:
    """Re-exec ``python -m dapt.cli <argv>`` once with ``RUNTIME_ENV`` set (glibc Linux only).

    Skipped when every variable is already set (also by the user), when torch is already loaded
    (dapt.cli imported by another program), off glibc, or with ``DAPT_NO_REEXEC=1``.
    """
    if os.environ.get("DAPT_NO_REEXEC") == "1" or "torch" in sys.modules:
        return
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return
    except (AttributeError, ValueError, OSError):
        return
    missing = {k: v for k, v in RUNTIME_ENV.items() if k not in os.environ}
    if not missing:
        return
    os.environ.update(missing)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-m", "dapt.cli", *argv])
    except OSError:  # cannot restart: run on with the default allocator settings
        for key in missing:
            os.environ.pop(key, None)


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
    from dapt.train import run_dir_of, train
    from dapt.tracking.ddp import secondary_rank_process
    from dapt.tracking.loggers import finish_wandb
    from dapt.tracking.sweeps import current_job, record_failure, sweeper_tracks_failures

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
    from dapt.train import run_dir_of

    try:
        run_dir = run_dir_of(cfg)
    except Exception:  # noqa: BLE001 - an unusable output dir: record where we can
        run_dir = None
    return list(dict.fromkeys(f for f in (run_dir, job_dir) if f is not None))


def train_main() -> None:
    import hydra

    from dapt.config import config_dir, register_resolvers

    register_resolvers()
    from dapt.tracking.sweeps import check_overrides

    check_overrides(sys.argv[1:], config_dir())  # unknown option/key: one line listing the valid ones
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)()
    from dapt.tracking.sweeps import SWEEP_FAILURES

    if SWEEP_FAILURES:  # the sweep ran all its jobs; it must not report success when some failed
        print(f"error: {len(SWEEP_FAILURES)} sweep job(s) failed:", file=sys.stderr)
        for line in SWEEP_FAILURES:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1)


def _load(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    if module.startswith("experiments."):
        # experiments/ is not installed (it is the repo's research record, not a library): with an
        # editable install, import it from the checkout, whatever the current directory.
        from dapt.config import REPO_ROOT

        if not (REPO_ROOT / "experiments").is_dir():
            raise DaptError(f"'{module}' lives in the dapt repository's experiments/ folder; run it from a clone "
                            "installed with pip install -e . (make setup)")
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: dapt <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "e.g. dapt train model=tiny trainer.max_steps=20   |   dapt train --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _restart_with_runtime_env(sys.argv[1:])
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"error: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = SUBCOMMANDS[command]
    sys.argv = [f"dapt {command}", *rest]
    try:
        func = _load(target)
        result = func() if target.endswith(("train_main", "finetune:main")) else func(rest)
    except DaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
