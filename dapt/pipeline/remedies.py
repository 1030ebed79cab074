"""Apply the ``remedy`` config group to DAPT's model: freezing, LoRA, L2-SP / EWC, layer-wise decay.

``apply_remedies`` runs after the control arm has been trained or loaded from its start copy, so no
remedy reaches the control (see ``dapt.pipeline.control``): DAPT with a remedy is read against the
same control as plain DAPT, and a sweep over the weight-side remedies shares one cached control (the
schedule-side ``rewarm`` changes the schedule the control shares with DAPT, so it has its own). The
EWC Fisher is estimated once per start model and seed on general text and cached like the base.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dapt.modeling.remedies import AnchorPenalty, RemedyConfig, add_lora, diagonal_fisher, freeze, merge_lora

log = logging.getLogger(__name__)

# Bump when the Fisher estimate's code changes (its cache key also holds the code's fingerprint).
FISHER_VERSION = 1


@dataclass
class AppliedRemedies:
    """The remedies as applied to one DAPT model (``model`` is what trains: the same object, with LoRA
    adapters injected when LoRA is on)."""

    config: RemedyConfig
    model: torch.nn.Module
    penalty: AnchorPenalty | None = None
    lora: Any = None  # the peft wrapper (merged back by ``export``)
    frozen: list[str] = field(default_factory=list)
    fisher: dict[str, Any] | None = None
    # counted when applied: after training, LoRA's merge leaves no parameter marked trainable
    trainable_parameters: int = 0
    parameters: int = 0

    @property
    def layer_decay(self) -> float:
        return self.config.llrd.decay

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to save after training: LoRA adapters merged into the weights, else ``model``."""
        return merge_lora(self.lora) if self.lora is not None else model

    def as_results(self, run: Any) -> dict[str, Any]:
        """The ``remedies`` block of results.json: what was switched on, with the replay fraction and
        schedule (the data- and schedule-side remedies) beside them."""
        active = self.config.active()
        if run.data.replay_fraction > 0:
            active.append("replay")
        if run.scheduler.min_lr_ratio > 0:
            active.append("rewarm")
        return {"active": active, "config": asdict(self.config), "replay_fraction": run.data.replay_fraction,
                "scheduler": asdict(run.scheduler), "trainable_parameters": self.trainable_parameters, "parameters": self.parameters,
                "frozen_tensors": len(self.frozen), "fisher": self.fisher}


def apply_remedies(remedy: RemedyConfig, *, model: torch.nn.Module, run: Any, general_sources: list[Any], masker: Any, tokenizer: Any,
                   data_dir: str, cache_dir: str, start_fingerprint: Any, seed: int) -> AppliedRemedies:
    """Freeze, inject LoRA and build the L2-SP/EWC penalty on ``model`` (in place), in that order: the
    penalty anchors exactly the weights that still train, at their start values."""
    applied = AppliedRemedies(config=remedy, model=model)
    if remedy.freeze.embeddings or remedy.freeze.layers:
        applied.frozen = freeze(model, remedy.freeze)
        log.info("remedy.freeze: %d parameter tensors frozen (embeddings=%s, lowest %d layers)",
                 len(applied.frozen), remedy.freeze.embeddings, remedy.freeze.layers)
    if remedy.lora.enabled:
        applied.lora = add_lora(model, remedy.lora)
    if remedy.l2sp.weight or remedy.ewc.weight:
        fisher = None
        if remedy.ewc.weight:
            fisher, applied.fisher = cached_fisher(model, remedy, run=run, general_sources=general_sources, masker=masker,
                                                   tokenizer=tokenizer, data_dir=data_dir, cache_dir=cache_dir,
                                                   start_fingerprint=start_fingerprint, seed=seed)
        applied.penalty = AnchorPenalty(model, l2sp=remedy.l2sp.weight, ewc=remedy.ewc.weight, fisher=fisher)
    applied.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    applied.parameters = sum(p.numel() for p in model.parameters())
    if applied.config.active():
        log.info("remedies on: %s", ", ".join(applied.config.active()))
    return applied


