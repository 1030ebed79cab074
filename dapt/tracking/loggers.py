"""Experiment loggers: W&B (offline unless an API key or config says otherwise) + a local CSV log.

Offline is a mode: without ``WANDB_API_KEY`` runs are written under the run directory and can be
uploaded later with ``wandb sync``. The CSV logger keeps a plain metrics history next to
``results.json`` so ``dapt compare`` works without W&B.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapt.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    """W&B settings. ``mode``: null = online when ``WANDB_API_KEY`` is set, else offline."""

    enabled: bool = True
    project: str = "dapt"
    entity: str | None = None
    mode: str | None = None
    group: str | None = None
    job_type: str = "dapt"
    tags: list[str] = field(default_factory=list)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"logger.wandb.mode={self.mode!r}: online, offline, disabled or null")


@dataclass
class CSVConfig:
    enabled: bool = True


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: CSVConfig = field(default_factory=CSVConfig)


def wandb_mode(cfg: WandbConfig) -> str:
    if cfg.mode:
        return cfg.mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun"):
        return "offline" if env == "dryrun" else env
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def build_loggers(cfg: LoggerConfig, run_dir: Path, *, run_name: str, group: str, tags: list[str], config: dict[str, Any],
                  run_id: str | None = None) -> list[Any]:
    """Lightning loggers for this run; W&B gets the full resolved config, group and tags.

    ``run_id``: the W&B run id (kept in the run directory, so a resumed run continues the same W&B
    run with ``resume="allow"`` instead of starting a second one)."""
    from pytorch_lightning.loggers import CSVLogger

    loggers: list[Any] = []
    if cfg.csv.enabled:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.wandb.enabled and wandb_mode(cfg.wandb) != "disabled":
        from dapt.launch.sweeps import current_job, override_tags

        os.environ.setdefault("WANDB_SILENT", "true")
        # A Hydra job adds its overrides as tags; a sweep job also tags its sweep and is named by
        # its number and overrides, so the runs of one sweep are told apart in the dashboard.
        job = current_job()
        job_tags = override_tags(job.overrides) if job else []
        if job and job.multirun:
            job_tags += override_tags([f"sweep:{job.sweep_name}"])
            run_name = f"{job.num}-{job.override_dirname}"[:128] if job.override_dirname else f"{job.sweep_name}/{job.num}"
            config = {**config, "hydra_job": {"num": job.num, "sweep_dir": job.sweep_dir, "overrides": job.overrides}}
        loggers.append(wandb_logger(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            name=cfg.wandb.name or run_name,
            group=cfg.wandb.group or group,
            job_type=cfg.wandb.job_type,
            tags=override_tags([*cfg.wandb.tags, *tags, *job_tags])[:64],
            save_dir=str(run_dir),
            mode=wandb_mode(cfg.wandb),
            config=config,
            reinit="finish_previous",
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        ))
    return loggers


def wandb_logger(*, mode: str, **kwargs: Any) -> Any:
    """A ``WandbLogger``; online mode starts the run now and falls back to offline if that fails.

    ``wandb.init`` runs lazily on the logger's first use, so without this a network or login failure
    would surface as a traceback after the model was loaded (or, with a long timeout, never). Offline
    runs keep everything and can be uploaded later with ``wandb sync``.
    """
    from pytorch_lightning.loggers import WandbLogger

    logger = WandbLogger(mode=mode, **kwargs)
    if mode != "online":
        return logger
    try:
        logger.experiment  # noqa: B018 - property access calls wandb.init
        return logger
    except Exception as exc:  # noqa: BLE001 - CommError, UsageError, timeouts: all mean "cannot reach W&B now"
        first = str(exc).splitlines()[0] if str(exc) else ""
        log.warning("W&B online failed (%s: %s); logging offline under %s (upload later with wandb sync)",
                    type(exc).__name__, first, kwargs.get("save_dir"))
        return WandbLogger(mode="offline", **kwargs)


def wandb_run_of(loggers: list[Any]) -> Any:
    from pytorch_lightning.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):
            return lg.experiment
    return None


def finish_wandb(exit_code: int | None = None) -> None:
    """End the active W&B run so the next multirun job starts its own (``exit_code=1``: failed)."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except Exception:  # noqa: BLE001 - logging must never fail a finished run
        pass
