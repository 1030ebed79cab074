"""``PackedCorpusDataModule``: streamed, packed, sharded training blocks + fixed-mask held-out sets.

Training data is an endless ``IterableDataset`` (training length is ``trainer.max_steps``): each pass
streams the corpus, packs it, shuffles blocks in a bounded buffer and yields them. Documents are
split across DDP ranks × dataloader workers, so within a pass no block is seen twice and ranks never
wait on each other for an epoch end. Masking happens in ``on_after_batch_transfer`` where the
optimizer step is known (rate schedules) and the batch is already on its device.

Held-out sets (domain and general) are packed and masked once with a fixed seed at setup, so every
evaluation of every run sees identical masks and perplexities are comparable across steps and runs.
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

from dapt.data.packing import BlockPacker
from dapt.data.sources import SourceConfig, as_source, check_nonempty, iter_documents
from dapt.errors import ConfigError, DataError
from dapt.masking import Masker

log = logging.getLogger(__name__)

EVAL_SET_NAMES = ("domain", "general")


@dataclass
class DataConfig:
    """The ``data`` config group: what to train on, what to evaluate on, and batch shapes.

    Attributes:
        name: label for this corpus (shown in results and W&B).
        train: list of training sources (see ``SourceConfig``).
        domain_eval / general_eval: held-out sources for domain perplexity and forgetting.
        max_seq_length: block length, special tokens included.
        batch_size / eval_batch_size: blocks per step (per device).
        max_eval_blocks: how many blocks of each held-out set to keep (the same ones every time).
        shuffle_buffer: blocks held for shuffling (0 = stream order); memory is O(buffer).
        num_workers: dataloader workers; tokenization runs there when > 0.
        docs_per_batch: documents tokenized per call to the fast tokenizer.
        max_passes: stop after this many passes over the corpus (null = as many as max_steps needs).
        replay / replay_fraction: general-text sources mixed into training so that a fraction of the
            blocks is general text (a standard remedy against forgetting; 0 disables it).
    """

    name: str = "corpus"
    train: list[Any] = field(default_factory=list)
    domain_eval: Any = None
    general_eval: Any = None
    max_seq_length: int = 128
    batch_size: int = 16
    eval_batch_size: int = 32
    max_eval_blocks: int = 128
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
        for key in ("batch_size", "eval_batch_size", "max_eval_blocks", "docs_per_batch"):
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


def build_eval_set(
    source: SourceConfig,
    data_dir: str | None,
    tokenizer: Any,
    masker: Masker,
    *,
    block_size: int,
    max_blocks: int,
    seed: int,
    rate: float,
) -> TensorDataset:
    """Pack the first ``max_blocks`` blocks of ``source`` and mask them once with ``seed``."""
    packer = BlockPacker(tokenizer, block_size)
    blocks = list(itertools.islice(packer.pack(iter_documents(source, data_dir)), max_blocks))
    if not blocks:
        raise DataError(f"held-out set {source.path} produced no full block of {block_size} tokens")
    batch = collate_blocks(blocks)
    generator = torch.Generator().manual_seed(seed)
    out = masker(batch["input_ids"], batch["word_starts"], generator, rate=rate)
    return TensorDataset(out["input_ids"], out["labels"])


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
        self.eval_masker = eval_masker or masker
        self.data_dir = data_dir
        self.seed = seed
        self.train_sources = [as_source(s, f"data.train[{i}]") for i, s in enumerate(config.train)]
        self.eval_sources: dict[str, SourceConfig] = {}
        for name in EVAL_SET_NAMES:
            raw = getattr(config, f"{name}_eval")
            if raw:
                self.eval_sources[name] = as_source(raw, f"data.{name}_eval")
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
        self.eval_sets: dict[str, TensorDataset] = {}
        self._generators: dict[str, torch.Generator] = {}

    @property
    def eval_names(self) -> list[str]:
        return list(self.eval_sources)

    def check_inputs(self) -> None:
        """Fail fast, before any model work, on a missing or empty corpus."""
        check_nonempty(self.train_sources, self.data_dir, "training")
        for name, source in self.eval_sources.items():
            check_nonempty([source], self.data_dir, f"{name} held-out")

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.train_stream.rank = self.trainer.global_rank
            self.train_stream.world_size = self.trainer.world_size
        if not self.eval_sets:
            cfg = self.eval_masker.config
            for name, source in self.eval_sources.items():
                self.eval_sets[name] = build_eval_set(
                    source,
                    self.data_dir,
                    self.tokenizer,
                    self.eval_masker,
                    block_size=self.config.max_seq_length,
                    max_blocks=self.config.max_eval_blocks,
                    seed=cfg.eval_seed,
                    rate=cfg.eval_rate,
                )

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

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(self.eval_sets[name], batch_size=self.config.eval_batch_size, shuffle=False)
            for name in self.eval_names
        ]

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
        if isinstance(batch, (list, tuple)) and len(batch) == 2:  # held-out TensorDataset batch
            return {"input_ids": batch[0], "labels": batch[1]}
        return batch
