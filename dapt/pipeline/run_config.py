"""The typed view of a composed ``dapt train`` config: every group validated against its schema.

``validate`` runs before any data or model work, so a misspelt key or an impossible value is a one-line
error at start-up, not a traceback an hour into a run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf, open_dict

from dapt.config import renamed_hint, to_dataclass
from dapt.data.config import DataConfig
from dapt.data.sources import SourceConfig, as_source
from dapt.errors import ConfigError
from dapt.modeling.callbacks import CPU_THREADS  # dapt's own trainer key (not a Lightning argument): make_trainer drops it
from dapt.modeling.loading import ModelConfig
from dapt.modeling.optim import OptimizerConfig, SchedulerConfig
from dapt.modeling.remedies import RemedyConfig
from dapt.pipeline.base_prep import BasePrepConfig
from dapt.pipeline.preflight import check_writable
from dapt.pipeline.resume import CheckpointConfig
from dapt.pipeline.selection import SelectionConfig
from dapt.pipeline.vocabulary import VocabularyConfig
from dapt.precision import Precision, resolve_precision
from dapt.tracking.loggers import LoggerConfig


@dataclass
class RunConfig:
    """The validated, typed view of a composed train config."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    base_prep: BasePrepConfig
    logger: LoggerConfig
    remedy: RemedyConfig
    vocabulary: VocabularyConfig
    selection: SelectionConfig
    trainer: dict[str, Any]
    precision: Precision
    raw: DictConfig


def cpu_threads(value: Any) -> str | int:
    """``trainer.cpu_threads``: ``all`` (torch's thread count, fixed for the run), ``auto`` (the
    ``CpuThreadTuner`` picks the fastest count for the machine's current load and re-checks it) or
    ``N`` (fixed N). Why fixed is the default: the thread count sets how CPU reductions are split, so
    it changes the last bits of sums; under ``auto`` the same config and seed can train other bits when
    the load differs (such differences can grow through training and fine-tuning), while a fixed count
    trains the same bits on the same machine and software (experiments/throughput/README.md)."""
    if isinstance(value, bool) or not (value in ("all", "auto") or (isinstance(value, int) and value >= 1)):
        raise ConfigError(f"trainer.cpu_threads={value!r}: expected all, auto or a thread count >= 1")
    return value


_TOP_LEVEL = {
    "model", "data", "masking", "optimizer", "scheduler", "trainer", "logger", "paths", "base_prep", "control",
    "experiment_name", "seed", "tasks", "downstream", "optimized_metric", "save_model", "tags",
    "checkpoint", "resume", "hydra", "hparams_search", "experiment", "remedy", "vocabulary", "selection",
}


def validate(cfg: DictConfig) -> RunConfig:
    """Check every group against its schema; raise ``ConfigError`` naming the first bad key."""
    unknown = sorted(set(cfg.keys()) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown top-level config key '{unknown[0]}'{renamed_hint(unknown[0])}")
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True) or {}
    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "callbacks", "logger", "plugins"}
    trainer[CPU_THREADS] = cpu_threads(trainer.get(CPU_THREADS, "all"))
    for key in trainer:
        if key not in valid and key != CPU_THREADS:
            raise ConfigError(f"unknown config key 'trainer.{key}' (not a Lightning Trainer argument)")
    if not trainer.get("max_steps") or trainer["max_steps"] < 1:
        raise ConfigError("trainer.max_steps must be >= 1 (streamed corpora have no epoch length)")
    # `auto` becomes a concrete precision here, in the config too: cache keys, the saved run config,
    # resume identity and W&B all see what the run computes in, never "auto".
    precision = resolve_precision(trainer.get("precision"), trainer.get("accelerator"))
    trainer["precision"] = precision.value
    with open_dict(cfg):
        cfg.trainer.precision = precision.value
    run = RunConfig(
        model=to_dataclass(ModelConfig, cfg.model, prefix="model"),
        data=to_dataclass(DataConfig, cfg.data, prefix="data"),
        optimizer=to_dataclass(OptimizerConfig, cfg.optimizer, prefix="optimizer"),
        scheduler=to_dataclass(SchedulerConfig, cfg.scheduler, prefix="scheduler"),
        base_prep=to_dataclass(BasePrepConfig, cfg.base_prep, prefix="base_prep"),
        logger=to_dataclass(LoggerConfig, cfg.logger, prefix="logger"),
        remedy=to_dataclass(RemedyConfig, cfg.get("remedy") or {}, prefix="remedy"),
        vocabulary=to_dataclass(VocabularyConfig, cfg.get("vocabulary") or {}, prefix="vocabulary"),
        selection=to_dataclass(SelectionConfig, cfg.get("selection") or {}, prefix="selection"),
        trainer=trainer,
        precision=precision,
        raw=cfg,
    )
    for i, s in enumerate(run.data.train):
        as_source(s, f"data.train[{i}]")
    _check_remedies(run)
    if cfg.get("tasks"):  # a typo in a task name or a missing task file must not surface after DAPT
        from dapt.evaluation.downstream import check_downstream

        check_downstream(cfg)
    return run


def _check_remedies(run: RunConfig) -> None:
    """Combinations that would run but not do what they say."""
    strategy = str(run.trainer.get("strategy") or "")
    sharded = "fsdp" in strategy or "deepspeed" in strategy
    if sharded and (run.remedy.lora.enabled or run.remedy.l2sp.weight or run.remedy.ewc.weight):
        raise ConfigError(f"remedy.lora/l2sp/ewc are not supported with trainer.strategy={strategy}: they need whole, unsharded "
                          "parameters (use trainer=ddp or one device)")
    if run.vocabulary.name != "none" and (run.remedy.lora.enabled or run.remedy.freeze.embeddings):
        raise ConfigError("vocabulary=extend with remedy.lora or remedy.freeze.embeddings: the new tokens' embeddings would never "
                          "train and stay at their initialisation; drop one of them")


def run_dir_of(cfg: DictConfig) -> Path:
    out = OmegaConf.select(cfg, "paths.output_dir", default=None)
    if out is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            out = HydraConfig.get().runtime.output_dir
        except ValueError:
            out = "outputs/manual"
    path = Path(out)
    check_writable(path)  # created here; a read-only or impossible path is a one-line error
    return path


def checkpoint_config(cfg: DictConfig) -> CheckpointConfig:
    return to_dataclass(CheckpointConfig, cfg.get("checkpoint") or {}, prefix="checkpoint")


def general_sources(cfg: Any) -> list[SourceConfig]:
    """The general-text *training* corpus of a composed config: ``base_prep.data``, else ``data.replay``.

    One definition for every consumer (salient-term statistics, corpus diagnosis, the control arm),
    so their cache keys cannot drift apart. Held-out sets are never used: statistics or training on
    them would leak into the forgetting measurement.
    """
    base = cfg.get("base_prep") if hasattr(cfg, "get") else None
    data = cfg.get("data") if hasattr(cfg, "get") else None
    raw = list((base or {}).get("data") or []) or list((data or {}).get("replay") or [])
    sources = [as_source(s, "base_prep.data") for s in raw if s]
    if not sources:
        raise ConfigError("no general-text training source: set base_prep.data (or data.replay)")
    return sources
