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
import traceback
from typing import Any, Callable

from dapt.errors import DaptError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dapt.cli:train_main", "domain-adaptive pretraining run (Hydra: overrides, -m sweeps)"),
    "finetune": ("dapt.finetune:main", "fine-tune one downstream task on any checkpoint (Hydra)"),
    "compare": ("dapt.tracking.compare:main", "compare runs: table, CSV/Markdown, plots"),
    "masking-stats": ("dapt.masking.cli:main", "compute and cache PMI n-grams / salient domain terms"),
    "bench": ("experiments.throughput.bench:main", "throughput benchmark vs the HF Trainer recipe"),
}


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


def _is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra
        return False


def _objective(cfg: Any, metrics: dict[str, Any]) -> float | None:
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in metrics:
        raise DaptError(f"optimized_metric '{key}' is not among this run's metrics: {', '.join(sorted(metrics))}")
    return float(metrics[key])


def _train_task(cfg: Any) -> float | None:
    """The Hydra task: run ``train``; in a sweep a failed job is recorded, not fatal."""
    from dapt.io import atomic_write_json
    from dapt.train import run_dir_of, train
    from dapt.tracking.loggers import finish_wandb

    _quiet_libraries()
    try:
        metrics, _ = train(cfg)
        return _objective(cfg, metrics)
    except Exception as exc:
        finish_wandb()
        if not _is_multirun():
            if isinstance(exc, DaptError):  # the user's input: one line, no traceback
                print(f"error: {exc}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            raise
        run_dir = run_dir_of(cfg)
        atomic_write_json(run_dir / "failure.json", {"error": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()})
        logging.getLogger("dapt").error("job failed (recorded in %s): %s: %s", run_dir / "failure.json", type(exc).__name__, exc)
        return math.nan


def train_main() -> None:
    import hydra

    from dapt.config import config_dir, register_resolvers

    register_resolvers()
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)()


def _load(target: str) -> Callable[..., Any]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _usage() -> str:
    lines = ["usage: dapt <command> [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "e.g. dapt train model=tiny trainer.max_steps=20   |   dapt train --help"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
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
