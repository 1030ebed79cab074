"""Remedies for forgetting during domain-adaptive pretraining, as switchable parts of one MLM fit.

Each remedy changes *how* DAPT updates the weights, never the data or the start:

- **L2-SP** (Li et al. 2018): ``weight/2 * ||θ - θ₀||²`` pulls every trainable weight toward its
  value at the start of DAPT (the base), instead of toward zero as weight decay does.
- **EWC** (Kirkpatrick et al. 2017): the same pull, weighted per weight by a diagonal Fisher
  estimated on *general* text at θ₀, so the weights general MLM depends on move least.
- **Layer-wise learning-rate decay** (ULMFiT, ELECTRA): lower layers, which hold the most general
  features, get geometrically smaller learning rates.
- **Freezing** the embeddings and/or the lowest k encoder layers.
- **LoRA** (Hu et al. 2021) through ``peft``: only low-rank adapters train; they are merged into the
  weights before the model is saved, so downstream fine-tuning and ``from_pretrained`` see a plain
  checkpoint.

General-text replay lives in the data mixer (``data.replay_fraction``) and learning-rate re-warming
in the scheduler (``scheduler.min_lr_ratio``); the pipeline combines all of them
(``dapt.pipeline.remedies``). None of the weight-side remedies here applies to the control arm, which
stays "plain MLM on general text with the same optimizer and schedule", so one cached control serves a
sweep over them (replay leaves the control unchanged too; a re-warmed schedule is shared with it).

The L2-SP/EWC gradient passes through AdamW's normalisation like the MLM loss's (a coupled penalty,
as in the papers' SGD/Adam setups), and AdamW's decoupled weight decay toward zero stays on beside it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from dapt.errors import ConfigError

log = logging.getLogger(__name__)

# Encoder blocks of BERT/RoBERTa/ELECTRA (``encoder.layer.3.``) and DistilBERT (``transformer.layer.3.``).
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers)\.(\d+)\.")


@dataclass
class L2SPConfig:
    """``weight``: α of ``α/2 · ||θ - θ₀||²`` summed over trainable weights (0 = off)."""

    weight: float = 0.0


@dataclass
class EWCConfig:
    """``weight``: λ of ``λ/2 · Σ F·(θ - θ₀)²`` (0 = off). ``F`` is the diagonal Fisher scaled to mean 1
    over all weights, so λ reads on the same scale as L2-SP's α. ``batches``: general-text batches
    (of ``data.batch_size`` blocks) the Fisher is estimated from, once per start model and cached."""

    weight: float = 0.0
    batches: int = 32


@dataclass
class LLRDConfig:
    """``decay``: the learning rate of encoder layer ``i`` of ``L`` is ``lr · decay^(L - i)``, of the
    embeddings ``lr · decay^(L + 1)``; the MLM head keeps ``lr`` (1.0 = off). The decoder weight is
    tied to the word embeddings in BERT-style models and so takes the embeddings' rate."""

    decay: float = 1.0


@dataclass
class FreezeConfig:
    """``embeddings``: freeze the embedding layer (with BERT's tied decoder, the output projection's
    weight too: it is the same tensor). ``layers``: freeze the lowest k encoder layers."""

    embeddings: bool = False
    layers: int = 0


