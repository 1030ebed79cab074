"""The ``data`` config group's schema: training sources, held-out sets, block shapes and streaming."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dapt.data.quality import QualityPolicy
from dapt.errors import ConfigError

DOMAIN_SET, GENERAL_SET = "domain", "general"
EVAL_SET_NAMES = (DOMAIN_SET, GENERAL_SET)
EVAL_SPLITS = ("dev", "test")


@dataclass
class DataConfig:
    """The ``data`` config group: what to train on, what to evaluate on, and batch shapes.

    Attributes:
        name: label for this corpus (shown in results and W&B).
        train: list of training sources (see ``SourceConfig``).
        domain_dev / domain_test / general_dev / general_test: held-out sources for domain
            perplexity and forgetting; dev selects (validation, early stopping, sweeps), test reports.
            Each must be disjoint from the training sources (see ``SourceConfig.part``).
        max_seq_length: block length, special tokens included.
        batch_size / eval_batch_size: blocks per step (per device).
        eval_tokens: token budget of each test set, filled with documents sampled across the whole
            split (``dapt.data.heldout``; a split smaller than the budget is used whole); it sets
            the width of the reported perplexity CIs.
        dev_eval_tokens: the same for the dev sets (null = ``eval_tokens``). Dev sets are scored at
            every ``val_check_interval``, so a smaller budget keeps runs short; changes between arms
            are paired on the same documents and stay narrow.
        eval_max_doc_tokens: truncate the domain's held-out documents to this many tokens (null =
            whole documents), so that long documents (papers) do not eat the budget. The general
            sets are never truncated: they are the same in every run whatever the corpus.
        eval_sample_seed: seed of the document sample (the masks use ``masking.eval_seed``).
        shuffle_buffer: blocks held for shuffling after mixing (0 = mixed order); memory O(buffer).
        doc_shuffle_buffer: documents held per source for the document-level shuffle of each pass
            (a different order every pass; 0 or 1 = file order); memory O(buffer) documents.
        num_workers: dataloader workers; tokenization runs there when > 0.
        docs_per_batch: documents tokenized per call to the fast tokenizer.
        max_passes: passes each training source makes (null = as many as max_steps needs); a source
            that has done its passes leaves the mix and the stream ends when all have.
        replay / replay_fraction: general-text sources mixed into training so that a fraction of the
            blocks is general text (a standard remedy against forgetting; 0 disables it). Replay
            sources are weighted among themselves like training sources (``weight`` or size).
        max_bad_fraction / min_bad_records: a source whose bad records (malformed JSON, missing,
            null, non-string or empty text, undecodable bytes) exceed this fraction of its records,
            once there are at least ``min_bad_records`` of them, stops the run with a ``DataError``
            (``dapt.data.quality``); fewer are skipped, counted and the first few warned about.
        check_records: records of each source read by ``check_inputs`` before any model work (a
            bounded prefix: bad data is caught in seconds; the rest is checked while streaming).
        warn_passes: warn once when the training stream starts reading a source for the
            (warn_passes+1)-th time (null: never): a corpus repeated many times is memorised.
    """

    name: str = "corpus"
    train: list[Any] = field(default_factory=list)
    domain_dev: Any = None
    domain_test: Any = None
    general_dev: Any = None
    general_test: Any = None
    max_seq_length: int = 128
    batch_size: int = 16
    eval_batch_size: int = 32
    eval_tokens: int = 262_144
    dev_eval_tokens: int | None = None
    eval_max_doc_tokens: int | None = None
    eval_sample_seed: int = 0
    shuffle_buffer: int = 2048
    doc_shuffle_buffer: int = 1024
    num_workers: int = 0
    docs_per_batch: int = 64
    max_passes: int | None = None
    replay: list[Any] = field(default_factory=list)
    replay_fraction: float = 0.0
    max_bad_fraction: float = 0.01
    min_bad_records: int = 10
    check_records: int = 5000
    warn_passes: int | None = 3

    @property
    def quality_policy(self) -> QualityPolicy:
        return QualityPolicy(self.max_bad_fraction, self.min_bad_records)

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"data.replay_fraction={self.replay_fraction} must be in [0, 1)")
        if self.replay_fraction > 0 and not self.replay:
            raise ConfigError("data.replay_fraction > 0 needs data.replay sources")
        if not self.train:
            raise ConfigError("data.train lists no corpus source")
        if self.max_seq_length < 8:
            raise ConfigError(f"data.max_seq_length={self.max_seq_length} must be >= 8")
        if self.dev_eval_tokens is not None and self.dev_eval_tokens < 1:
            raise ConfigError(f"data.dev_eval_tokens={self.dev_eval_tokens} must be >= 1 or null")
        if self.eval_max_doc_tokens is not None and self.eval_max_doc_tokens < 8:
            raise ConfigError(f"data.eval_max_doc_tokens={self.eval_max_doc_tokens} must be >= 8 or null")
        for key in ("batch_size", "eval_batch_size", "eval_tokens", "docs_per_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        if self.shuffle_buffer < 0 or self.doc_shuffle_buffer < 0 or self.num_workers < 0:
            raise ConfigError("data.shuffle_buffer, data.doc_shuffle_buffer and data.num_workers must be >= 0")
        if self.max_passes is not None and self.max_passes < 1:
            raise ConfigError(f"data.max_passes={self.max_passes} must be >= 1 (or null)")
        if self.warn_passes is not None and self.warn_passes < 1:
            raise ConfigError(f"data.warn_passes={self.warn_passes} must be >= 1 (or null)")
        if self.check_records < 1:
            raise ConfigError(f"data.check_records={self.check_records} must be >= 1")
        QualityPolicy(self.max_bad_fraction, self.min_bad_records)  # raises ConfigError on bad values
