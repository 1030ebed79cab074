"""General-MLM base preparation: give a head-less encoder a working MLM head before DAPT.

Sentence-embedding checkpoints such as all-MiniLM-L6-v2 ship no MLM head. Measuring "before
adaptation" on a freshly initialised head is meaningless (perplexity in the thousands), and DAPT from
there mostly re-learns MLM, which hides forgetting. So dapt first trains MLM on *general* text (the
raw Wikipedia in the shared data), caches the result on disk keyed by a hash of everything that
determines it, and every later run or sweep job starts from that cached base. Models that ship an
MLM head (bert-base, roberta-base) skip this under ``base_prep.mode=auto``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dapt.errors import ConfigError
from dapt.io import atomic_save_dir, atomic_write_json

log = logging.getLogger(__name__)

# Bump when the base recipe's code changes (tests/test_cache_versions.py pins the code's fingerprint
# next to this number). 2: dropout on during training, source mixing, content-hashed weights.
BASE_PREP_VERSION = 2
MARKER = "dapt_base.json"


@dataclass
class BasePrepConfig:
    """The ``base_prep`` config group: how the general-MLM base is prepared.

    Attributes:
        mode: ``auto`` (prepare only when the checkpoint has no MLM head), ``always``, ``never``.
        trainable: ``all`` parameters, only the MLM ``head``, or the head plus the ``top_k`` layers.
        top_k: layers unfrozen when ``trainable=top_k``.
        steps / lr / batch_size / max_seq_length / warmup_ratio / rate: the MLM recipe on general text.
        data: general-text sources (see ``SourceConfig``).
        seed: the base's own seed, separate from the run's ``seed``, so a study that varies the DAPT
            seed starts every run from the same (cached) base instead of re-preparing it.
        cache: reuse a base with the same hash; false retrains every time.
    """

    mode: str = "auto"
    trainable: str = "all"
    top_k: int = 2
    steps: int = 400
    lr: float = 3e-4
    batch_size: int = 16
    max_seq_length: int = 128
    warmup_ratio: float = 0.06
    rate: float = 0.15
    data: list[Any] = field(default_factory=list)
    seed: int = 42
    cache: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "always", "never"):
            raise ConfigError(f"base_prep.mode={self.mode!r}: choose auto, always or never")
        if self.trainable not in ("all", "head", "top_k"):
            raise ConfigError(f"base_prep.trainable={self.trainable!r}: choose all, head or top_k")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("base_prep.steps and base_prep.batch_size must be >= 1")
        if not 0 < self.rate < 1:
            raise ConfigError(f"base_prep.rate={self.rate} must be in (0, 1)")


@dataclass
class BaseInfo:
    """Where the starting point of DAPT came from (recorded in results.json)."""

    source: str
    path: str
    steps: int
    cache_key: str | None
    cached: bool
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def needs_preparation(cfg: BasePrepConfig, has_pretrained_head: bool) -> bool:
    return cfg.mode == "always" or (cfg.mode == "auto" and not has_pretrained_head)


def model_fingerprint(model_cfg: Any, model_path: str) -> dict[str, Any]:
    """What identifies the starting checkpoint: its source, overrides and the *content* of its files."""
    from dapt.versioning import directory_digest

    fp: dict[str, Any] = {
        "source": model_cfg.source,
        "random_init": bool(model_cfg.random_init),
        "config_overrides": dict(model_cfg.config_overrides or {}),
    }
    if (Path(model_path) / "config.json").exists():
        fp["files_sha256"] = directory_digest(model_path)
    return fp


def recipe_fingerprint() -> str:
    """The code that trains a base; pinned with ``BASE_PREP_VERSION`` by a test."""
    from dapt import labels
    from dapt.data import config, datamodule, mixing, packing, quality, sources, stream
    from dapt.masking import base as masking_base
    from dapt.masking import random as random_masking
    from dapt.masking import selection as masking_selection
    from dapt.masking import units as masking_units
    from dapt.modeling import loading, mlm_module, optim, sparse_head
    from dapt.versioning import source_fingerprint

    return source_fingerprint(_train_base, freeze_for, base_data_config, mlm_module, loading, sparse_head, optim, quality,
                              config, datamodule, stream, mixing, packing, sources, masking_base, masking_selection, masking_units, random_masking, labels)


# Trainer settings that change how a base is trained (and so what it is); the rest only change logging.
BASE_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision", "gradient_clip_val")


def base_cache_key(model_cfg: Any, model_path: str, base_cfg: BasePrepConfig, data_fingerprint: Any, tokenizer_len: int,
              trainer_kwargs: dict[str, Any] | None = None) -> str:
    from dapt.versioning import library_versions

    payload = {
        "trainer": {k: str(v) for k, v in (trainer_kwargs or {}).items() if k in BASE_TRAINER_KEYS},
        "version": BASE_PREP_VERSION,
        "model": model_fingerprint(model_cfg, model_path),
        "base": {k: v for k, v in asdict(base_cfg).items() if k not in ("cache", "mode", "data")},
        "data": data_fingerprint,
        "vocab": tokenizer_len,
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def base_data_config(cfg: BasePrepConfig, sources: list[Any]) -> Any:
    """The data config of the base's general-text stream (the control arm continues this stream)."""
    from dapt.data.config import DataConfig

    return DataConfig(name="general", train=sources, max_seq_length=cfg.max_seq_length, batch_size=cfg.batch_size)


