"""``PackedCorpusDataModule``: streamed, packed, sharded training blocks + fixed-mask held-out sets.

Training data is an endless ``IterableDataset`` (training length is ``trainer.max_steps``): each pass
streams the corpus, packs it, shuffles blocks in a bounded buffer and yields them. Documents are
split across DDP ranks × dataloader workers, so within a pass no block is seen twice and ranks never
wait on each other for an epoch end. Masking happens in ``on_after_batch_transfer`` where the
optimizer step is known (rate schedules) and the batch is already on its device.

Held-out sets come in two splits: ``dev`` (validated every ``val_check_interval``; what early
stopping and sweeps select on) and ``test`` (scored once before and once after training, the numbers
reported). Each split has a ``domain`` and a ``general`` (forgetting) set, sampled across the whole
split and masked once with a fixed seed (``dapt.data.heldout``), so every evaluation of every run sees
identical masks and perplexities are comparable across steps and runs.
"""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from dapt.data.heldout import build_heldout_set
from dapt.data.packing import BlockPacker
from dapt.data.sources import SourceConfig, as_source, check_nonempty, describe, iter_documents
from dapt.errors import ConfigError, DataError
from dapt.masking import Masker

log = logging.getLogger(__name__)

EVAL_SET_NAMES = ("domain", "general")
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
        eval_tokens: token budget of each held-out set, filled with documents sampled across the
            whole split (``dapt.data.heldout``); it sets the width of the perplexity CI.
        eval_max_doc_tokens: truncate held-out documents to this many tokens (null = whole
            documents), so that long documents (papers) do not eat the budget.
        eval_sample_seed: seed of the document sample (the masks use ``masking.eval_seed``).
        shuffle_buffer: blocks held for shuffling (0 = stream order); memory is O(buffer).
        num_workers: dataloader workers; tokenization runs there when > 0.
        docs_per_batch: documents tokenized per call to the fast tokenizer.
        max_passes: stop after this many passes over the corpus (null = as many as max_steps needs).
        replay / replay_fraction: general-text sources mixed into training so that a fraction of the
            blocks is general text (a standard remedy against forgetting; 0 disables it).
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
    eval_max_doc_tokens: int | None = None
    eval_sample_seed: int = 0
    shuffle_buffer: int = 2048
    num_workers: int = 0
    docs_per_batch: int = 64
    max_passes: int | None = None
    replay: list[Any] = field(default_factory=list)
    replay_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ConfigError(f"data.replay_fraction={self.replay_fraction} must be in [0, 1)")
        if self.replay_fraction > 0 and not self.replay:
            raise ConfigError("data.replay_fraction > 0 needs data.replay sources")
        if not self.train:
            raise ConfigError("data.train lists no corpus source")
        if self.max_seq_length < 8:
            raise ConfigError(f"data.max_seq_length={self.max_seq_length} must be >= 8")
        if self.eval_max_doc_tokens is not None and self.eval_max_doc_tokens < 8:
            raise ConfigError(f"data.eval_max_doc_tokens={self.eval_max_doc_tokens} must be >= 8 or null")
        for key in ("batch_size", "eval_batch_size", "eval_tokens", "docs_per_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}={getattr(self, key)} must be >= 1")
        if self.shuffle_buffer < 0 or self.num_workers < 0:
            raise ConfigError("data.shuffle_buffer and data.num_workers must be >= 0")


def shard_of(rank: int, world_size: int) -> tuple[int, int]:
    """(shard index, shard count) of the calling dataloader worker on DDP ``rank``."""
    info = get_worker_info()
    workers = info.num_workers if info is not None else 1
    worker = info.id if info is not None else 0
    return rank * workers + worker, world_size * workers