@dataclass
class LoRAConfig:
    """Low-rank adapters (``peft``) on the modules named in ``target_modules``; everything else frozen."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])


@dataclass
class RemedyConfig:
    """The ``remedy`` config group; options combine (``remedy=[l2sp,llrd]``), see conf/remedy/."""

    l2sp: L2SPConfig = field(default_factory=L2SPConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    llrd: LLRDConfig = field(default_factory=LLRDConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        for key, cfg in (("l2sp", self.l2sp), ("ewc", self.ewc), ("llrd", self.llrd), ("freeze", self.freeze), ("lora", self.lora)):
            if isinstance(cfg, Mapping):  # built from a plain dict (tests, to_dataclass of a nested node)
                setattr(self, key, {"l2sp": L2SPConfig, "ewc": EWCConfig, "llrd": LLRDConfig, "freeze": FreezeConfig,
                                    "lora": LoRAConfig}[key](**cfg))
        if self.l2sp.weight < 0 or self.ewc.weight < 0:
            raise ConfigError(f"remedy.{'l2sp' if self.l2sp.weight < 0 else 'ewc'}.weight must be >= 0")
        if self.ewc.batches < 1:
            raise ConfigError(f"remedy.ewc.batches={self.ewc.batches} must be >= 1")
        if not 0 < self.llrd.decay <= 1:
            raise ConfigError(f"remedy.llrd.decay={self.llrd.decay} must be in (0, 1]")
        if self.freeze.layers < 0:
            raise ConfigError(f"remedy.freeze.layers={self.freeze.layers} must be >= 0")
        if self.lora.enabled:
            if self.lora.r < 1 or self.lora.alpha <= 0 or not 0 <= self.lora.dropout < 1:
                raise ConfigError("remedy.lora: r >= 1, alpha > 0 and dropout in [0, 1) are required")
            if not self.lora.target_modules:
                raise ConfigError("remedy.lora.target_modules is empty")
            if self.l2sp.weight or self.ewc.weight or self.freeze.embeddings or self.freeze.layers:
                raise ConfigError("remedy.lora trains adapters only: remedy.l2sp/ewc/freeze have no frozen-weight effect to add; switch them off")

    def active(self) -> list[str]:
        """Names of the remedies switched on, in a fixed order (results.json, run labels)."""
        on = {"l2sp": self.l2sp.weight > 0, "ewc": self.ewc.weight > 0, "llrd": self.llrd.decay < 1,
              "freeze": self.freeze.embeddings or self.freeze.layers > 0, "lora": self.lora.enabled}
        return [name for name, flag in on.items() if flag]


def num_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot find the number of encoder layers of {type(model).__name__} (config.num_hidden_layers)")


def depth_of(name: str, n_layers: int) -> int:
    """How far below the MLM head a parameter sits: 0 for the head (and anything outside the encoder),
    ``L - i`` for encoder layer ``i``, ``L + 1`` for the embeddings (ELECTRA's layer-decay depths)."""
    match = _LAYER.search(name)
    if match:
        return n_layers - int(match.group(1))
    if "embeddings." in name or name.startswith("embeddings"):
        return n_layers + 1
    return 0


def llrd_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multiplier of each named parameter under layer-wise decay ``decay``."""
    n = num_layers(model)
    return {name: decay ** depth_of(name, n) for name, _ in model.named_parameters()}


def freeze(model: torch.nn.Module, cfg: FreezeConfig) -> list[str]:
    """Switch off gradients for the embeddings and/or the lowest ``cfg.layers`` encoder layers; returns
    the frozen parameter names. Frozen weights get no gradient, so AdamW (which skips parameters without
    one) and weight decay leave them bit-identical."""
    n = num_layers(model)
    if cfg.layers > n:
        raise ConfigError(f"remedy.freeze.layers={cfg.layers}: the model has {n} encoder layers")
    frozen = []
    for name, param in model.named_parameters():
        depth = depth_of(name, n)
        if (cfg.embeddings and depth == n + 1) or (0 < depth <= n and n - depth < cfg.layers):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


class AnchorPenalty(torch.nn.Module):
    """``Σ_i ½ (α + λ·F_i) · (θ_i - θ₀_i)²`` over the trainable weights that existed at the start.

    ``θ₀`` is copied when the penalty is built, i.e. from the start model, before any DAPT step and
    before a resumed run loads its checkpoint into the model, so a resumed run keeps pulling toward
    the base and not toward its checkpoint. The anchors and Fisher are non-persistent buffers: they move
    with the module to its device but stay out of checkpoints (they are rebuilt from the start model).
    """

    def __init__(self, model: torch.nn.Module, *, l2sp: float = 0.0, ewc: float = 0.0, fisher: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        if ewc and fisher is None:
            raise ConfigError("remedy.ewc.weight > 0 needs a Fisher estimate")
        self.l2sp, self.ewc = float(l2sp), float(ewc)
        self.names: list[str] = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            key = self._buffer(name)
            self.register_buffer(f"anchor_{key}", param.detach().float().clone(), persistent=False)
            if self.ewc:
                if name not in fisher:  # type: ignore[operator]
                    raise ConfigError(f"EWC: the Fisher estimate has no entry for parameter {name}")
                self.register_buffer(f"fisher_{key}", fisher[name].detach().float().clone(), persistent=False)  # type: ignore[index]
            self.names.append(name)

    @staticmethod
    def _buffer(name: str) -> str:
        return name.replace(".", "__")

    def forward(self, model: torch.nn.Module) -> torch.Tensor:
        params = dict(model.named_parameters())
        total = torch.zeros((), device=next(iter(params.values())).device)
        for name in self.names:
            delta = params[name].float() - getattr(self, f"anchor_{self._buffer(name)}")
            sq = delta * delta
            if self.l2sp:
                total = total + 0.5 * self.l2sp * sq.sum()
            if self.ewc:
                total = total + 0.5 * self.ewc * (getattr(self, f"fisher_{self._buffer(name)}") * sq).sum()
        return total


def diagonal_fisher(model: torch.nn.Module, batches: Iterable[Any], loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model``'s MLM loss: the mean over ``batches`` of squared gradients,
    scaled to mean 1 over all weights (so EWC's λ is on L2-SP's scale).

    Gradients are of mini-batch mean losses (the batch-level empirical Fisher most EWC code for large
    models uses; per-example gradients would cost a backward pass per example). Dropout is off while
    estimating: the Fisher is a property of θ₀, not of a dropout sample. The model's modes and
    gradients are restored afterwards.
    """
    was_training = model.training
    model.eval()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    n = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            for name, p in params.items():
                if p.grad is not None:
                    sums[name] += p.grad.detach().float() ** 2
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n == 0:
        raise ConfigError("EWC: no general-text batch to estimate the Fisher from (empty general corpus?)")
    total = sum(float(s.sum()) for s in sums.values())
    count = sum(s.numel() for s in sums.values())
    mean = total / n / count
    if not mean > 0:
        raise ConfigError("EWC: the Fisher estimate is zero everywhere (no gradient reached the weights)")
    return {name: s / n / mean for name, s in sums.items()}


def add_lora(model: torch.nn.Module, cfg: LoRAConfig) -> Any:
    """Inject LoRA adapters into ``model`` in place (``peft``); returns the ``PeftModel`` wrapper.

    Training keeps using ``model`` itself (``wrapper.get_base_model()`` is the same object, now with
    adapter layers), so the sparse MLM head and every caller see an ordinary transformers model; only
    the adapters require gradients. ``merge_lora`` folds them back before saving.
    """
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ConfigError(f"remedy.lora.target_modules: no module named {missing[0]!r} in {type(model).__name__}")
    wrapper = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                               target_modules=list(cfg.target_modules), bias="none"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %d of %d parameters train (%.2f%%)", cfg.r, cfg.alpha, ",".join(cfg.target_modules),
             trainable, total, 100 * trainable / max(total, 1))
    return wrapper


def merge_lora(wrapper: Any) -> torch.nn.Module:
    """The model with each adapter folded into its weight (``W + B·A·alpha/r``) and the adapter layers
    removed: a plain transformers model whose ``save_pretrained`` output loads with ``from_pretrained``."""
    return wrapper.merge_and_unload()


__all__ = [
    "AnchorPenalty", "EWCConfig", "FreezeConfig", "L2SPConfig", "LLRDConfig", "LoRAConfig", "RemedyConfig",
    "add_lora", "depth_of", "diagonal_fisher", "freeze", "llrd_scales", "merge_lora", "num_layers",
]
