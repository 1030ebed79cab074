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
    bytes: int = 0          # UTF-8 bytes of the sampled text (tokens per byte: the corpus-size estimate)
    capped: bool = False    # True when max_documents stopped the sample before the corpus ended

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("top_words")
        return out


def profile(documents: Iterable[str], tokenizer: Any, *, max_documents: int = 2000, top_k: int = 10_000) -> CorpusProfile:
    """Profile up to ``max_documents`` documents (streamed; memory O(vocabulary))."""
    counts: Counter[str] = Counter()
    seen: set[bytes] = set()
    docs = dups = short = bad = words = tokens = alpha = chars = nbytes = 0
    capped = False
    backend = tokenizer.backend_tokenizer
    batch: list[str] = []

    def flush() -> None:
        nonlocal tokens
        if batch:
            tokens += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
            batch.clear()

    for doc in documents:
        if docs >= max_documents:
            capped = True
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
        nbytes += len(doc.encode("utf-8", "replace"))
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
        bytes=nbytes,
        capped=capped,
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


# ----------------------------------------------------------------------------- findings

MIN_DOCUMENTS = 10
MIN_TOKENS = 1000
DSP_MIN_TOKENS = 2.1e9           # the smallest Don't Stop Pretraining DAPT corpus
SMALL_CORPUS_FRACTION = 0.01     # below 1% of it: "far below published DAPT scale"
MAX_EPOCHS = 10.0
DSP = "Don't Stop Pretraining (Gururangan et al. 2020; ../shared/REFERENCES.md)"


def check_sample(sample: CorpusProfile, *, what: str, key: str, where: str,
                 min_documents: int = MIN_DOCUMENTS, min_tokens: int = MIN_TOKENS) -> None:
    """A one-line ``DataError`` for an empty or too-small sample: no statistic of 3 documents means anything."""
    from dapt.errors import DataError

    if sample.documents == 0 or sample.tokens == 0:
        raise DataError(f"{key}: the {what} corpus is empty (no text in {where or 'no source'}); nothing to diagnose")
    if sample.documents < min_documents or sample.tokens < min_tokens:
        raise DataError(f"{key}: the {what} corpus is too small to diagnose ({sample.documents} documents, {sample.tokens:,} tokens "
                        f"in {where}; need at least {min_documents} documents and {min_tokens:,} tokens)")


def profile_findings(domain: CorpusProfile, *, overlap: float, domain_fragmentation: float, general_fragmentation: float,
                     scope: str = "data.train") -> list[Any]:
    """The sample-statistics findings: exact duplicates, noise, undecodable bytes, vocabulary overlap, fragmentation."""
    from dapt.diagnostics.findings import Finding

    out: list[Any] = []

    def add(check: str, bad: bool, severity: str, title_bad: str, title_ok: str, measured: dict[str, Any],
            threshold: dict[str, Any], why: str, overrides: list[str] | None = None) -> None:
        out.append(Finding(check, severity if bad else "ok", title_bad if bad else title_ok, measured, threshold, why,
                           list(overrides or []) if bad else [], scope))

    dup = domain.duplicate_documents
    add("corpus.exact_duplicates", dup > 0.05, "warning",
        f"{dup:.1%} of sampled domain documents are exact duplicates: deduplicate the corpus",
        f"{dup:.1%} exact duplicate documents", {"share": dup, "documents": domain.documents}, {"share": 0.05},
        "Repeated documents are trained on several times per pass, the corpus is smaller than it looks and repeats are "
        "memorized (Lee et al. 2022, Deduplicating Training Data); 5% matches the near-duplicate check.")
    noise = domain.non_alpha_share
    add("corpus.noise", noise > 0.3, "warning",
        f"{noise:.0%} of characters are neither letters nor spaces: PDF, table or markup debris? Clean the text",
        f"{noise:.1%} non-letter characters", {"non_alpha_share": noise, "short_documents": domain.short_documents},
        {"non_alpha_share": 0.3},
        "Prose has ~5% digits and punctuation (4.6% in a 300-document OHSUMED sample, 4.3% in Wikipedia, measured by "
        "dapt doctor on ../shared/data); 30% means tables, formulas or extraction debris that the MLM spends its steps predicting.")
    bad = domain.replacement_chars
    add("corpus.replacement_chars", bad > 0, "warning",
        f"{bad} undecodable characters (U+FFFD) in the sample: check the files' encoding",
        "no undecodable characters", {"replacement_chars": bad, "sampled_bytes": domain.bytes}, {"replacement_chars": 0},
        "U+FFFD marks bytes that were not UTF-8 (dapt.data.sources keeps such records with replacements): the text was "
        "read with the wrong encoding, and every replaced character is noise for the tokenizer.")
    add("corpus.vocabulary_overlap", overlap > 0.8, "warning",
        f"the domain's top-10K words overlap general text by {overlap:.0%}: the domain is close to what the model knows, "
        "expect small DAPT gains", f"top-10K vocabulary overlap with general text {overlap:.0%} (a real domain shift)",
        {"overlap_top10k": overlap}, {"overlap_top10k": 0.8},
        f"{DSP}, Fig. 2: DAPT helped most where the domain's top-10K vocabulary overlapped the pretraining data least "
        "(BioMed, CS); on News, the closest domain, DAPT gained nothing on AGNews (93.9 -> 93.9).")
    ratio = domain_fragmentation / max(general_fragmentation, 1e-9)
    add("corpus.fragmentation", domain_fragmentation > 2.5, "info",
        f"domain terms split into {domain_fragmentation:.1f} sub-tokens on average (common general words: "
        f"{general_fragmentation:.1f}): try vocabulary extension or a domain-vocabulary model",
        f"domain terms split into {domain_fragmentation:.1f} sub-tokens on average",
        {"domain_term_fragmentation": domain_fragmentation, "general_word_fragmentation": general_fragmentation, "ratio": ratio},
        {"domain_term_fragmentation": 2.5},
        "Adaptive tokenization (Sachidananda et al. 2021; ../shared/REFERENCES.md) recovered ~97% of DAPT's gain by adding "
        "10K domain tokens; words shredded into 3+ pieces are where a larger vocabulary helps.",
        ["vocabulary=extend", "model=pubmedbert"])
    return out


