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

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, TensorDataset

from dapt.data.config import DOMAIN_SET, EVAL_SET_NAMES, EVAL_SPLITS, DataConfig
from dapt.data.heldout import build_heldout_set
from dapt.data.quality import ReadStats
from dapt.data.sources import SourceConfig, as_source, check_nonempty, describe, scan_prefix
from dapt.data.stream import PackedBlockStream, collate_blocks
from dapt.masking import Masker

log = logging.getLogger(__name__)


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
        self.eval_info: dict[str, dict[str, dict[str, Any]]] = {}
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
                        # the domain's long documents only: the general sets stay the same in every run,
                        # so forgetting compares across corpus configs (data=cs truncates papers)
                        max_doc_tokens=self.config.eval_max_doc_tokens if name == DOMAIN_SET else None,
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
