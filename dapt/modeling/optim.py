"""Optimizer and LR schedule from config: AdamW without decay on biases/norms, warmup + decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from dapt.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class OptimizerConfig:
    """AdamW settings. ``implementation``: ``auto``, ``fused``, ``foreach``, ``for_loop``.

    ``auto`` picks the fused kernel on CPU and CUDA (one pass over each parameter: ``make bench``
    measured the whole MiniLM-L6 training step 1.41× faster fused than foreach on 2 CPU cores) and
    foreach on other devices, where fused AdamW may be missing.
    """

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    implementation: str = "auto"

    def __post_init__(self) -> None:
        if self.name != "adamw":
            raise ConfigError(f"optimizer.name={self.name!r}: only adamw is implemented")
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr={self.lr} must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        if self.implementation not in ("auto", "fused", "foreach", "for_loop"):
            raise ConfigError(f"optimizer.implementation={self.implementation!r}: auto, fused, foreach or for_loop")


@dataclass
class SchedulerConfig:
    """Warmup then decay. ``warmup_steps`` wins over ``warmup_ratio`` when both are set."""

    name: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.06

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"scheduler.name={self.name!r}: choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"scheduler.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps={self.warmup_steps} must be >= 0")


def _no_decay(name: str) -> bool:
    lowered = name.lower()
    return name.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered or ".norm" in lowered


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: decayed weights, and biases/LayerNorm params that are not decayed (BERT recipe)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in named_params:
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        (no_decay if _no_decay(name) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    impl = cfg.implementation
    if impl == "auto":
        fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
        impl = "fused" if fusable else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    groups = param_groups(model.named_parameters(), cfg.weight_decay)
    if not groups:
        raise ConfigError("no trainable parameters (check base.trainable / freezing)")
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    return get_scheduler(cfg.name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
