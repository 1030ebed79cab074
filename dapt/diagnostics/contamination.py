"""Task contamination: is a downstream task's dev or test text inside the adaptation corpus?

DAPT on a corpus that contains a task's evaluation text is training on the test set: masked-LM
pretraining on the exact sentences later scored inflates the downstream gain DAPT is credited with.
Task-adaptive corpora (TAPT, kNN-TAPT, DSIR selections, scraped domain text) make this easy to do by
accident. The method follows the n-gram overlap audits of GPT-3 (Brown et al. 2020, 13-grams) and
later LM papers, at 8 words to fit sentence-length task examples:

- the task side is small: every dev/test example is split into lowercase word 8-grams, each hashed
  to a 64-bit integer (a rolling polynomial over stable per-word BLAKE2b hashes; never Python's
  salted ``hash()``), collected into one sorted array (``task_ngrams``);
- the WHOLE training corpus is streamed once (``matched_ngrams``) and only the task n-grams seen in
  some document are kept: memory is bounded by the task side, not by the corpus, so the check does
  not depend on the sample the other statistics use;
- an evaluation example is *contaminated* when at least half of its 8-grams occur in the corpus;
  an example shorter than 8 words has no 8-gram and is not checked (counted in ``too_short``);
- per split: the share of contaminated examples and the overall share of its 8-grams in the corpus.

Callers pass plain strings (NER sentences as their tokens joined by spaces); reading the tasks is the
caller's business (``dapt.commands.doctor`` reads them through ``dapt.evaluation``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from dapt.diagnostics.findings import Finding

_WORD = re.compile(r"\w+")
NGRAM = 8
EXAMPLE_THRESHOLD = 0.5     # an example is contaminated when this share of its n-grams is in the corpus
SPLIT_THRESHOLD = 0.01      # a split is flagged when this share of its examples is contaminated
_MULT = np.uint64(1099511628211)  # FNV-64 prime: the rolling hash's base (uint64 arithmetic wraps)

WHY = ("Evaluation text seen during pretraining inflates the downstream score DAPT is credited with "
       "(GPT-3, Brown et al. 2020, audited benchmarks by n-gram overlap and reported contaminated subsets "
       "separately); an example with at least half its word 8-grams in the corpus was very probably in it. "
       "Chance overlap is far below 1% of a split's examples: ncbi_disease's test set against a 300-document "
       "OHSUMED sample of ../shared/data shares 0.01% of its 8-grams and no example.")


class _WordHasher:
    """Stable 64-bit hashes of words, memoised (a corpus sample has few distinct words)."""

    def __init__(self) -> None:
        self._cache: dict[str, int] = {}

    def __call__(self, words: Sequence[str]) -> np.ndarray:
        cache = self._cache
        out = np.empty(len(words), dtype=np.uint64)
        for i, w in enumerate(words):
            h = cache.get(w)
            if h is None:
                h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i] = h
        return out


def words(text: str) -> list[str]:
    """Lowercase word tokens (``\\w+``), the unit of the n-grams."""
    return _WORD.findall(text.lower())


def ngram_hashes(text: str, n: int = NGRAM, hasher: _WordHasher | None = None) -> np.ndarray:
    """The 64-bit hashes of ``text``'s lowercase word ``n``-grams, in order (empty when shorter than ``n``)."""
    ws = words(text)
    if len(ws) < n:
        return np.empty(0, dtype=np.uint64)
    w = (hasher or _WordHasher())(ws)
    m = len(ws) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _MULT + w[k:k + m]
    return h


def corpus_ngrams(documents: Iterable[str], n: int = NGRAM, max_documents: int | None = None) -> np.ndarray:
    """The sorted, unique n-gram hashes of up to ``max_documents`` streamed documents."""
    hasher = _WordHasher()
    parts: list[np.ndarray] = []
    for i, doc in enumerate(documents):
        if max_documents is not None and i >= max_documents:
            break
        h = ngram_hashes(doc, n, hasher)
        if h.size:
            parts.append(np.unique(h))
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)


def task_ngrams(texts: Iterable[str], n: int = NGRAM) -> np.ndarray:
    """The sorted, unique n-gram hashes of the task examples ``texts`` (the small side of the check)."""
    hasher = _WordHasher()
    parts = [h for h in (ngram_hashes(t, n, hasher) for t in texts) if h.size]
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)


@dataclass
class CorpusScan:
    """What ``matched_ngrams`` read: the task n-grams found, documents read, and whether a cap stopped it."""

    matched: np.ndarray
    documents: int
    capped: bool


