"""The PMI n-gram vocabulary (Levine et al. 2021): which word n-grams of a corpus are collocations.

For an n-gram ``w1..wn`` the score is PMI-Masking's ``PMI_n``: the *smallest* log-ratio between
its probability and the product of the probabilities of the parts of any segmentation into >= 2
contiguous pieces,

    PMI_n(w1..wn) = log p(w1..wn) - max_{segmentation s, |s|>=2} sum_{piece in s} log p(piece).

Taking the minimum over segmentations keeps "of the" + "patients" out (it is explained by its
parts) and keeps "coronary artery bypass grafting" in. Counting is vectorised over the corpus's
n-gram hashes (``torch.unique``), so ~1.5M words take a few seconds.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from dapt.masking.corpus_stats import TokenizedCorpus, decode_word, is_wordlike
from dapt.masking.units import lookup_sorted, ngram_hashes

MIN_N = 2
# Punctuation allowed *inside* an n-gram ("beta - blockers", "t / b"); never at either end.
JOINERS = frozenset({"-", "/", "'", "+", "&"})


@dataclass
class NgramCounts:
    """Per n: sorted unique hashes, their counts, and one corpus word position where each starts."""

    hashes: torch.Tensor
    counts: torch.Tensor
    first: torch.Tensor

    def count_of(self, query: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(self.hashes, query).clamp(max=self.hashes.numel() - 1)
        found = self.hashes[idx] == query
        return torch.where(found, self.counts[idx], torch.zeros_like(query))


def count_ngrams(corpus: TokenizedCorpus, max_n: int) -> tuple[list[NgramCounts], list[torch.Tensor]]:
    """Count every n-gram (n = 1..max_n) that lies inside one document; also return the per-position hashes."""
    per_position = ngram_hashes(corpus.word_hash, corpus.table, max_n)
    positions = torch.arange(corpus.word_hash.shape[1])
    counts: list[NgramCounts] = []
    hashes_at: list[torch.Tensor] = []
    for hashed, ok in per_position:
        flat, okf = hashed[0], ok[0]
        uniq, inverse, cnt = torch.unique(flat[okf], sorted=True, return_inverse=True, return_counts=True)
        first = torch.full((uniq.numel(),), flat.numel(), dtype=torch.long)
        first.scatter_reduce_(0, inverse, positions[okf], reduce="amin")
        counts.append(NgramCounts(hashes=uniq, counts=cnt, first=first))
        hashes_at.append(flat)
    return counts, hashes_at


def pmi_scores(counts: list[NgramCounts], hashes_at: list[torch.Tensor], n: int, starts: torch.Tensor,
               total: int) -> torch.Tensor:
    """``PMI_n`` for the n-grams starting at corpus word positions ``starts`` (vectorised over them).

    Dynamic programme over split points: ``best[j]`` is the best sum of log-probabilities of any
    segmentation of the first ``j`` words; the n-gram itself is excluded as a one-piece segmentation.
    """
    log_total = math.log(total)

    def logp(offset: int, length: int) -> torch.Tensor:
        hashed = hashes_at[length - 1][starts + offset]
        return counts[length - 1].count_of(hashed).double().clamp(min=1).log() - log_total

    best = [torch.zeros(starts.numel(), dtype=torch.float64)]  # best[0] = empty prefix
    for j in range(1, n + 1):
        options = [best[k] + logp(k, j - k) for k in range(0, j) if not (k == 0 and j == n)]
        best.append(torch.stack(options).amax(0))
    return logp(0, n) - best[n]


@dataclass
class NgramVocabulary:
    """The selected n-grams: sorted hashes for training-time lookup plus readable entries."""

    hashes: torch.Tensor  # sorted int64
    entries: list[dict[str, Any]]  # text, n, count, pmi, hash; best first
    meta: dict[str, Any]


def build_ngram_vocabulary(corpus: TokenizedCorpus, tokenizer: Any, *, max_n: int, min_count: int,
                           vocab_size: int, min_pmi: float) -> NgramVocabulary:
    """Rank every wordlike n-gram (2..max_n words, >= min_count occurrences) by ``PMI_n``; keep the top.

    Wordlike: the first and last word contain a letter or digit and inner words do too or are a
    joiner (``-``, ``/``...), so "( n =" or "patients . the" never become units. Rare n-grams have
    inflated PMI, hence ``min_count``.
    """
    started = time.perf_counter()
    counts, hashes_at = count_ngrams(corpus, max_n)
    total = corpus.n_words
    # Wordlike flags for every frequent word (decode each distinct word once; rare words cannot be
    # part of an n-gram that is frequent enough to count).
    unigrams = counts[0]
    frequent = (unigrams.counts >= min_count).nonzero().flatten()
    alnum_ids, joiner_ids = [], []
    for i in frequent.tolist():
        text = decode_word(tokenizer, corpus.word_token_ids(int(unigrams.first[i])))
        if is_wordlike(text):
            alnum_ids.append(i)
        elif text in JOINERS:
            joiner_ids.append(i)
    alnum_hashes = unigrams.hashes[torch.tensor(alnum_ids, dtype=torch.long)].sort().values
    inner_hashes = unigrams.hashes[torch.tensor(alnum_ids + joiner_ids, dtype=torch.long)].sort().values

    cand_hash, cand_n, cand_count, cand_pmi, cand_start = [], [], [], [], []
    word_hash = hashes_at[0]
    for n in range(MIN_N, max_n + 1):
        table = counts[n - 1]
        keep = table.counts >= min_count
        starts = table.first[keep]
        ok = lookup_sorted(word_hash[starts], alnum_hashes) & lookup_sorted(word_hash[starts + n - 1], alnum_hashes)
        for k in range(1, n - 1):
            ok &= lookup_sorted(word_hash[starts + k], inner_hashes)
        starts = starts[ok]
        if starts.numel() == 0:
            continue
        scores = pmi_scores(counts, hashes_at, n, starts, total)
        cand_hash.append(table.hashes[keep][ok])
        cand_count.append(table.counts[keep][ok])
        cand_pmi.append(scores)
        cand_start.append(starts)
        cand_n.append(torch.full_like(starts, n))
    if cand_hash:
        all_hash, all_n = torch.cat(cand_hash), torch.cat(cand_n)
        all_count, all_pmi, all_start = torch.cat(cand_count), torch.cat(cand_pmi), torch.cat(cand_start)
        order = all_pmi.argsort(descending=True, stable=True)
        order = order[all_pmi[order] >= min_pmi][:vocab_size]
    else:
        all_hash = all_n = all_count = all_start = torch.zeros(0, dtype=torch.long)
        all_pmi = torch.zeros(0, dtype=torch.float64)
        order = torch.zeros(0, dtype=torch.long)
    entries = []
    for i in order.tolist():
        start, n = int(all_start[i]), int(all_n[i])
        words = [decode_word(tokenizer, corpus.word_token_ids(start + k)) for k in range(n)]
        entries.append({"text": " ".join(words), "n": n, "count": int(all_count[i]),
                        "pmi": round(float(all_pmi[i]), 4), "hash": int(all_hash[i])})
    hashes = all_hash[order].sort().values
    meta = {"n_words": total, "candidates": int(sum(h.numel() for h in cand_hash)),
            "by_length": {str(n): sum(1 for e in entries if e["n"] == n) for n in range(MIN_N, max_n + 1)},
            "seconds": round(time.perf_counter() - started, 2)}
    return NgramVocabulary(hashes=hashes, entries=entries, meta=meta)