def fisher_key(remedy: RemedyConfig, *, run: Any, general_sources: list[Any], masker: Any, data_dir: str, start_fingerprint: Any,
               seed: int) -> str:
    """Content key of a Fisher estimate: the start model, the general text and how it is batched and
    masked, which weights train (freezing), the estimate's size and code, and the libraries."""
    from dapt.data.sources import describe
    from dapt.modeling import remedies, sparse_head
    from dapt.pipeline.control import stats_digest
    from dapt.pipeline.fit import content_key
    from dapt.versioning import library_versions, source_fingerprint

    stream = {k: v for k, v in asdict(_fisher_data(run, general_sources)).items() if k not in ("name", "train")}
    return content_key({
        "version": FISHER_VERSION, "start": start_fingerprint, "sources": describe(general_sources, data_dir),
        "masking": asdict(masker.config), "masking_stats": stats_digest(masker), "batches": remedy.ewc.batches,
        "stream": stream, "freeze": asdict(remedy.freeze), "seed": seed,
        "code": source_fingerprint(remedies.diagonal_fisher, sparse_head, estimate_fisher), "libraries": library_versions(),
    })


def cached_fisher(model: torch.nn.Module, remedy: RemedyConfig, *, run: Any, general_sources: list[Any], masker: Any, tokenizer: Any,
                  data_dir: str, cache_dir: str, start_fingerprint: Any, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The diagonal Fisher of ``model`` on general text, read from ``<cache_dir>/fisher/<key>.pt`` or
    estimated and written there (atomically, once per machine for concurrent sweep jobs)."""
    from dapt.io import atomic_write_file, cache_build_lock

    key = fisher_key(remedy, run=run, general_sources=general_sources, masker=masker, data_dir=data_dir,
                     start_fingerprint=start_fingerprint, seed=seed)
    path = Path(cache_dir) / "fisher" / f"{key}.pt"
    info = {"path": str(path), "cache_key": key, "batches": remedy.ewc.batches}
    with cache_build_lock(path):
        if path.is_file():
            try:
                fisher = torch.load(path, map_location="cpu", weights_only=True)
                log.info("EWC Fisher read from the cache: %s", path)
                return fisher, {**info, "cached": True}
            except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss: re-estimated below
                log.warning("cached Fisher %s is unreadable (%s); re-estimating it", path, exc)
        fisher = estimate_fisher(model, remedy.ewc.batches, run=run, general_sources=general_sources, masker=masker,
                                 tokenizer=tokenizer, data_dir=data_dir, seed=seed)
        atomic_write_file(path, lambda tmp: torch.save(fisher, tmp))
    return fisher, {**info, "cached": False}


def _fisher_data(run: Any, general_sources: list[Any]) -> Any:
    """The data config of the Fisher's stream: DAPT's batch shape, stream and quality settings on the
    general sources, without replay or held-out sets."""
    return replace(run.data, name="fisher", train=list(general_sources), replay=[], replay_fraction=0.0,
                   domain_dev=None, domain_test=None, general_dev=None, general_test=None, num_workers=0)


def estimate_fisher(model: torch.nn.Module, batches: int, *, run: Any, general_sources: list[Any], masker: Any, tokenizer: Any,
                    data_dir: str, seed: int) -> dict[str, torch.Tensor]:
    """``batches`` masked general-text batches of DAPT's shape (blocks of ``data.max_seq_length``,
    ``data.batch_size`` per batch), streamed like the control's corpus, through ``diagonal_fisher``."""
    from dapt.data.datamodule import PackedCorpusDataModule
    from dapt.modeling.sparse_head import sparse_mlm_loss

    dm = PackedCorpusDataModule(_fisher_data(run, general_sources), tokenizer, masker, data_dir=data_dir, seed=seed)
    dm.check_inputs()
    log.info("EWC: estimating the diagonal Fisher on %d general-text batches", batches)

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return sparse_mlm_loss(m, batch["input_ids"], batch["labels"], batch.get("attention_mask"))[0]

    # The datamodule masks each batch in its transfer hook (as in training), with its own seeded generator.
    masked = (dm.on_after_batch_transfer(batch, 0) for batch in itertools.islice(iter(dm.train_dataloader()), batches))
    return diagonal_fisher(model, masked, loss)