class PackedBlockStream(IterableDataset):
    """Endless stream of packed blocks for one (rank, worker) shard.

    ``rank``/``world_size`` are set by the data module in ``setup`` (Lightning knows them then).
    """

    def __init__(
        self,
        sources: Sequence[SourceConfig],
        data_dir: str | None,
        tokenizer: Any,
        block_size: int,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        docs_per_batch: int = 64,
        max_passes: int | None = None,
        replay: Sequence[SourceConfig] = (),
        replay_fraction: float = 0.0,
    ) -> None:
        self.sources = list(sources)
        self.replay = list(replay)
        self.replay_fraction = replay_fraction
        self.data_dir = data_dir
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.docs_per_batch = docs_per_batch
        self.max_passes = max_passes
        self.rank = 0
        self.world_size = 1

    def blocks_for_pass(self, shard: int, num_shards: int, pass_index: int) -> Iterator[dict[str, np.ndarray]]:
        packer = BlockPacker(self.tokenizer, self.block_size, docs_per_batch=self.docs_per_batch)
        docs = iter_documents(self.sources, self.data_dir, shard_index=shard, num_shards=num_shards)
        blocks = packer.pack(docs)
        if self.shuffle_buffer > 1:
            blocks = _buffer_shuffle(blocks, self.shuffle_buffer, random.Random(hash((self.seed, shard, pass_index))))
        return blocks

    def _domain_blocks(self, shard: int, num_shards: int) -> Iterator[dict[str, np.ndarray]]:
        passes = range(self.max_passes) if self.max_passes else itertools.count()
        for pass_index in passes:
            n = 0
            for block in self.blocks_for_pass(shard, num_shards, pass_index):
                n += 1
                yield block
            if n == 0:
                raise DataError(
                    f"training shard {shard}/{num_shards} produced no full block of {self.block_size} tokens: "
                    "the corpus is empty or too small for this many ranks × workers"
                )

    def _replay_blocks(self, shard: int, num_shards: int) -> Iterator[dict[str, np.ndarray]]:
        packer = BlockPacker(self.tokenizer, self.block_size, docs_per_batch=self.docs_per_batch)
        for pass_index in itertools.count():
            n = 0
            docs = iter_documents(self.replay, self.data_dir, shard_index=shard, num_shards=num_shards)
            for block in packer.pack(docs):
                n += 1
                yield block
            if n == 0:
                raise DataError(f"replay shard {shard}/{num_shards} produced no full block of {self.block_size} tokens")

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        shard, num_shards = shard_of(self.rank, self.world_size)
        domain = self._domain_blocks(shard, num_shards)
        if not (self.replay and self.replay_fraction > 0):
            yield from domain
            return
        replay = self._replay_blocks(shard, num_shards)
        rng = random.Random(hash(("replay", self.seed, shard)))
        for block in domain:  # domain passes bound the stream; replay cycles as needed
            while rng.random() < self.replay_fraction:
                yield next(replay)
            yield block


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle with O(size) memory (the standard streaming shuffle buffer)."""
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def collate_blocks(blocks: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(np.stack([b["input_ids"] for b in blocks])),
        "word_starts": torch.from_numpy(np.stack([b["word_starts"] for b in blocks])),
    }


class PackedCorpusDataModule(pl.LightningDataModule):
    """Streams a domain corpus for training; serves fixed-mask domain + general held-out sets."""

    def __init__(
        self,
        config: DataConfig,
        tokenizer: Any,
        masker: Masker,
        *,
        data_dir: str | None,
        seed: int = 0,
        eval_masker: Masker | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.masker = masker
        if eval_masker is None:  # the held-out masker: eval_strategy at eval_rate, never the train rate
            from dataclasses import asdict

            from dapt.masking import build_eval_masker

            eval_masker = build_eval_masker(asdict(masker.config), tokenizer)
        self.eval_masker = eval_masker
        self.data_dir = data_dir
        self.seed = seed
        self.train_sources = [as_source(s, f"data.train[{i}]") for i, s in enumerate(config.train)]
        self.eval_sources: dict[str, dict[str, SourceConfig]] = {split: {} for split in EVAL_SPLITS}
        for split in EVAL_SPLITS:
            for name in EVAL_SET_NAMES:
                raw = getattr(config, f"{name}_{split}")
                if raw:
                    self.eval_sources[split][name] = as_source(raw, f"data.{name}_{split}")
        self.train_stream = PackedBlockStream(
            self.train_sources,
            data_dir,
            tokenizer,
            config.max_seq_length,
            shuffle_buffer=config.shuffle_buffer,
            seed=seed,
            docs_per_batch=config.docs_per_batch,
            max_passes=config.max_passes,
            replay=[as_source(s, f"data.replay[{i}]") for i, s in enumerate(config.replay)],
            replay_fraction=config.replay_fraction,
        )
        self.eval_sets: dict[str, dict[str, TensorDataset]] = {}
        self.eval_info: dict[str, dict[str, dict[str, int]]] = {}
        self._generators: dict[str, torch.Generator] = {}

    @property
    def eval_names(self) -> list[str]:
        """Names of the dev sets, in ``val_dataloader`` order."""
        return list(self.eval_sources["dev"])

    @property
    def test_names(self) -> list[str]:
        """Names of the test sets, in ``test_dataloader`` order."""
        return list(self.eval_sources["test"])

    def heldout_fingerprint(self) -> dict[str, Any]:
        """Everything that determines the held-out sets (cache key of a cached model's perplexities)."""
        from dataclasses import asdict

        return {
            "sources": {split: {n: describe([s], self.data_dir) for n, s in srcs.items()} for split, srcs in self.eval_sources.items()},
            "block_size": self.config.max_seq_length,
            "eval_tokens": self.config.eval_tokens,
            "eval_max_doc_tokens": self.config.eval_max_doc_tokens,
            "eval_sample_seed": self.config.eval_sample_seed,
            "masker": asdict(self.eval_masker.config),
            "vocab": len(self.tokenizer),
        }

    def check_inputs(self) -> None:
        """Fail fast, before any model work, on a missing or empty corpus."""
        check_nonempty(self.train_sources, self.data_dir, "training")
        for split, sources in self.eval_sources.items():
            for name, source in sources.items():
                check_nonempty([source], self.data_dir, f"{name} {split}")

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.train_stream.rank = self.trainer.global_rank
            self.train_stream.world_size = self.trainer.world_size
        if not self.eval_sets:
            cfg = self.eval_masker.config
            for split, sources in self.eval_sources.items():
                self.eval_sets[split], self.eval_info[split] = {}, {}
                for name, source in sources.items():
                    dataset, info = build_heldout_set(
                        source,
                        self.data_dir,
                        self.tokenizer,
                        self.eval_masker,
                        block_size=self.config.max_seq_length,
                        max_tokens=self.config.eval_tokens,
                        sample_seed=self.config.eval_sample_seed,
                        mask_seed=cfg.eval_seed,
                        max_doc_tokens=self.config.eval_max_doc_tokens,
                    )
                    self.eval_sets[split][name], self.eval_info[split][name] = dataset, info
                    log.info("%s %s set: %d of %d documents, %d blocks, %d masked tokens", name, split,
                             info["documents"], info["documents_in_split"], info["blocks"], info["masked_tokens"])

    def train_dataloader(self) -> DataLoader:
        workers = self.config.num_workers
        return DataLoader(
            self.train_stream,
            batch_size=self.config.batch_size,
            collate_fn=collate_blocks,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        self.setup()
        return [DataLoader(ds, batch_size=self.config.eval_batch_size, shuffle=False) for ds in self.eval_sets[split].values()]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("dev")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + rank)
        return self._generators[key]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "word_starts" in batch:
            step = self.trainer.global_step if self.trainer is not None else 0
            ids = batch["input_ids"]
            return self.masker(ids, batch["word_starts"], self._generator(ids.device), step=step)
        if isinstance(batch, (list, tuple)) and len(batch) == 3:  # held-out TensorDataset batch
            return {"input_ids": batch[0], "labels": batch[1], "doc_ids": batch[2]}
        return batch
