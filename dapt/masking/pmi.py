"""PMI-Masking (Levine et al. 2021): collocations of the domain corpus are masked as one unit.

Random or whole-word masking lets the model recover "bypass" from "coronary artery [MASK]
grafting" by local co-occurrence alone; masking the whole collocation forces it to use the wider
context. Units are the n-grams (2..``max_ngram`` words) of a vocabulary ranked by ``PMI_n`` on the
domain corpus (``dapt.masking.ngrams``); words outside any vocabulary n-gram are units on their own.
Units are drawn uniformly without replacement until the token budget is met, as in the paper.

Finding the n-grams of a packed block is vectorised: hash every word's token ids, combine them into
n-gram hashes, look each up in the sorted vocabulary hashes (``searchsorted``), then resolve overlaps
longest-first (see ``PMIMasking.units``). No Python loop runs over tokens at training time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from dapt.errors import ConfigError
from dapt.masking.base import MaskingConfig, MaskingContext, MaskingInput, MaskingStrategy, register
from dapt.masking.corpus_stats import CorpusStatsConfig, TokenizedCorpus, load_or_compute_stats
from dapt.masking.ngrams import MIN_N, build_ngram_vocabulary
from dapt.masking.units import SortedHashes, WordTable, ngram_hashes, select_units, token_budget, units_from_starts, word_hashes

log = logging.getLogger(__name__)

KIND = "pmi_ngrams"


@dataclass
class PMIMaskingConfig(CorpusStatsConfig, MaskingConfig):
    """N-gram vocabulary knobs (the vocabulary is computed from the domain corpus, then cached).

    Attributes:
        max_ngram: longest unit in words (paper: 5).
        min_count: an n-gram must occur this often in the sample; PMI of rare n-grams is noise.
        min_pmi: keep n-grams whose ``PMI_n`` (nats) is at least this: at 4, an n-gram occurs >= e^4
            ~ 55x more often than its most likely decomposition predicts.
        vocab_size: keep at most this many n-grams, best PMI first.
    """

    name: str = "pmi"
    max_ngram: int = 5
    min_count: int = 10
    min_pmi: float = 4.0
    vocab_size: int = 50_000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_caps()
        if not MIN_N <= self.max_ngram <= 10:
            raise ConfigError(f"masking.max_ngram={self.max_ngram} must be in [{MIN_N}, 10]")
        if self.min_count < 2:
            raise ConfigError(f"masking.min_count={self.min_count} must be >= 2")
        if self.vocab_size < 1:
            raise ConfigError(f"masking.vocab_size={self.vocab_size} must be >= 1")

    def stats_params(self) -> dict[str, Any]:
        """What the vocabulary depends on (the cache key), besides tokenizer and corpus text."""
        return {"max_ngram": self.max_ngram, "min_count": self.min_count, "min_pmi": self.min_pmi,
                "vocab_size": self.vocab_size, "max_documents": self.stats_max_documents,
                "max_words": self.stats_max_words}


def compute_ngram_vocabulary(config: PMIMaskingConfig, context: MaskingContext) -> tuple[dict[str, Any], str]:
    """Load or compute (and cache) the n-gram vocabulary. Returns ``(data, path)``."""
    if not config.stats_path and (context.tokenizer is None or context.domain_documents is None):
        raise ConfigError(
            "masking=pmi needs the domain corpus to compute its n-gram vocabulary "
            "(MaskingContext.domain_documents) or a precomputed masking.stats_path"
        )

    def build(corpora: list[TokenizedCorpus]) -> Any:
        return build_ngram_vocabulary(corpora[0], context.tokenizer, max_n=config.max_ngram, min_count=config.min_count,
                                      vocab_size=config.vocab_size, min_pmi=config.min_pmi)

    return load_or_compute_stats(KIND, config, context.tokenizer, context.cache_dir, [context.domain_documents], build)


@register("pmi")
class PMIMasking(MaskingStrategy):
    """Units = vocabulary n-grams (longest first) or single words; units uniformly until the budget.

    The vocabulary is loaded or computed at construction (start-up), never inside a DataLoader worker.
    """

    config_class = PMIMaskingConfig

    def __init__(self, config: PMIMaskingConfig, context: MaskingContext | None = None) -> None:
        super().__init__(config, context)
        data, self.stats_file = compute_ngram_vocabulary(config, context or MaskingContext())
        self.entries: list[dict[str, Any]] = data["entries"]
        self.vocabulary = SortedHashes(e["hash"] for e in self.entries)

    def units(self, batch: MaskingInput) -> torch.Tensor:
        """``[batch, word]`` unit id of every word (-1 for absent words). Deterministic.

        For n = max..2, an n-gram occurrence becomes a unit if its hash is in the vocabulary, its
        words are contiguous in one document and none is already in a longer unit. Among
        overlapping matches of the same length the leftmost wins (one that overlaps an earlier
        *candidate* is dropped even if that candidate itself lost; rare, and it keeps this a fixed
        number of tensor ops).
        """
        table = WordTable.build(batch.word_ids)
        word_hash = word_hashes(batch.input_ids, table)
        covered = torch.zeros_like(table.valid)
        inside = torch.zeros_like(table.valid)  # a non-first word of an accepted n-gram
        grams = ngram_hashes(word_hash, table, self.config.max_ngram)
        for n in range(self.config.max_ngram, MIN_N - 1, -1):
            hashed, ok = grams[n - 1]
            cand = ok & self.vocabulary.contains(hashed)
            cand &= _window_sum(covered.long(), n) == 0
            accept = cand & (_earlier_within(cand, n) == 0)
            span = _window_cover(accept, n)
            inside |= span & ~accept
            covered |= span
        return units_from_starts(table.valid & ~inside, table.valid)

    def select(self, batch: MaskingInput, rate: float, generator: torch.Generator) -> torch.Tensor:
        table = WordTable.build(batch.word_ids)
        unit_of_token = table.to_tokens(self.units(batch), fill=-1)
        keys = torch.rand(batch.word_ids.shape, generator=generator, device=batch.word_ids.device)
        return select_units(unit_of_token, keys, token_budget(batch.maskable, rate), generator)


def _shift_right(x: torch.Tensor, k: int) -> torch.Tensor:
    """``out[:, i] = x[:, i - k]``, zero-padded (all zeros when ``k >= seq``)."""
    k = min(k, x.shape[1])
    return torch.nn.functional.pad(x[:, : x.shape[1] - k], (k, 0))


def _window_sum(x: torch.Tensor, n: int) -> torch.Tensor:
    """``out[:, i] = x[:, i:i+n].sum()`` (forward window; positions past the end count 0)."""
    c = torch.nn.functional.pad(x.cumsum(1), (1, 0))
    hi = torch.arange(x.shape[1], device=x.device) + n
    return c[:, hi.clamp(max=x.shape[1])] - c[:, : x.shape[1]]


def _earlier_within(starts: torch.Tensor, n: int) -> torch.Tensor:
    """``out[:, i]`` = number of True in ``starts[:, i-n+1 : i]`` (the n-1 positions before i)."""
    c = starts.long().cumsum(1)
    return _shift_right(c, 1) - _shift_right(c, n)


def _window_cover(starts: torch.Tensor, n: int) -> torch.Tensor:
    """True at every position within ``n`` words after (and including) a True start."""
    c = starts.long().cumsum(1)
    return (c - _shift_right(c, n)) > 0
