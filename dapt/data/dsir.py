"""DSIR: data selection by importance resampling over hashed n-grams (Xie et al. 2023).

Given a small *target* sample (a downstream task's unlabeled train text) and a large *raw* corpus,
DSIR picks the raw documents that look most like the target. Both are modelled as bags of hashed
n-grams (lowercased word unigrams and bigrams hashed into ``buckets`` bins), each a categorical
distribution with add-one smoothing. A raw document ``x`` gets the log importance weight

    log w(x) = sum over its n-grams of  count * (log p_target(ngram) - log p_raw(ngram)),

the log-likelihood ratio of the two bag-of-n-gram models, and ``size`` documents are resampled
without replacement with probability proportional to ``w`` by the Gumbel-top-k trick: the ``size``
largest ``log w + Gumbel(0, 1)`` keys are an exact sample without replacement, so it can be drawn in
one streaming pass with a bounded heap (memory O(size), never the corpus).

The weight is a sum over a document's n-grams, so it scales with length: a long document that looks
like the target gets a far larger weight than a short one, and at the weights' magnitudes the Gumbel
noise hardly matters, making the draw close to a length-favouring top-k. The DSIR paper resamples
fixed-length chunks, where this does not arise; here the units are documents, as the corpus gives them.

Pure data-level code (stdlib + numpy): the raw corpus arrives as an iterable the caller streams
(``dapt.data.sources.iter_documents``), read twice: once to fit ``p_raw``, once to score and
resample. Hashing uses BLAKE2b, never Python's ``hash()`` (salted per process), so a selection is a
pure function of (target, corpus, buckets, size, seed) and reproduces across processes and machines.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

DEFAULT_BUCKETS = 10_000
# Gumbel noise is drawn in chunks (one generator call per chunk, not per document); the chunking does
# not change which number a document gets: the k-th document always receives the k-th draw.
_GUMBEL_CHUNK = 4096
_WORD = re.compile(r"\w+")


def ngram_ids(text: str, buckets: int = DEFAULT_BUCKETS) -> list[int]:
    """The hashed unigram and bigram ids of ``text`` (one entry per occurrence, so repeats count).

    Words are lowercased ``\\w+`` runs: cheap, tokenizer-free features, as in DSIR, where the
    importance weights only need to separate domains, not model language well. Bigrams are hashed
    as ``"w1 w2"``, so they never collide with a unigram by construction of the string (only by the
    hash, like any two n-grams, with probability about 1/``buckets``).
    """
    if buckets < 1:
        raise ValueError(f"buckets={buckets} must be >= 1")
    words = _WORD.findall(text.lower())
    grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
    return [_bucket(g, buckets) for g in grams]


def _bucket(gram: str, buckets: int) -> int:
    """A stable bucket for ``gram`` (BLAKE2b, not the per-process salted ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little") % buckets


def fit_log_probs(texts: Iterable[str], buckets: int = DEFAULT_BUCKETS) -> tuple[np.ndarray, int]:
    """Log probabilities of a bag-of-hashed-n-grams model of ``texts``, and how many texts it saw.

    Add-one (Laplace) smoothing: every bucket gets one pseudo-count, so an n-gram the target never
    showed has a finite log probability and a raw document is never weighted ``-inf`` for one unseen
    bigram. Streams ``texts`` once; memory is ``buckets`` counters whatever the corpus size.
    """
    counts = np.zeros(buckets, dtype=np.float64)
    n = 0
    for text in texts:
        ids = ngram_ids(text, buckets)
        if ids:
            counts += np.bincount(np.asarray(ids, dtype=np.int64), minlength=buckets)
        n += 1
    counts += 1.0
    return np.log(counts) - np.log(counts.sum()), n


def log_importance_weight(text: str, log_ratio: np.ndarray) -> float | None:
    """``sum(count * (log p_target - log p_raw))`` over the n-grams of ``text``; None when it has none.

    ``log_ratio`` is ``log p_target - log p_raw`` per bucket. A document without a single word has no
    evidence either way; it is skipped rather than given weight 0, which would rank it above every
    document that merely looks more like the raw corpus than the target.
    """
    ids = ngram_ids(text, len(log_ratio))
    if not ids:
        return None
    return float(log_ratio[np.asarray(ids, dtype=np.int64)].sum())


@dataclass(frozen=True)
class SelectedDocument:
    """One resampled document: its position in the raw stream, its text and its log importance weight."""

    index: int
    text: str
    log_weight: float


def _gumbel_stream(seed: int) -> Iterator[float]:
    """An endless stream of standard Gumbel draws from a seeded numpy ``Generator``."""
    rng = np.random.default_rng(seed)
    while True:
        yield from rng.gumbel(size=_GUMBEL_CHUNK).tolist()


def importance_resample(
    texts: Iterable[str], log_ratio: np.ndarray, size: int, *, seed: int = 0
) -> tuple[list[SelectedDocument], dict[str, float | int]]:
    """Resample ``size`` documents of ``texts`` without replacement, with probability ∝ importance weight.

    Gumbel-top-k: each document gets the key ``log w + G`` with ``G ~ Gumbel(0, 1)`` (the k-th scored
    document gets the generator's k-th draw, so the sample depends only on the seed and the stream's
    order); the ``size`` largest keys are distributed exactly as sequential sampling without
    replacement by weight. A min-heap of the ``size`` best keys so far keeps memory O(size) in one
    pass. Returns the selected documents in stream order, and stats: ``scanned`` (documents read),
    ``skipped_empty`` (no words), ``selected``, and the mean log weight of the selected and of all
    scored documents (how much more target-like the selection is than the corpus).
    """
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    heap: list[tuple[float, int, str, float]] = []  # (key, index, text, log_weight); heap[0] is the worst kept
    gumbel = _gumbel_stream(seed)
    scanned = skipped = 0
    total_weight = 0.0
    for index, text in enumerate(texts):
        scanned += 1
        weight = log_importance_weight(text, log_ratio)
        if weight is None:
            skipped += 1
            continue
        total_weight += weight
        key = weight + next(gumbel)
        item = (key, index, text, weight)
        if len(heap) < size:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    selected = sorted((SelectedDocument(index=i, text=t, log_weight=w) for _, i, t, w in heap), key=lambda d: d.index)
    scored = scanned - skipped
    stats: dict[str, float | int] = {
        "scanned": scanned,
        "skipped_empty": skipped,
        "selected": len(selected),
        "mean_log_weight_selected": float(np.mean([d.log_weight for d in selected])) if selected else float("nan"),
        "mean_log_weight_all": total_weight / scored if scored else float("nan"),
    }
    return selected, stats


def dsir_select(
    target_texts: Iterable[str],
    raw_texts: Callable[[], Iterable[str]],
    size: int,
    *,
    buckets: int = DEFAULT_BUCKETS,
    seed: int = 0,
) -> tuple[list[SelectedDocument], dict[str, float | int]]:
    """DSIR end to end: fit the target and raw n-gram models, then importance-resample ``size`` raw docs.

    ``raw_texts`` is called twice and must yield the same documents in the same order each time (a
    fresh ``iter_documents`` stream): the first pass fits ``p_raw`` on the very documents that are
    then scored, the second scores and resamples them. Stats as ``importance_resample``'s, plus
    ``target_documents`` and ``buckets``.
    """
    log_target, n_target = fit_log_probs(target_texts, buckets)
    if n_target == 0:
        raise ValueError("DSIR needs at least one target text")
    log_raw, n_raw = fit_log_probs(raw_texts(), buckets)
    selected, stats = importance_resample(raw_texts(), log_target - log_raw, size, seed=seed)
    if stats["scanned"] != n_raw:
        raise RuntimeError(f"the raw stream changed between passes ({n_raw} then {stats['scanned']} documents)")
    stats.update({"target_documents": n_target, "buckets": buckets})
    return selected, stats
