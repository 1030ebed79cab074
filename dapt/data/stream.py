"""The training stream: endless packed blocks, one shard per (DDP rank, dataloader worker).

Each shard mixes every source by weight from its first block (``dapt.data.mixing`` says why) and can
start mid-stream, so a resumed run continues exactly where its checkpoint stopped.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dapt.data.mixing import BLOCK_SHUFFLE, SOURCE_DRAW, Component, SourceStream, buffer_shuffle, components, interleave, rng, source_names
from dapt.data.packing import BlockPacker
from dapt.data.quality import QualityPolicy, ReadStats
from dapt.data.sources import SourceConfig

log = logging.getLogger(__name__)


def shard_of(rank: int, world_size: int, rotate: int = 0) -> tuple[int, int]:
    """(shard index, shard count) of the calling dataloader worker on DDP ``rank``.

    ``rotate`` shifts which worker reads which shard: a loader resumed after ``b`` batches must start
    its round-robin with the shard whose turn batch ``b`` was (see ``PackedBlockStream``).
    """
    info = get_worker_info()
    workers = info.num_workers if info is not None else 1
    worker = info.id if info is not None else 0
    return rank * workers + (worker + rotate) % workers, world_size * workers


def blocks_before(batches: int, batch_size: int, worker: int, num_workers: int) -> int:
    """Blocks worker ``worker`` of ``num_workers`` delivered in a rank's first ``batches`` batches.

    A ``DataLoader`` over an endless ``IterableDataset`` takes batch ``b`` from worker
    ``b % num_workers`` (0 workers = one in-process "worker"), so resuming after ``batches`` batches
    means each worker's shard skips its own share, and the shards rotate so that the resumed loader's
    first batch comes from shard ``batches % num_workers`` (``shard_of(..., rotate=batches)``).
    """
    workers = max(num_workers, 1)
    return max(0, (batches - worker + workers - 1) // workers) * batch_size


class PackedBlockStream(IterableDataset):
    """Endless stream of packed blocks for one (rank, worker) shard, mixing all sources by weight.

    Each block is ``{"input_ids", "word_starts", "source"}`` (``source``: index into
    ``source_names``; domain sources first, then replay). See ``dapt.data.mixing`` for the design.
    The stream is a pure function of (sources, weights, seed, shard, shard count): ``start_block=k``
    yields exactly the tail from block ``k`` of this shard's stream (blocks before it are generated
    and discarded, no model involved), which serves exact resume and continuing another run's stream.

    ``rank``/``world_size`` are set by the data module in ``setup`` (Lightning knows them then);
    ``start_block`` counts blocks of each shard, ``start_batch`` (with ``batch_size``) counts a
    rank's batches and is converted per dataloader worker by ``blocks_before``; both may be set
    before iteration.
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
        doc_shuffle_buffer: int = 1024,
        start_block: int = 0,
        policy: QualityPolicy | None = None,
        warn_passes: int | None = None,
    ) -> None:
        self.sources = list(sources)
        self.replay = list(replay)
        self.replay_fraction = replay_fraction
        self.data_dir = data_dir
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.shuffle_buffer = shuffle_buffer
        self.doc_shuffle_buffer = doc_shuffle_buffer
        self.seed = seed
        self.docs_per_batch = docs_per_batch
        self.max_passes = max_passes
        self.start_block = start_block
        self.policy = policy or QualityPolicy()
        self.warn_passes = warn_passes
        self.planned_batches: int | None = None  # a rank's batches in the run (the repetition estimate)
        # Each shard's per-source read counts, from the latest iteration in this process.
        self.read_stats: dict[int, list[ReadStats]] = {}
        self.start_batch = 0
        self.batch_size = 1
        self.rank = 0
        self.world_size = 1

    @property
    def source_names(self) -> list[str]:
        """Name of each block ``source`` index: the path, ``replay:<path>`` for replay sources."""
        return source_names(self.sources, self.replay if self.replay_fraction > 0 else [])

    def components(self) -> list[Component]:
        """The mixture: each source with its draw probability (weights resolved from the config)."""
        return components(self.sources, self.data_dir, replay=self.replay, replay_fraction=self.replay_fraction)

    def source_stream(self, index: int, shard: int = 0, num_shards: int = 1, comps: Sequence[Component] | None = None) -> SourceStream:
        """Source ``index``'s own stream on one shard (its documents per pass and its blocks)."""
        comp = (comps if comps is not None else self.components())[index]
        packer = BlockPacker(self.tokenizer, self.block_size, docs_per_batch=self.docs_per_batch)
        planned = None
        if self.planned_batches is not None:
            shards_per_rank = max(num_shards // max(self.world_size, 1), 1)
            planned = self.planned_batches * self.batch_size // shards_per_rank
        return SourceStream(
            comp,
            self.data_dir,
            packer,
            seed=self.seed,
            shard=shard,
            num_shards=num_shards,
            doc_shuffle_buffer=self.doc_shuffle_buffer,
            max_passes=None if comp.replay else self.max_passes,
            policy=self.policy,
            warn_passes=self.warn_passes,
            planned_blocks=planned,
        )

    def blocks(self, shard: int, num_shards: int) -> Iterator[dict[str, Any]]:
        """The full stream of one shard, from its first block."""
        comps = self.components()
        sources = [self.source_stream(c.index, shard, num_shards, comps) for c in comps]
        self.read_stats[shard] = [s.stats for s in sources]
        streams = [s.blocks() for s in sources]
        # Take each source's first block now: a source too small for this shard fails at the start,
        # naming itself, not whenever the draw first picks it (maybe never, for a tiny weight).
        streams = [itertools.chain([next(s)], s) for s in streams]
        mixed = interleave(streams, comps, rng(self.seed, SOURCE_DRAW, shard, num_shards))
        # Block-level shuffle after mixing: consecutive blocks of one source are consecutive slices
        # of one document (a CRAFT article spans ~70 blocks of 128 tokens); without this a batch
        # would hold neighbouring slices of one article and its gradient would be correlated.
        return buffer_shuffle(mixed, self.shuffle_buffer, rng(self.seed, BLOCK_SHUFFLE, shard, num_shards))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        shard, num_shards = shard_of(self.rank, self.world_size, rotate=self.start_batch)
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        worker_shard = shard - self.rank * workers  # the worker whose turns this shard takes
        skip = self.start_block + blocks_before(self.start_batch, self.batch_size, worker_shard, workers)
        return itertools.islice(self.blocks(shard, num_shards), skip, None)


def collate_blocks(blocks: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack blocks: ``input_ids`` / ``word_starts`` [batch, block], ``source`` [batch] when tagged."""
    out = {
        "input_ids": torch.from_numpy(np.stack([b["input_ids"] for b in blocks])),
        "word_starts": torch.from_numpy(np.stack([b["word_starts"] for b in blocks])),
    }
    if all("source" in b for b in blocks):
        out["source"] = torch.tensor([int(b["source"]) for b in blocks], dtype=torch.long)
    return out