def planned_tokens(cfg: Any) -> dict[str, Any]:
    """Training tokens a composed config plans: ``max_steps x batch_size x max_seq_length x accumulate x devices``,
    and the domain corpus's share of them, ``domain_tokens = planned_tokens x (1 - data.replay_fraction)``
    (replay blocks are general text: they make no pass over the domain corpus)."""
    trainer = cfg.trainer
    accumulate = int(trainer.get("accumulate_grad_batches") or 1)
    devices = trainer.get("devices")
    devices = int(devices) if isinstance(devices, int) and devices > 0 else 1
    tokens_per_step = int(cfg.data.batch_size) * int(cfg.data.max_seq_length) * accumulate * devices
    replay = float(cfg.data.get("replay_fraction") or 0.0) if cfg.data.get("replay") else 0.0
    planned = int(trainer.max_steps) * tokens_per_step
    return {"steps": int(trainer.max_steps), "tokens_per_step": tokens_per_step, "planned_tokens": planned,
            "replay_fraction": replay, "domain_tokens": int(round(planned * (1.0 - replay))),
            "accumulate_grad_batches": accumulate, "devices": devices}


def size_findings(sample: CorpusProfile, plan: dict[str, int], *, corpus_tokens: float, estimated: bool, method: str,
                  scope: str = "data.train", max_epochs: float = MAX_EPOCHS) -> list[Any]:
    """Epochs the plan makes over the corpus (> ``max_epochs``: warning) and the corpus size against published DAPT.

    Passes count only the domain share of the plan (``plan["domain_tokens"]``, without replay) when given."""
    from dapt.diagnostics.findings import Finding

    domain_planned = plan.get("domain_tokens", plan["planned_tokens"])
    share = domain_planned / max(plan["planned_tokens"], 1)
    epochs = domain_planned / max(corpus_tokens, 1.0)
    measured = {"sample_documents": sample.documents, "sample_tokens": sample.tokens, "sample_capped": sample.capped,
                "corpus_tokens": int(corpus_tokens), "corpus_tokens_estimated": estimated, "corpus_tokens_method": method,
                **plan, "epochs": epochs}
    est = "~" if estimated else ""
    why_epochs = (f"{DSP}: DAPT ran 12.5K steps x batch 2048 (sequences up to 512 tokens) over 2.1-8.1B-token corpora, "
                  "a few passes at most; repeating a small corpus many times over-fits it (held-out domain perplexity "
                  "rises while training loss falls) and increases forgetting. TAPT's 100 epochs are over task text, with early "
                  "stopping on the task, not DAPT.")
    out = []
    if epochs > max_epochs:
        target = max(1, int(3 * corpus_tokens / max(plan["tokens_per_step"] * share, 1)))
        replay = f" ({domain_planned:,} of them domain text, the rest replay)" if share < 1 else ""
        out.append(Finding("corpus.epochs", "warning",
                           f"{plan['steps']:,} steps x {plan['tokens_per_step']:,} tokens = {plan['planned_tokens']:,} tokens{replay}, "
                           f"{epochs:.0f} passes over a {est}{corpus_tokens:,.0f}-token corpus: over-fitting risk, train fewer steps "
                           "or find more domain text", measured, {"epochs": max_epochs}, why_epochs,
                           [f"trainer.max_steps={target}"], scope))
    else:
        out.append(Finding("corpus.epochs", "ok", f"{epochs:.2f} passes over the {est}{corpus_tokens:,.0f}-token corpus",
                           measured, {"epochs": max_epochs}, why_epochs, [], scope))
    small = DSP_MIN_TOKENS * SMALL_CORPUS_FRACTION
    why_scale = (f"{DSP} used 2.1-8.1B-token corpora (BioMed 7.55B, CS 8.10B); at 1% of the smallest, gains measured here "
                 "are not comparable to the published ones (and more steps mean more passes, see corpus.epochs).")
    if corpus_tokens < small:
        out.append(Finding("corpus.size", "info",
                           f"the domain corpus has {est}{corpus_tokens:,.0f} tokens, {corpus_tokens / DSP_MIN_TOKENS:.3%} of the "
                           "smallest Don't Stop Pretraining corpus: expect smaller DAPT gains than published",
                           measured, {"corpus_tokens": small}, why_scale, [], scope))
    else:
        out.append(Finding("corpus.size", "ok", f"the domain corpus has {est}{corpus_tokens:,.0f} tokens", measured,
                           {"corpus_tokens": small}, why_scale, [], scope))
    return out
