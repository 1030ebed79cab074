"""Weighted interleaving of training sources: the block stream that DAPT actually trains on.

Why this module exists: the training stream used to read its sources one after another through a
2,048-block shuffle buffer, so a 300-step run (4,800 blocks) of ``data=biomed`` never saw a CRAFT
block, ``data=biomed_large`` trained on exactly the blocks of ``data=biomed`` for its first ~1,000
steps, and ``data=cs`` reached ICLR only after all of ACL. A published "DAPT on corpus X" number
must come from a stream that is corpus X's mixture from the first step.

Design (each choice serves a property the experiments rely on):

- **One packer per source.** Every source (domain and replay) is tokenized and packed on its own,
  so each block belongs to exactly one source and carries its index (``block["source"]``): the
  data module counts tokens per source, and the share of a source is a share of blocks.
- **Weighted draw per block.** The source of each next block is drawn from the normalised weights
  (``resolve_weights``: explicit ``SourceConfig.weight`` or, when none is set, the sources' sizes
  in bytes) with a generator seeded by ``(seed, shard)``. Replay sources are more components of
  the same draw: together they get ``replay_fraction`` of the probability, the domain sources the
  rest.
- **Independent cycling.** Each source runs its own passes: a small source starts a new pass (a new
  document order) while a large one continues. ``max_passes`` bounds each domain source; a domain
  source that has done its passes leaves the draw (the others are renormalised, the replay share is
  kept) and the stream ends when every domain source is done. Replay sources cycle without bound.
- **Document-level shuffle.** Per pass, the files of a directory/glob source are permuted (one
  permutation per (seed, source, pass), shared by all shards so shards stay a partition), the
  documents are sharded ``i % shards``, and each shard's documents go through a bounded streaming
  shuffle buffer seeded by (seed, source, pass, shard): a different order every pass, every document
  exactly once per pass, memory O(buffer) documents.
- **Deterministic seeding.** Every generator comes from ``numpy.random.SeedSequence`` over integer
  keys (``rng``), never from ``hash()`` (Python salts string hashes per process): the stream is a
  pure function of (sources, weights, seed, shard, shard count) and reproduces in any process.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np

from dapt.data.packing import BlockPacker
from dapt.data.quality import QualityPolicy, ReadStats
from dapt.data.sources import SourceConfig, iter_pass_documents, permutes_files, source_files, source_size
from dapt.errors import ConfigError, DataError

T = TypeVar("T")
log = logging.getLogger(__name__)

# Purposes: distinct integer keys so that no two random streams share a seed sequence.
FILE_ORDER, DOC_SHUFFLE, SOURCE_DRAW, BLOCK_SHUFFLE = 1, 2, 3, 4
_DRAW_CHUNK = 1024  # uniforms drawn per call; fixed, so draws never depend on how many were used


def rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the integer ``keys`` (not on the process)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, *(int(k) for k in keys)]))


class _Uniforms:
    """Uniform [0, 1) draws from ``gen``, fetched in fixed-size chunks (numpy calls are the cost)."""

    def __init__(self, gen: np.random.Generator) -> None:
        self.gen = gen
        self.buf = np.empty(0)
        self.pos = 0

    def next(self) -> float:
        if self.pos == len(self.buf):
            self.buf, self.pos = self.gen.random(_DRAW_CHUNK), 0
        self.pos += 1
        return float(self.buf[self.pos - 1])


def buffer_shuffle(items: Iterator[T], size: int, gen: np.random.Generator) -> Iterator[T]:
    """Approximate shuffle with O(size) memory (the standard streaming shuffle buffer).

    The first ``size`` items fill the buffer; then each new item replaces a uniformly chosen buffered
    one, which is yielded; the remainder is yielded in a random permutation. With fewer than
    ``size`` items this is an exact uniform permutation.
    """
    if size <= 1:
        yield from items
        return
    draws = _Uniforms(gen)
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = min(int(draws.next() * size), size - 1)
        yield buf[j]
        buf[j] = item
    for j in gen.permutation(len(buf)):
        yield buf[j]


def resolve_weights(sources: Sequence[SourceConfig], data_dir: str | None, prefix: str) -> list[float]:
    """Mixing probabilities of ``sources`` (summing to 1).

    Explicit weights when every source sets one, otherwise sizes in bytes (``source_size``); setting
    some but not all is ambiguous and raises ``ConfigError`` naming ``<prefix>[i].weight``.
    """
    if not sources:
        return []
    if len(sources) == 1:
        return [1.0]
    explicit = [s.weight for s in sources]
    if any(w is not None for w in explicit):
        missing = [i for i, w in enumerate(explicit) if w is None]
        if missing:
            raise ConfigError(
                f"{prefix}[{missing[0]}].weight is unset while other {prefix} sources set one: "
                "set a weight on every source, or on none (weights then follow source sizes)"
            )
        raw = [float(w) for w in explicit if w is not None]
    else:
        raw = []
        for i, source in enumerate(sources):
            size = source_size(source, data_dir)
            if size is None:
                raise ConfigError(
                    f"{prefix}[{i}].weight is required: a {source.type} source has no file size to weight it "
                    f"by, so set {prefix}[i].weight on every source of {prefix}"
                )
            raw.append(size)
    total = sum(raw)
    if total <= 0:
        raise DataError(f"{prefix} sources are all empty files: {', '.join(s.path for s in sources)}")
    return [w / total for w in raw]


def source_names(sources: Sequence[SourceConfig], replay: Sequence[SourceConfig] = ()) -> list[str]:
    """Readable, unique names in block ``source`` index order: the path, ``replay:<path>`` for replay."""
    names = [s.path for s in sources] + [f"replay:{s.path}" for s in replay]
    # e.g. two parts of one file: suffix the index so that counts never merge
    return [name if names.count(name) == 1 else f"{name}#{i}" for i, name in enumerate(names)]


@dataclass(frozen=True)
class Component:
    """One source of the mixture: its block index, readable name and draw probability."""

    index: int
    source: SourceConfig
    name: str
    probability: float
    replay: bool


def components(
    sources: Sequence[SourceConfig],
    data_dir: str | None,
    *,
    replay: Sequence[SourceConfig] = (),
    replay_fraction: float = 0.0,
) -> list[Component]:
    """Domain sources then replay sources, with probabilities: replay gets ``replay_fraction``.

    Replay sources are left out entirely when ``replay_fraction`` is 0.
    """
    replay = list(replay) if replay_fraction > 0 else []
    domain_w = resolve_weights(sources, data_dir, "data.train")
    replay_w = resolve_weights(replay, data_dir, "data.replay")
    share = replay_fraction if replay else 0.0
    names = source_names(sources, replay)
    out = [Component(i, s, names[i], (1 - share) * w, False) for i, (s, w) in enumerate(zip(sources, domain_w))]
    n = len(sources)
    out += [Component(n + i, s, names[n + i], share * w, True) for i, (s, w) in enumerate(zip(replay, replay_w))]
    return out


class SourceStream:
    """The documents and blocks of one source on one shard, pass after pass."""

    def __init__(
        self,
        component: Component,
        data_dir: str | None,
        packer: BlockPacker,
        *,
        seed: int,
        shard: int,
        num_shards: int,
        doc_shuffle_buffer: int,
        max_passes: int | None,
        policy: QualityPolicy | None = None,
        warn_passes: int | None = None,
        planned_blocks: int | None = None,
    ) -> None:
        self.component = component
        self.data_dir = data_dir
        self.packer = packer
        self.seed = seed
        self.shard = shard
        self.num_shards = num_shards
        self.doc_shuffle_buffer = doc_shuffle_buffer
        self.max_passes = max_passes
        self.warn_passes = warn_passes
        self.planned_blocks = planned_blocks  # blocks this shard will deliver in the run, when known
        # Counts every record this stream reads, over all its passes (results.json data_quality).
        self.stats = ReadStats(component.name, policy or QualityPolicy())

    def file_order(self, pass_index: int) -> list[int] | None:
        """This pass's permutation of the source's files (the same on every shard), or None."""
        source = self.component.source
        if not permutes_files(source, self.data_dir):
            return None
        n = len(source_files(source, self.data_dir))
        return [int(i) for i in rng(self.seed, FILE_ORDER, self.component.index, pass_index).permutation(n)]

    def documents(self, pass_index: int) -> Iterator[str]:
        """This shard's documents of pass ``pass_index``, in this pass's shuffled order."""
        docs = iter_pass_documents(
            self.component.source,
            self.data_dir,
            shard_index=self.shard,
            num_shards=self.num_shards,
            file_order=self.file_order(pass_index),
            stats=self.stats,
        )
        gen = rng(self.seed, DOC_SHUFFLE, self.component.index, pass_index, self.shard)
        return buffer_shuffle(docs, self.doc_shuffle_buffer, gen)

    def blocks(self) -> Iterator[dict[str, Any]]:
        """Blocks tagged with ``source``; ends after ``max_passes`` passes (None: never)."""
        passes = range(self.max_passes) if self.max_passes else itertools.count()
        first_pass_blocks = 0
        for pass_index in passes:
            if pass_index == self.warn_passes and self.shard == 0:
                self._warn_repeated(first_pass_blocks)
            self.stats.passes = pass_index + 1
            n = 0
            for block in self.packer.pack(self.documents(pass_index)):
                block["source"] = self.component.index
                n += 1
                yield block
            if n == 0:
                what = "replay" if self.component.replay else "training"
                raise DataError(
                    f"{what} source {self.component.name} produced no full block of {self.packer.block_size} tokens "
                    f"on shard {self.shard}/{self.num_shards}: it is empty or too small for this many ranks × workers"
                )
            if pass_index == 0:
                first_pass_blocks = n

    def _warn_repeated(self, pass_blocks: int) -> None:
        """One warning (shard 0 only) when the stream starts reading the source a (warn_passes+1)-th time.

        Why: a tiny corpus cycled for many passes trains a model that memorises it; the run
        "succeeds" and its perplexities mean little. The estimate of total passes needs the planned
        length of the run (``planned_blocks``), which the data module gets from the trainer.
        """
        tokens = pass_blocks * self.packer.block_size * self.num_shards
        planned = ""
        if self.planned_blocks is not None and pass_blocks > 0:
            repeats = self.planned_blocks * self.component.probability / pass_blocks
            planned = f", ~{repeats:.0f} times in the requested steps"
        log.warning(
            "the corpus of %s (~%d tokens) is being repeated: pass %d starts%s; use a bigger corpus or fewer "
            "steps (data.warn_passes=%d sets when this warns)",
            self.component.name, tokens, (self.warn_passes or 0) + 1, planned, self.warn_passes or 0,
        )


def interleave(streams: Sequence[Iterator[T]], comps: Sequence[Component], gen: np.random.Generator) -> Iterator[T]:
    """Draw the component of each next item by probability until every domain stream is exhausted.

    A finished domain stream leaves the draw: the remaining domain components are renormalised to
    their joint share and the replay share is unchanged. Replay streams are endless.
    """
    draws = _Uniforms(gen)
    active = [True] * len(comps)

    def cumulative() -> np.ndarray:
        domain_total = sum(c.probability for c, a in zip(comps, active) if a and not c.replay)
        domain_share = sum(c.probability for c in comps if not c.replay)
        p = np.array(
            [
                0.0 if not a else c.probability if c.replay else c.probability * domain_share / domain_total
                for c, a in zip(comps, active)
            ]
        )
        return np.cumsum(p / p.sum())

    cum = cumulative()
    while any(a and not c.replay for c, a in zip(comps, active)):
        k = min(int(np.searchsorted(cum, draws.next(), side="right")), len(comps) - 1)
        item = next(streams[k], None)
        if item is None:
            active[k] = False
            if any(a and not c.replay for c, a in zip(comps, active)):
                cum = cumulative()
            continue
        yield item