@dataclass
class BaseStream:
    """Where the base's training stream stopped: the control arm starts there, on unseen text."""

    data: Any  # DataConfig of the base's stream
    seed: int
    blocks: int  # blocks consumed (steps x batch size, one process)


def base_stream(cfg: BasePrepConfig) -> BaseStream:
    from dapt.data.sources import as_source

    sources = [as_source(s, f"base_prep.data[{i}]") for i, s in enumerate(cfg.data)]
    return BaseStream(data=base_data_config(cfg, sources), seed=cfg.seed, blocks=cfg.steps * cfg.batch_size)


def freeze_for(model: torch.nn.Module, trainable: str, top_k: int) -> None:
    """Leave only the requested parameter set trainable (the MLM head is always trainable)."""
    if trainable == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    for p in model.parameters():
        p.requires_grad_(False)
    base = model.base_model
    head_params = {id(p) for p in base.parameters()}
    for p in model.parameters():
        if id(p) not in head_params:
            p.requires_grad_(True)  # the head (its decoder is tied to embeddings, which stay frozen)
    if trainable == "top_k":
        encoder = getattr(base, "encoder", None) or getattr(base, "transformer", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise ConfigError(f"base_prep.trainable=top_k: cannot find the layer list of {type(base).__name__}")
        for layer in list(layers)[-top_k:]:
            for p in layer.parameters():
                p.requires_grad_(True)


def prepare_base(
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    model_cfg: Any,
    model_path: str,
    base_cfg: BasePrepConfig,
    data_dir: str | None,
    cache_dir: str,
    trainer_kwargs: dict[str, Any] | None = None,
) -> BaseInfo:
    """Return the cached base for this (model, recipe, data), training and caching it if needed.

    Concurrent single-process sweep jobs wait on a file lock, so the base is built once per machine;
    under DDP every rank trains it together and global rank 0 saves it (``cache_build_lock``).
    """
    from dapt.cached_weights import DIGEST_KEY, intact_marker, weights_digest
    from dapt.data.sources import as_source, describe
    from dapt.io import cache_build_lock

    sources = [as_source(s, f"base_prep.data[{i}]") for i, s in enumerate(base_cfg.data)]
    if not sources:
        raise ConfigError("base_prep.data lists no general-text source for base preparation")
    key = base_cache_key(model_cfg, model_path, base_cfg, describe(sources, data_dir), len(tokenizer), trainer_kwargs)
    target = Path(cache_dir) / "bases" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_build_lock(target):
        info = intact_marker(target, MARKER, "general-MLM base") if base_cfg.cache else None
        if info is not None:
            log.info("using cached general-MLM base %s", target)
            return BaseInfo(source=info["source"], path=str(target), steps=info["steps"], cache_key=key, cached=True, seconds=info.get("seconds", 0.0))
        log.info("preparing general-MLM base (%d steps, trainable=%s); cached at %s", base_cfg.steps, base_cfg.trainable, target)
        t0 = time.time()
        is_global_zero = _train_base(model, tokenizer, sources, base_cfg, data_dir, trainer_kwargs or {})
        seconds = time.time() - t0
        for p in model.parameters():
            p.requires_grad_(True)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MARKER, {"source": model_cfg.source, "steps": base_cfg.steps, "seconds": seconds, "cache_key": key,
                                             "recipe": asdict(base_cfg), DIGEST_KEY: weights_digest(tmp)})

        if is_global_zero:
            atomic_save_dir(target, write)
    return BaseInfo(source=model_cfg.source, path=str(target), steps=base_cfg.steps, cache_key=key, cached=False, seconds=seconds)


def _train_base(model: torch.nn.Module, tokenizer: Any, sources: list[Any], cfg: BasePrepConfig, data_dir: str | None, trainer_kwargs: dict[str, Any]) -> bool:
    """Train the base in place; returns whether this process is global rank 0 (the one that saves)."""
    import pytorch_lightning as pl

    from dapt.data.datamodule import PackedCorpusDataModule
    from dapt.masking import build_masker
    from dapt.modeling.callbacks import CPU_THREADS
    from dapt.modeling.mlm_module import MLMModule
    from dapt.modeling.optim import OptimizerConfig, SchedulerConfig
    from dapt.progress import StepProgressBar

    freeze_for(model, cfg.trainable, cfg.top_k)
    masker = build_masker({"name": "random", "rate": cfg.rate}, tokenizer)
    dm = PackedCorpusDataModule(base_data_config(cfg, sources), tokenizer, masker, data_dir=data_dir, seed=cfg.seed)
    dm.check_inputs()
    module = MLMModule(
        model,
        optimizer=OptimizerConfig(lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01),
        scheduler=SchedulerConfig(name="linear", warmup_ratio=cfg.warmup_ratio),
        total_steps=cfg.steps,
        eval_names=(),
        tune_cpu_threads=trainer_kwargs.get(CPU_THREADS) == "auto",
    )
    kwargs = {k: v for k, v in trainer_kwargs.items() if k in BASE_TRAINER_KEYS}
    trainer = pl.Trainer(
        max_steps=cfg.steps,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[StepProgressBar(description="base prep")],
        enable_model_summary=False,
        **kwargs,
    )
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer.fit(module, datamodule=dm)
    return trainer.is_global_zero
