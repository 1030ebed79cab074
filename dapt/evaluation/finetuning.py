"""Fine-tune one model on one task for one seed, and the hyperparameters that control it.

The recipe is Don't Stop Pretraining's (Gururangan et al. 2020): AdamW lr 2e-5, batch 16, up to 10
epochs, early stopping with patience 3 on the dev metric, 6% linear warmup then linear decay,
weight decay 0.1; the test score is read from the weights of the best dev epoch. ``max_train_examples``
/ ``max_eval_examples`` / ``max_epochs`` shrink it to a CPU budget. Tokenization and the model-
independent work are done once per (model, task) in ``prepare`` and shared by all seeds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Subset

from dapt.errors import ConfigError, DataError
from dapt.evaluation.encoding import EncodedSplit, encode_classification, encode_ner, make_collate
from dapt.evaluation.metrics import classification_scores, ner_scores
from dapt.evaluation.tasks import TaskData
from dapt.precision import Precision, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class DownstreamConfig:
    """Fine-tuning hyperparameters and budget (``conf/downstream/*.yaml``).

    Attributes:
        seeds: fine-tuning seeds; base, control and adapted use the same ones so they pair up.
        lr / batch_size / max_epochs / patience / weight_decay / warmup_ratio / max_grad_norm: the
            optimisation recipe (defaults: Don't Stop Pretraining).
        eval_batch_size: batch size for dev/test prediction (no effect on scores).
        max_seq_length: sub-tokens per example; longer NER sentences lose their tail (scored as O).
        max_train_examples: train on a fixed random subset of this size (``null``: all of train).
        max_eval_examples: score dev and test on fixed random subsets of this size (``null``: all).
        data_seed: seed of those subsets, fixed across fine-tuning seeds and models.
        val_check_interval: dev evaluations per epoch as a fraction (1.0 = once per epoch).
        accelerator: Lightning accelerator for fine-tuning (``cpu``, ``gpu``, ``auto``).
        precision: Lightning precision for fine-tuning; ``auto`` = the DAPT run's precision inside
            ``dapt train`` (``downstream_config``), else bf16 autocast where the hardware runs bf16
            natively, fp32 elsewhere (``dapt.precision``). The resolved value is in the cache key.
        cache: reuse base-model scores from ``paths.cache_dir/downstream`` (keyed by model files,
            task data, seed and these hyperparameters).
        alpha: significance level of the paired t-tests (family-wise, after Holm correction over
            every comparison in the results table); the CIs are (1 - alpha) intervals.
        equivalence_margin: the verdict says "no effect larger than <margin>" only when the whole
            CI of a difference lies inside ±margin (0.01 = one F1 point); otherwise a non-significant
            difference is "inconclusive", never "no effect".
        progress_bar: show Lightning's progress bar per fine-tune.
        budget: a name for this budget, printed with the results (``paper``, ``default``, ``tiny``: the option that selects it).
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float = 2e-5
    batch_size: int = 16
    eval_batch_size: int = 64
    max_epochs: int = 10
    patience: int = 3
    weight_decay: float = 0.1
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_seq_length: int = 128
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    data_seed: int = 0
    val_check_interval: float = 1.0
    accelerator: str = "cpu"
    precision: str = "auto"
    cache: bool = True
    alpha: float = 0.05
    equivalence_margin: float = 0.01
    progress_bar: bool = False
    budget: str = "paper"

    def __post_init__(self) -> None:
        checks = [
            (len(self.seeds) > 0, "seeds must list at least one seed"),
            (len(set(self.seeds)) == len(self.seeds), f"seeds has duplicates: {list(self.seeds)}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.max_epochs >= 1, f"max_epochs must be >= 1, got {self.max_epochs}"),
            (self.patience >= 1, f"patience must be >= 1, got {self.patience}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.max_seq_length >= 8, f"max_seq_length must be >= 8, got {self.max_seq_length}"),
            (self.max_train_examples is None or self.max_train_examples >= 1, "max_train_examples must be >= 1 or null"),
            (self.max_eval_examples is None or self.max_eval_examples >= 1, "max_eval_examples must be >= 1 or null"),
            (0 < self.val_check_interval <= 1, f"val_check_interval must be in (0, 1], got {self.val_check_interval}"),
            (0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}"),
            (self.equivalence_margin > 0, f"equivalence_margin must be > 0, got {self.equivalence_margin}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"downstream.{message}")

    def fingerprint(self) -> dict[str, Any]:
        """The fields that change scores (cache key): not seeds, caching, reporting or eval batch size."""
        skip = {"seeds", "cache", "alpha", "equivalence_margin", "progress_bar", "budget", "eval_batch_size"}
        fields_ = {k: v for k, v in asdict(self).items() if k not in skip}
        fields_["precision"] = self.resolved_precision().value  # what it computes in, never "auto"
        return fields_

    def resolved_precision(self) -> Precision:
        return resolve_precision(self.precision, self.accelerator)


@dataclass
class PreparedTask:
    """A task tokenized for one model: shared by every seed of that model."""

    data: TaskData
    model_path: str
    tokenizer: Any
    train: EncodedSplit
    dev: EncodedSplit
    test: EncodedSplit
    label2id: dict[str, int]


def _subset(examples: list[Any], limit: Optional[int], seed: int) -> list[Any]:
    """A fixed random subset in original order (same for every model and fine-tuning seed)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def prepare(model_source: str, data: TaskData, cfg: DownstreamConfig) -> PreparedTask:
    """Load the tokenizer of ``model_source`` and encode the (budgeted) splits once."""
    from dapt.modeling.loading import load_tokenizer, resolve_model_path

    path = resolve_model_path(model_source)
    # NER input is pre-split words: byte-level BPE tokenizers must add the word-initial space marker
    # (load_tokenizer checks that split words encode like running text, or fails in one line).
    tokenizer = load_tokenizer(model_source, split_words=data.task.type == "ner")
    label2id = {label: i for i, label in enumerate(data.labels)}
    encode = encode_ner if data.task.type == "ner" else encode_classification
    splits = {
        "train": _subset(data.train, cfg.max_train_examples, cfg.data_seed),
        "dev": _subset(data.dev, cfg.max_eval_examples, cfg.data_seed),
        "test": _subset(data.test, cfg.max_eval_examples, cfg.data_seed),
    }
    try:
        encoded = {name: encode(examples, tokenizer, label2id, max_length=cfg.max_seq_length) for name, examples in splits.items()}
    except ValueError as exc:  # e.g. a tokenizer that rejects an input
        raise DataError(f"task {data.task.name}: tokenizing for {model_source} failed: {str(exc).splitlines()[0]}") from exc
    return PreparedTask(data=data, model_path=path, tokenizer=tokenizer, label2id=label2id, **encoded)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence per-fine-tune chatter (Lightning's device banner, newly-initialised-head notices).

    Restores the previous levels afterwards: nothing global is changed for the caller.
    """
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(n) for n in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    hf_level = hf_logging.get_verbosity()
    hf_bars = hf_logging.is_progress_bar_enabled()
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        hf_logging.set_verbosity(hf_level)
        if hf_bars:
            hf_logging.enable_progress_bar()


def load_backbone(prepared: PreparedTask) -> torch.nn.Module:
    """The encoder with a fresh task head (an MLM head in the checkpoint is simply not loaded)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    labels = prepared.data.labels
    auto = AutoModelForTokenClassification if prepared.data.task.type == "ner" else AutoModelForSequenceClassification
    try:
        return auto.from_pretrained(
            prepared.model_path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id=prepared.label2id,
            ignore_mismatched_sizes=True,  # a checkpoint that already has a head of another size
        )
    except (OSError, ValueError) as exc:
        raise DataError(f"could not load {prepared.model_path} for {auto.__name__}: {str(exc).splitlines()[0]}") from exc


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches of similar length (AllenNLP's bucket iterator, used by Don't Stop Pretraining).

    Each epoch: shuffle, cut into pools of ``pool_batches`` batches, sort each pool by length, cut it
    into batches and shuffle the batches. Padding drops by about a third on NCBI-disease, which on a
    CPU is a third of the fine-tuning time; the seeded generator makes the order reproducible.
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, pool_batches: int = 50) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.generator = generator
        self.pool = batch_size * pool_batches

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.pool):
            pool = sorted(order[start : start + self.pool], key=lambda i: self.lengths[i])
            batches.extend(pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size))
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


def _eval_loader(split: EncodedSplit, batch_size: int, collate: Any) -> DataLoader:
    # Length-sorted batches: less padding, same scores (predictions map back through 'index').
    order = sorted(range(len(split)), key=lambda i: len(split.features[i]["input_ids"]))
    return DataLoader(Subset(split, order), batch_size=batch_size, shuffle=False, collate_fn=collate)


def score(prepared: PreparedTask, split: EncodedSplit, predictions: dict[int, Any]) -> dict[str, Any]:
    """Metrics of ``predictions`` (``{example index: prediction}``) against the split's gold."""
    missing = len(split.gold) - len(predictions)
    if missing:
        raise RuntimeError(f"{missing} examples were not predicted")
    ordered = [predictions[i] for i in range(len(split.gold))]
    if split.kind == "ner":
        return ner_scores(split.gold, ordered)
    return classification_scores(split.gold, ordered, prepared.data.labels)


def finetune_seed(prepared: PreparedTask, seed: int, cfg: DownstreamConfig) -> dict[str, Any]:
    """Fine-tune from ``prepared.model_path`` with ``seed``; return dev/test metrics at the best dev epoch."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping

    from dapt.evaluation.modules import SequenceClassificationModule, TokenClassificationModule

    start = time.perf_counter()
    task = prepared.data.task
    collate = make_collate(prepared.tokenizer.pad_token_id if prepared.tokenizer.pad_token_id is not None else 0)
    with _quiet():
        pl.seed_everything(seed, workers=True, verbose=False)
        model = load_backbone(prepared)
        model.train()  # from_pretrained returns eval mode and Lightning keeps submodule modes: dropout must be on
        generator = torch.Generator().manual_seed(seed)
        sampler = BucketBatchSampler(prepared.train.lengths(), cfg.batch_size, generator)
        train_loader = DataLoader(prepared.train, batch_sampler=sampler, collate_fn=collate)
        steps_per_epoch = math.ceil(len(prepared.train) / cfg.batch_size)
        common: dict[str, Any] = {
            "lr": cfg.lr,
            "weight_decay": cfg.weight_decay,
            "warmup_ratio": cfg.warmup_ratio,
            "total_steps": steps_per_epoch * cfg.max_epochs,
            "dev_scorer": lambda preds: score(prepared, prepared.dev, preds),
            "metric": task.metric,
        }
        if task.type == "ner":
            module: Any = TokenClassificationModule(model, id2label=prepared.data.labels, **common)
        else:
            module = SequenceClassificationModule(model, **common)
        trainer = pl.Trainer(
            accelerator=cfg.accelerator,
            devices=1,
            precision=cfg.resolved_precision().value,
            max_epochs=cfg.max_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=cfg.progress_bar,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            gradient_clip_val=cfg.max_grad_norm,
            val_check_interval=cfg.val_check_interval,
            callbacks=[EarlyStopping(monitor="dev_score", mode="max", patience=cfg.patience, check_on_train_epoch_end=False)],
        )
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=_eval_loader(prepared.dev, cfg.eval_batch_size, collate))
        module.restore_best()
        batches = trainer.predict(module, dataloaders=_eval_loader(prepared.test, cfg.eval_batch_size, collate))
    test_predictions = {i: p for batch in batches or [] for i, p in batch}
    test = score(prepared, prepared.test, test_predictions)
    return {
        "seed": seed,
        "dev": module.best_dev,
        "test": test,
        "best_epoch": module.best_epoch,
        "epochs_run": trainer.current_epoch,
        "dev_history": module.dev_history,
        "train_examples": len(prepared.train),
        "dev_examples": len(prepared.dev),
        "test_examples": len(prepared.test),
        "seconds": round(time.perf_counter() - start, 1),
    }
