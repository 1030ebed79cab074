"""Optimizer and LR schedule from config: AdamW without decay on biases/norms, warmup + decay."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.strategies import FSDPStrategy

from dapt.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


@dataclass
class OptimizerConfig:
    """AdamW settings. ``implementation``: ``auto``, ``fused``, ``foreach``, ``for_loop``.

    ``auto`` picks the fused kernel on CPU and CUDA: one pass over each parameter instead of one
    kernel per operation over all of them (HF Trainer's default too; the "AdamW foreach instead of
    fused" lever of ``make bench`` measures the difference, per machine in
    experiments/throughput/README.md). It picks foreach on other
    devices, where fused AdamW may be missing, and under fp16 loss scaling with gradient clipping
    (a fused AdamW unscales inside ``step``, after the point where clipping must see unscaled
    gradients).
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
    """Warmup then decay. ``warmup_steps`` wins over ``warmup_ratio`` when both are set.

    ``min_lr_ratio`` (cosine only): decay to ``min_lr_ratio * lr`` instead of 0. Continued
    pretraining that re-warms and re-decays to a floor of 0.1x the peak is the recipe Ibrahim et al.
    (2024) found to match re-training from scratch (``remedy=rewarm``).
    """

    name: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.06
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ConfigError(f"scheduler.name={self.name!r}: choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"scheduler.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"scheduler.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_lr_ratio < 1:
            raise ConfigError(f"scheduler.min_lr_ratio={self.min_lr_ratio} must be in [0, 1)")
        if self.min_lr_ratio and self.name != "cosine":
            raise ConfigError(f"scheduler.min_lr_ratio={self.min_lr_ratio} needs scheduler.name=cosine (got {self.name})")


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and normalisation scales: every 1-D parameter, plus anything named like a norm."""
    lowered = name.lower()
    return param.ndim < 2 or name.endswith("bias") or "layernorm" in lowered or "layer_norm" in lowered or ".norm" in lowered


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, *, lr: float | None = None,
                 lr_scales: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """Decayed weights and biases/LayerNorm params that are not decayed (BERT recipe); with
    ``lr_scales`` (layer-wise decay: parameter name -> multiplier of ``lr``) one such pair per rate."""
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, param in named_params:
        if not param.requires_grad or id(param) in seen:  # tied weights appear twice
            continue
        seen.add(id(param))
        scale = 1.0 if lr_scales is None else float(lr_scales[name])
        groups.setdefault((scale, _no_decay(name, param)), []).append(param)
    out = []
    for (scale, no_decay), params in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1])):
        group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if lr_scales is not None:
            if lr is None:
                raise ConfigError("param_groups: lr_scales needs the base lr")
            group["lr"] = lr * scale
        out.append(group)
    return out


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, *, scaled_clipping: bool = False,
                    lr_scales: Mapping[str, float] | None = None) -> torch.optim.Optimizer:
    """AdamW over ``param_groups``. ``scaled_clipping``: gradients are clipped while a GradScaler
    scales them (fp16 mixed precision), which a fused AdamW cannot take part in. ``lr_scales``:
    per-parameter multipliers of ``cfg.lr`` (layer-wise learning-rate decay)."""
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    impl = cfg.implementation
    if impl == "auto":
        fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
        impl = "fused" if fusable and not scaled_clipping else "foreach"
    elif impl == "fused" and scaled_clipping:
        raise ConfigError(
            "optimizer.implementation=fused cannot clip gradients under fp16 loss scaling (trainer.precision=16-mixed): "
            "use optimizer.implementation=auto or foreach, trainer.precision=bf16-mixed, or trainer.gradient_clip_val=null"
        )
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    groups = param_groups(model.named_parameters(), cfg.weight_decay, lr=cfg.lr, lr_scales=lr_scales)
    if not groups:
        raise ConfigError("no trainable parameters (check base_prep.trainable / freezing)")
    return torch.optim.AdamW(groups, **kwargs)


def _grad_scaler(module: pl.LightningModule) -> Any:
    plugin = module.trainer.precision_plugin
    return getattr(plugin, "scaler", None) if isinstance(plugin, MixedPrecision) else None


def clips_scaled_gradients(module: pl.LightningModule) -> bool:
    """True when the module's trainer clips gradients that a GradScaler has scaled (fp16 mixed)."""
    return bool(module.trainer.gradient_clip_val) and _grad_scaler(module) is not None


def clip_gradients(module: pl.LightningModule, optimizer: torch.optim.Optimizer, clip_val: float | None,
                   algorithm: str | None) -> None:
    """Lightning's gradient clipping, minus a refusal that only applies to scaled gradients.

    Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales inside
    ``step`` (fused AdamW), also under bf16-mixed, where there is no GradScaler and the gradients
    are already the true ones; that refusal made ``trainer=gpu`` (bf16 + fused AdamW + clipping)
    fail at the first step. Here bf16 clips directly. Under FSDP the norm must be taken over all
    shards, which only the root wrapper's ``clip_grad_norm_`` does (Lightning refuses norm clipping
    there). Everything else goes through Lightning.
    """
    if clip_val and algorithm in (None, "norm") and isinstance(module.trainer.strategy, FSDPStrategy):
        module.trainer.model.clip_grad_norm_(clip_val)
        return
    if (clip_val and isinstance(module.trainer.precision_plugin, MixedPrecision) and _grad_scaler(module) is None
            and getattr(optimizer, "_step_supports_amp_scaling", False)):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    if cfg.min_lr_ratio:
        return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1),
                             scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_ratio})
    return get_scheduler(cfg.name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