def matched_ngrams(documents: Iterable[str], task: np.ndarray, n: int = NGRAM, max_documents: int | None = None) -> CorpusScan:
    """Stream ``documents`` (all of them unless ``max_documents``) and keep the hashes of ``task`` (sorted,
    from ``task_ngrams``) that occur in any of them: memory O(task n-grams) however large the corpus."""
    hasher = _WordHasher()
    seen: set[int] = set()
    count, capped = 0, False
    for doc in documents:
        if max_documents is not None and count >= max_documents:
            capped = True
            break
        count += 1
        if not task.size:
            continue
        h = ngram_hashes(doc, n, hasher)
        if h.size:
            pos = np.minimum(np.searchsorted(task, h), task.size - 1)
            hit = h[task[pos] == h]
            if hit.size:
                seen.update(int(x) for x in np.unique(hit))
        if len(hasher._cache) > 2_000_000:  # a huge corpus's vocabulary: keep the memo bounded
            hasher = _WordHasher()
    matched = np.array(sorted(seen), dtype=np.uint64) if seen else np.empty(0, dtype=np.uint64)
    return CorpusScan(matched=matched, documents=count, capped=capped)


@dataclass
class SplitOverlap:
    """The overlap of one task split with the corpus.

    Attributes:
        examples: examples in the split; checked: those with at least one n-gram; too_short: the rest.
        contaminated: checked examples with >= ``example_threshold`` of their n-grams in the corpus.
        contaminated_share: ``contaminated / checked``.
        ngram_overlap: share of all the split's n-grams (with repeats) found in the corpus.
        examples_found: up to 3 contaminated examples (index, overlap, first 80 characters).
    """

    examples: int
    checked: int
    too_short: int
    contaminated: int
    contaminated_share: float
    ngram_overlap: float
    n: int = NGRAM
    example_threshold: float = EXAMPLE_THRESHOLD
    examples_found: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def split_overlap(corpus: np.ndarray, texts: Sequence[str], *, n: int = NGRAM,
                  example_threshold: float = EXAMPLE_THRESHOLD) -> SplitOverlap:
    """How much of ``texts`` (one split's examples) is inside the corpus: ``corpus`` is a sorted n-gram
    hash array, either every corpus n-gram (``corpus_ngrams``) or the task n-grams the corpus contains
    (``matched_ngrams(...).matched``): both give the same answer."""
    hasher = _WordHasher()
    checked = contaminated = total = hits = 0
    found: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        h = ngram_hashes(text, n, hasher)
        if not h.size:
            continue
        checked += 1
        if corpus.size:
            pos = np.searchsorted(corpus, h)
            present = int((corpus[np.minimum(pos, corpus.size - 1)] == h).sum())
        else:
            present = 0
        total += h.size
        hits += present
        share = present / h.size
        if share >= example_threshold:
            contaminated += 1
            if len(found) < 3:
                found.append({"index": index, "overlap": round(share, 3), "text": text[:80]})
    return SplitOverlap(examples=len(texts), checked=checked, too_short=len(texts) - checked, contaminated=contaminated,
                        contaminated_share=contaminated / max(checked, 1), ngram_overlap=hits / max(total, 1), n=n,
                        example_threshold=example_threshold, examples_found=found)


def contamination_finding(task: str, split: str, overlap: SplitOverlap, *, threshold: float = SPLIT_THRESHOLD,
                          capped: str | None = None, corpus: str = "the adaptation corpus", scope_suffix: str = "",
                          measured_extra: dict[str, Any] | None = None) -> Finding:
    """One task split's finding: ``error`` for a contaminated test split, ``warning`` for dev,
    ``info`` for a few contaminated examples below ``threshold``, ``ok`` when none.

    ``capped`` (e.g. "checked 1,000 of ~5,000 documents"): the corpus was not read to its end, so a
    clean result is ``info`` saying so, never ``ok``; contamination found in the part read still counts."""
    measured = {**overlap.as_dict(), **(measured_extra or {})}
    limits = {"contaminated_share": threshold, "example_ngram_share": overlap.example_threshold, "ngram": overlap.n}
    scope = f"task {task} {split}{scope_suffix}"
    if overlap.checked == 0:
        return Finding("corpus.contamination", "info", f"task {task} {split}: no example has {overlap.n} words; contamination not checked",
                       measured, limits, WHY, [], scope)
    if overlap.contaminated_share >= threshold:
        severity = "error" if split == "test" else "warning"
        title = (f"task {task} {split}: {overlap.contaminated_share:.1%} of examples ({overlap.contaminated}/{overlap.checked}) "
                 f"are inside {corpus}: remove them from the corpus"
                 + (" (test scores would be inflated)" if split == "test" else " (dev selection would favour memorization)"))
        return Finding("corpus.contamination", severity, title, measured, limits, WHY, [], scope)
    note = f" ({capped}: a lower bound)" if capped else ""
    if overlap.contaminated:
        return Finding("corpus.contamination", "info",
                       f"task {task} {split}: {overlap.contaminated} example(s) overlap {corpus}, below {threshold:.0%}{note}",
                       measured, limits, WHY, [], scope)
    if capped:
        return Finding("corpus.contamination", "info",
                       f"task {task} {split}: no example inside {corpus} as far as checked ({capped}; "
                       f"{overlap.ngram_overlap:.2%} of 8-grams shared): the rest was not checked",
                       measured, limits, WHY, [], scope)
    return Finding("corpus.contamination", "ok",
                   f"task {task} {split}: no example inside {corpus} ({overlap.ngram_overlap:.2%} of 8-grams shared)",
                   measured, limits, WHY, [], scope)
