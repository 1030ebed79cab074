"""``PackedCorpusDataModule``: streamed, packed, sharded training blocks + fixed-mask held-out sets.

Training data is an endless ``IterableDataset`` (training length is ``trainer.max_steps``) that mixes
the training sources (and replay sources) by weight from the first block, each source shuffled at
document level and cycling through its own passes (``dapt.data.mixing`` says why and how). Documents
are split across DDP ranks × dataloader workers within each source, so within a pass no block is
seen twice, every shard mixes every source, and ranks never wait on each other for an epoch end.
Masking happens in ``on_after_batch_transfer`` where the optimizer step is known (rate schedules)
and the batch is already on its device; that hook also counts tokens trained per source.

Held-out sets come in two splits: ``dev`` (validated every ``val_check_interval``; what early
stopping and sweeps select on) and ``test`` (scored once before and once after training, the numbers
reported). Each split has a ``domain`` and a ``general`` (forgetting) set, sampled across the whole
split and masked once with a fixed seed (``dapt.data.heldout``), so every evaluation of every run sees
identical masks and perplexities are comparable across steps and runs.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, get_worker_info

from dapt.data.heldout import build_heldout_set
from dapt.data.mixing import (
    BLOCK_SHUFFLE,
    SOURCE_DRAW,
    Component,
    SourceStream,
    buffer_shuffle,
    components,
    interleave,
    rng,
    source_names,
)
from dapt.data.packing import BlockPacker
from dapt.data.quality import QualityPolicy, ReadStats
from dapt.data.sources import SourceConfig, as_source, check_nonempty, describe, scan_prefix
from dapt.errors import ConfigError
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
        eval_tokens: token budget of each test set, filled with documents sampled across the whole
            split (``dapt.data.heldout``; a split smaller than the budget is used whole); it sets
            the width of the reported perplexity CIs.
        dev_eval_tokens: the same for the dev sets (null = ``eval_tokens``). Dev sets are scored at
            every ``val_check_interval``, so a smaller budget keeps runs short; changes between arms
            are paired on the same documents and stay narrow.
        eval_max_doc_tokens: truncate held-out documents to this many tokens (null = whole
            documents), so that long documents (papers) do not eat the budget.
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
        mask_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.masker = masker
        self._eval_masker = eval_masker
        self.data_dir = data_dir
        self.seed = seed
        self.mask_seed = seed if mask_seed is None else mask_seed  # training masks; the stream uses ``seed``
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
            doc_shuffle_buffer=config.doc_shuffle_buffer,
            seed=seed,
            docs_per_batch=config.docs_per_batch,
            max_passes=config.max_passes,
            replay=[as_source(s, f"data.replay[{i}]") for i, s in enumerate(config.replay)],
            replay_fraction=config.replay_fraction,
            policy=config.quality_policy,
            warn_passes=config.warn_passes,
        )
        self.train_stream.batch_size = config.batch_size
        self._prefix_stats: dict[str, ReadStats] = {}
        self.eval_sets: dict[str, dict[str, TensorDataset]] = {}
        self.eval_info: dict[str, dict[str, dict[str, int]]] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._token_counts: dict[str, torch.Tensor] = {}  # per device, so counting never syncs it
        self._restored_counts: dict[str, int] = {}
        self._batches = 0  # training batches masked so far (the stream position a checkpoint records)
        self._restored_generators: dict[str, torch.Tensor] = {}

    @property
    def eval_masker(self) -> Masker:
        """The held-out masker: ``eval_strategy`` at ``eval_rate``, never the training rate. Built from
        the training masker's config when none was given (and only then: a data module without
        held-out sets, such as base preparation's, never needs one)."""
        if self._eval_masker is None:
            from dataclasses import asdict

            from dapt.masking import build_eval_masker

            self._eval_masker = build_eval_masker(asdict(self.masker.config), self.tokenizer)
        return self._eval_masker

    @property
    def eval_names(self) -> list[str]:
        """Names of the dev sets, in ``val_dataloader`` order."""
        return list(self.eval_sources["dev"])

    @property
    def test_names(self) -> list[str]:
        """Names of the test sets, in ``test_dataloader`` order."""
        return list(self.eval_sources["test"])

    def eval_budget(self, split: str) -> int:
        """Token budget of the ``dev`` or ``test`` held-out sets."""
        if split == "dev" and self.config.dev_eval_tokens is not None:
            return self.config.dev_eval_tokens
        return self.config.eval_tokens

    def heldout_fingerprint(self) -> dict[str, Any]:
        """Everything that determines the held-out sets (cache key of a cached model's perplexities)."""
        import hashlib
        from dataclasses import asdict

        from dapt.versioning import file_digest

        return {
            "sources": {split: {n: describe([s], self.data_dir) for n, s in srcs.items()} for split, srcs in self.eval_sources.items()},
            "block_size": self.config.max_seq_length,
            "eval_tokens": {split: self.eval_budget(split) for split in EVAL_SPLITS},
            "eval_max_doc_tokens": self.config.eval_max_doc_tokens,
            "eval_sample_seed": self.config.eval_sample_seed,
            "masker": asdict(self.eval_masker.config),
            "masker_stats": file_digest(stats) if (stats := getattr(self.eval_masker.strategy, "stats_file", None)) else None,
            "tokenizer": hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest(),
        }

    def skip_batches(self, batches: int) -> None:
        """Start training after a rank's first ``batches`` batches (exact resume, control arms).

        Each dataloader worker skips the blocks it delivered in those batches (``blocks_before``);
        ``batches`` counts dataloader batches, i.e. optimizer steps × ``accumulate_grad_batches``.
        """
        if batches < 0:
            raise ValueError(f"skip_batches({batches})")
        self.train_stream.start_batch = batches
        self.train_stream.batch_size = self.config.batch_size

    def plan_batches(self, batches: int) -> None:
        """Tell the stream how many batches a rank will take (optimizer steps × accumulation), so
        that the repetition warning can say how many times a small corpus will be repeated."""
        self.train_stream.planned_batches = batches

    def check_inputs(self) -> None:
        """Fail fast, before any model work, on a missing or empty corpus, unusable weights, binary
        files or a bad-record fraction over ``data.max_bad_fraction`` in the first
        ``data.check_records`` records of each training/replay source."""
        policy = self.config.quality_policy
        check_nonempty(self.train_sources, self.data_dir, "training", policy)
        if self.train_stream.replay_fraction > 0:
            check_nonempty(self.train_stream.replay, self.data_dir, "replay", policy)
        for comp in self.train_stream.components():
            log.info("training mix: %s p=%.4f", comp.name, comp.probability)
            self._prefix_stats[comp.name] = scan_prefix(comp.source, self.data_dir, policy, self.config.check_records)
        for split, sources in self.eval_sources.items():
            for name, source in sources.items():
                check_nonempty([source], self.data_dir, f"{name} {split}", policy)

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
                        max_tokens=self.eval_budget(split),
                        sample_seed=self.config.eval_sample_seed,
                        mask_seed=cfg.eval_seed,
                        max_doc_tokens=self.config.eval_max_doc_tokens,
                        policy=self.config.quality_policy,
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
        # Each loader gets its own generator: a DataLoader iterator draws its base seed from the global
        # torch RNG otherwise, so every mid-training validation would shift the dropout masks of all
        # later steps and a run's training would depend on val_check_interval.
        # Under DDP each rank scores a disjoint slice of every set: Lightning's default DistributedSampler
        # pads by repeating blocks, which would count some documents twice in perplexity and its CI.
        world = self.trainer.world_size if self.trainer is not None else 1
        loaders = []
        for ds in self.eval_sets[split].values():
            sampler = UnrepeatedDistributedSampler(ds, num_replicas=world, rank=self.trainer.global_rank, shuffle=False) if world > 1 else None
            loaders.append(DataLoader(ds, batch_size=self.config.eval_batch_size, shuffle=False, sampler=sampler,
                                      generator=torch.Generator().manual_seed(0)))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("dev")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self._generators[key] = torch.Generator(device=device).manual_seed(self.mask_seed * 1_000_003 + rank)
            if key in self._restored_generators:
                self._generators[key].set_state(self._restored_generators.pop(key))
        return self._generators[key]

    def _count_tokens(self, batch: dict[str, torch.Tensor]) -> None:
        source = batch["source"]
        key = str(source.device)
        counts = self._token_counts.get(key)
        if counts is None:
            counts = self._token_counts[key] = torch.zeros(len(self.train_stream.source_names), dtype=torch.long, device=source.device)
        # index_add_ (not bincount/.item()) so that counting never waits on the device
        counts.index_add_(0, source, torch.full_like(source, batch["input_ids"].shape[1]))

    def tokens_per_source(self) -> dict[str, int]:
        """Tokens (special tokens included) of the training batches delivered so far, per source name.

        Names are the sources' paths (``replay:<path>`` for replay). Under DDP each rank counts
        the batches of its own shards; sum over ranks for the run's total.
        """
        names = self.train_stream.source_names
        total = [self._restored_counts.get(name, 0) for name in names]
        for counts in self._token_counts.values():
            for i, n in enumerate(counts.tolist()):
                total[i] += int(n)
        return dict(zip(names, total))

    def data_quality(self) -> dict[str, dict[str, Any]]:
        """Per training/replay source name: records read, documents yielded, skipped records by
        reason, undecodable records, passes started, first bad record, and ``scope``.

        ``scope`` is ``stream`` when the counts are what this process's training stream read (every
        pass so far; a shard reads all of a source's records, so shard 0's counts describe it), or
        ``prefix`` when only ``check_inputs``'s bounded scan ran here (dataloader workers > 0 read
        in their own processes, whose counts do not come back).
        """
        out: dict[str, dict[str, Any]] = {}
        streamed = self.train_stream.read_stats[min(self.train_stream.read_stats)] if self.train_stream.read_stats else []
        for stats in streamed:
            out[stats.name] = {**stats.as_dict(), "scope": "stream"}
        for name, stats in self._prefix_stats.items():
            out.setdefault(name, {**stats.as_dict(), "scope": "prefix"})
        return out

    def all_ranks_tokens_per_source(self) -> dict[str, int]:
        """``tokens_per_source`` summed over DDP ranks (a collective: call it on every rank)."""
        from dapt.distributed import all_ranks_sum

        counts = self.tokens_per_source()
        return dict(zip(counts, all_ranks_sum(list(counts.values()))))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the data exactly: the number of training batches
        consumed (the stream is a pure function of its seed, so this is its position, mixing and
        replay included), the masking generators' states, and the tokens counted per source."""
        from dapt.distributed import with_all_ranks

        return with_all_ranks({  # under DDP, every rank's own (a collective: Lightning calls this on every rank)
            "tokens_per_source": self.tokens_per_source(),
            "batches": self._batches,
            "mask_generators": {key: gen.get_state() for key, gen in self._generators.items()},
        })

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next training batch is the one after the checkpoint's last, masked as it would
        have been. Under DDP each rank takes its own counts and generator states."""
        from dapt.distributed import RANKS_KEY, own_rank_state, rank_and_world

        saved_ranks = state_dict.get(RANKS_KEY)
        rank, world = rank_and_world()
        own = own_rank_state(state_dict, "data stream and masking generators")
        self._restored_counts = dict(own.get("tokens_per_source", {}))
        written_by = len(saved_ranks) if saved_ranks is not None else 1
        if written_by != world:  # resumed on another number of ranks: keep the run's total, counted once
            totals: dict[str, int] = {}
            for part in saved_ranks or [state_dict]:
                for name, n in (part.get("tokens_per_source") or {}).items():
                    totals[name] = totals.get(name, 0) + int(n)
            self._restored_counts = totals if rank == 0 else {}
        self._token_counts = {}
        self._batches = int(own.get("batches", 0))
        self.skip_batches(self._batches)
        self._generators = {}
        self._restored_generators = {str(k): v for k, v in (own.get("mask_generators") or {}).items()}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "word_starts" in batch:
            if "source" in batch:
                self._count_tokens(batch)
            step = self.trainer.global_step if self.trainer is not None else 0
            self._batches += 1
            ids = batch["input_ids"]
            return self.masker(ids, batch["word_starts"], self._generator(ids.device), step=step)
        if isinstance(batch, (list, tuple)) and len(batch) == 3:  # held-out TensorDataset batch
            return {"input_ids": batch[0], "labels": batch[1], "doc_ids": batch[2]}
        return batch
