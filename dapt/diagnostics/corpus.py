"""Corpus diagnostics: why might DAPT on this corpus not help?

Cheap, streamed statistics that explain common failures before any GPU hour is spent:
- **size**: domain tokens available vs what published DAPT used (2-8B tokens in Don't Stop
  Pretraining); a corpus 1000x smaller needs far fewer steps or more epochs (overfitting risk).
- **vocabulary overlap** with general text (DSP Fig. 2: overlap of the top-10K unigrams): a high
  overlap means the domain is close to what the model already knows, and gains will be small.
- **tokenizer fragmentation** (sub-tokens per word, domain vs general): a vocabulary that shreds
  domain terms is a reason to try vocabulary extension or a domain-specific model.
- **duplicates and noise**: exact duplicate documents, very short documents, replacement
  characters (undecodable bytes), non-alphabetic share (PDF debris, tables).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

WORD = re.compile(r"[A-Za-z][A-Za-z\-]+")


@dataclass
class CorpusProfile:
    documents: int
    words: int
    tokens: int
    tokens_per_word: float
    duplicate_documents: float
    short_documents: float
    replacement_chars: int
    non_alpha_share: float
    top_words: list[str]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("top_words")
        return out


def profile(documents: Iterable[str], tokenizer: Any, *, max_documents: int = 2000, top_k: int = 10_000) -> CorpusProfile:
    """Profile up to ``max_documents`` documents (streamed; memory O(vocabulary))."""
    counts: Counter[str] = Counter()
    seen: set[bytes] = set()
    docs = dups = short = bad = words = tokens = alpha = chars = 0
    backend = tokenizer.backend_tokenizer
    batch: list[str] = []

    def flush() -> None:
        nonlocal tokens
        if batch:
            tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
            batch.clear()

    for doc in documents:
        if docs >= max_documents:
            break
        docs += 1
        digest = hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=12).digest()
        dups += digest in seen
        seen.add(digest)
        ws = WORD.findall(doc.lower())
        words += len(ws)
        short += len(ws) < 20
        counts.update(ws)
        bad += doc.count("\ufffd")
        chars += len(doc)
        alpha += sum(ch.isalpha() or ch.isspace() for ch in doc)
        batch.append(doc)
        if len(batch) >= 64:
            flush()
    flush()
    return CorpusProfile(
        documents=docs,
        words=words,
        tokens=tokens,
        tokens_per_word=tokens / max(words, 1),
        duplicate_documents=dups / max(docs, 1),
        short_documents=short / max(docs, 1),
        replacement_chars=bad,
        non_alpha_share=1 - alpha / max(chars, 1),
        top_words=[w for w, _ in counts.most_common(top_k)],
    )


def vocabulary_overlap(a: CorpusProfile, b: CorpusProfile) -> float:
    """Share of the top-K unigrams two corpora have in common (DSP Fig. 2 style)."""
    sa, sb = set(a.top_words), set(b.top_words)
    return len(sa & sb) / max(min(len(sa), len(sb)), 1)


def fragmentation(words: Iterable[str], tokenizer: Any) -> float:
    """Mean sub-tokens per word for ``words`` (e.g. the domain's most distinctive terms)."""
    ws = list(words)
    if not ws:
        return 0.0
    enc = tokenizer.backend_tokenizer.encode_batch(ws, add_special_tokens=False)
    return sum(len(e.ids) for e in enc) / len(ws)


def domain_terms(domain: CorpusProfile, general: CorpusProfile, k: int = 200) -> list[str]:
    """Frequent domain words absent from the general top-K list: the terms DAPT must learn."""
    general_set = set(general.top_words)
    return [w for w in domain.top_words if w not in general_set][:k]
