"""The control arm: the same start, recipe, steps and tokens as DAPT, on general text.

Without it, "domain gain" and "forgetting" are confounded with "more MLM steps": a base that is not
converged keeps improving on *every* text when training continues, so DAPT can lower general
perplexity (negative forgetting) and part of its domain gain is just extra training. The control
continues MLM from exactly DAPT's starting weights with DAPT's optimizer, schedule, masking, batch
shape, trainer settings and seed, on the general-text training corpus (``general_sources``). DAPT's
effect is then read against the control: domain perplexity after DAPT vs after the control, general
perplexity after DAPT vs after the control.

The control model is cached under a key of everything that determines it, so a sweep over DAPT-only
knobs (corpus, remedies, DAPT seed with a fixed control seed...) pays for it once; its held-out
perplexities are cached beside it under a key of the held-out sets, so a cached control costs nothing.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from dapt.cached_weights import DIGEST_KEY, intact_marker, weights_digest
from dapt.config import to_dataclass
from dapt.data.datamodule import PackedCorpusDataModule
from dapt.data.sources import as_source, describe
from dapt.errors import ConfigError
from dapt.io import atomic_save_dir, atomic_write_json, cache_build_lock
from dapt.modeling.callbacks import CPU_THREADS
from dapt.pipeline.base_prep import BaseStream
from dapt.pipeline.fit import content_key, evaluate_heldout, evaluation_code_fingerprint, heldout_eval_payload, make_module, make_trainer, stage_keys
from dapt.pipeline.run_config import general_sources
from dapt.progress import StepProgressBar

log = logging.getLogger(__name__)

# Bump when the control's training or evaluation code changes (pinned in tests/test_cache_versions.py).
CONTROL_VERSION = 2  # 2: held-out evaluation under bf16 projects to the vocabulary in fp32 (cached bf16 controls had bf16 logits)
MARKER = "dapt_control.json"


@dataclass
class ControlConfig:
    """The ``control`` config group.

    Attributes:
        enabled: train (or load) the control arm and report DAPT against it.
        data: general-text training sources; empty = ``base_prep.data`` (else ``data.replay``).
        cache: reuse a control with the same key; false retrains every time.
    """

    enabled: bool = True
    data: list[Any] = field(default_factory=list)
    cache: bool = True


@dataclass
class ControlResult:
    path: str
    cache_key: str
    cached: bool
    steps: int
    seconds: float
    heldout: dict[str, Any]
    stream: dict[str, Any]  # what the control trained on: sources, stream seed, first block, shuffles

    def as_results(self) -> dict[str, Any]:
        """The ``control`` block of results.json (perplexities after the control's training)."""
        return {"steps": self.steps, "cache_key": self.cache_key, "cached": self.cached, "path": self.path,
                "stream": self.stream, **stage_keys(self.heldout, "after")}


def recipe_fingerprint() -> str:
    """The code that trains and evaluates a control; pinned with ``CONTROL_VERSION`` by a test."""
    import dapt.masking as masking
    from dapt import labels, sample_stats
    from dapt.data import config, datamodule, heldout, mixing, packing, quality, sources, stream, wikitext
    from dapt.modeling import loading, mlm_module, optim, perplexity, sparse_head
    from dapt.pipeline import base_prep, fit
    from dapt.versioning import source_fingerprint

    strategies = [masking.base, masking.selection, masking.units, masking.random, masking.whole_word, masking.span, masking.pmi, masking.ngrams,
                  masking.salient, masking.term_scores, masking.corpus_stats]
    return source_fingerprint(run_control, control_stream, fit, mlm_module, quality, sparse_head, optim, perplexity, heldout,
                              config, datamodule, stream, mixing, packing, sources, wikitext, loading, base_prep.base_stream, base_prep.BaseStream,
                              base_prep.base_data_config, labels, sample_stats, *strategies)


# Trainer settings that never change the control's weights (evaluation and logging only), and the
# CPU thread count, which changes only the last bits of its sums, as another machine would.
CONTROL_IRRELEVANT_TRAINER_KEYS = (
    "val_check_interval", "check_val_every_n_epoch", "limit_val_batches", "limit_test_batches", "num_sanity_val_steps",
    "log_every_n_steps", "enable_model_summary", "enable_progress_bar", CPU_THREADS,
)


def stats_digest(masker: Any) -> str | None:
    """Content hash of the corpus statistics (PMI n-grams, salient terms) a masker's strategy uses."""
    from dapt.versioning import file_digest

    path = getattr(masker.strategy, "stats_file", None)
    return file_digest(path) if path and Path(path).is_file() else None


def control_sources(cfg: Any, control: ControlConfig) -> list[Any]:
    return [as_source(s, f"control.data[{i}]") for i, s in enumerate(control.data)] if control.data else general_sources(cfg)


def control_stream(cfg: Any, run: Any, control: ControlConfig, base: BaseStream | None) -> tuple[Any, int, int]:
    """The control's training stream: (data config, stream seed, first block).

    When DAPT starts from a prepared base trained on the control's corpus, the control continues the
    base's stream where it stopped (same order, shuffles, workers and stream seed; its masks and
    dropout still follow the run's seed, like DAPT's), so that, like DAPT, it trains on text its
    starting point has not seen. Otherwise it reads its corpus from the start with the run's seed.
    """
    sources = control_sources(cfg, control)
    # No held-out sets of its own: the control is scored on DAPT's (see run_control).
    data_cfg = replace(run.data, name="control", train=sources, replay=[], replay_fraction=0.0,
                       domain_dev=None, domain_test=None, general_dev=None, general_test=None)
    if base is None or [asdict(s) for s in base.data.train] != [asdict(s) for s in sources]:
        return data_cfg, int(cfg.seed), 0
    if base.data.max_seq_length != run.data.max_seq_length:
        log.warning(
            "control arm: base_prep.max_seq_length=%d differs from data.max_seq_length=%d, so the control cannot "
            "continue the base's stream; it reads the general corpus from the start (text the base has "
            "partly seen). Set them equal for a clean control.", base.data.max_seq_length, run.data.max_seq_length,
        )
        return data_cfg, int(cfg.seed), 0
    stream_keys = ("shuffle_buffer", "doc_shuffle_buffer", "docs_per_batch", "max_passes", "num_workers")
    return replace(data_cfg, **{k: getattr(base.data, k) for k in stream_keys}), base.seed, base.blocks


def run_control(
    *,
    cfg: Any,
    run: Any,
    control: ControlConfig,
    start_model: torch.nn.Module,
    start_fingerprint: Any,
    tokenizer: Any,
    masker: Any,
    datamodule: PackedCorpusDataModule,
    data_dir: str,
    cache_dir: str,
    root_dir: str,
    base: BaseStream | None = None,
) -> ControlResult:
    """Train (or load from the cache) the control arm and return its held-out perplexities.

    ``start_model`` is DAPT's starting model *before* any DAPT step; it is deep-copied, never trained.
    ``datamodule`` supplies the held-out sets (the control is evaluated on exactly DAPT's sets).
    ``base``: where a prepared base's stream stopped, when DAPT starts from one.
    """
    from dapt.modeling.loading import load_mlm_model
    from dapt.versioning import library_versions

    data_cfg, seed, start_block = control_stream(cfg, run, control, base)
    sources = data_cfg.train
    recipe = {
        "version": CONTROL_VERSION,
        "start": start_fingerprint,
        "model": {"attn_implementation": run.model.attn_implementation, "compile": run.model.compile},
        "optimizer": asdict(run.optimizer),
        "scheduler": asdict(run.scheduler),
        "masking": asdict(masker.config),
        "masking_stats": stats_digest(masker),  # PMI n-grams / salient terms the masks depend on
        "trainer": {k: v for k, v in run.trainer.items() if k not in CONTROL_IRRELEVANT_TRAINER_KEYS},
        "data": {k: v for k, v in asdict(data_cfg).items() if not k.startswith(("domain_", "general_", "eval_", "dev_eval_", "name", "train"))},
        "sources": describe(sources, data_dir),
        "seed": seed,
        "start_block": start_block,
        "run_seed": int(cfg.seed),
        "libraries": library_versions(),
    }
    key = content_key(recipe)
    target = Path(cache_dir) / "controls" / key if control.cache else Path(root_dir) / "control_model"
    # the held-out numbers are keyed on the code that builds and scores the sets too: a change there
    # (e.g. which sets data.eval_max_doc_tokens truncates) re-scores the cached model, never serves old numbers
    eval_key = content_key({**heldout_eval_payload(run, datamodule), "version": CONTROL_VERSION, "code": evaluation_code_fingerprint()})
    with cache_build_lock(target):  # one build per machine for concurrent sweep jobs; none under DDP
        marker = target / MARKER
        found = intact_marker(target, MARKER, "control arm") if control.cache else None  # damaged: rebuilt
        cached = found is not None
        info = found or {}
        if cached:
            log.info("using cached control arm %s", target)
            model = load_mlm_model(str(target), attn_implementation=run.model.attn_implementation).model
        else:
            log.info("training the control arm: %d steps on general text (%s); saved at %s",
                     run.trainer["max_steps"], ", ".join(s.path for s in sources), target)
            model = copy.deepcopy(start_model)
            t0 = time.time()
            dm = PackedCorpusDataModule(data_cfg, tokenizer, masker, data_dir=data_dir, seed=seed, mask_seed=int(cfg.seed))
            dm.train_stream.start_block = start_block
            dm.check_inputs()
            module = make_module(model, run, eval_names=(), test_names=())
            trainer_kwargs = {**run.trainer, "limit_val_batches": 0, "val_check_interval": None, "check_val_every_n_epoch": None}
            trainer = make_trainer(trainer_kwargs, callbacks=[StepProgressBar(description="control (general text)")],
                                   loggers=None, root_dir=root_dir)
            pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # dropout as in DAPT's fit
            trainer.fit(module, datamodule=dm)
            info = {"steps": int(trainer.global_step), "seconds": time.time() - t0, "recipe": recipe, "evals": {}}
            if trainer.is_global_zero:

                def write(tmp: Path) -> None:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
                    info[DIGEST_KEY] = weights_digest(tmp)
                    atomic_write_json(tmp / MARKER, info)

                atomic_save_dir(target, write)
        heldout = info.get("evals", {}).get(eval_key)
        if heldout is None:
            module = make_module(model, run, eval_names=datamodule.eval_names, test_names=datamodule.test_names)
            trainer = make_trainer({**run.trainer, "enable_progress_bar": False}, callbacks=[], loggers=None, root_dir=root_dir)
            heldout = evaluate_heldout(trainer, module, datamodule)
            info.setdefault("evals", {})[eval_key] = heldout
            if trainer.is_global_zero:
                atomic_write_json(marker, info)
        stream = {"sources": [s.path for s in sources], "continues_base_stream": start_block > 0, "stream_seed": seed,
                  "start_block": start_block, "mask_seed": int(cfg.seed),
                  **{k: getattr(data_cfg, k) for k in ("shuffle_buffer", "doc_shuffle_buffer", "docs_per_batch", "max_passes", "num_workers")}}
        return ControlResult(path=str(target), cache_key=key, cached=cached, steps=int(info["steps"]),
                             seconds=float(info.get("seconds", 0.0)), heldout=heldout, stream=stream)


def control_config(cfg: Any) -> ControlConfig:
    node = cfg.get("control") if hasattr(cfg, "get") else None
    if node is not None and not hasattr(node, "keys"):
        raise ConfigError("control must be a mapping, e.g. control.enabled=false")
    return to_dataclass(ControlConfig, node or {}, prefix="control")
