"""Salient-term masking: domain terms are masked more often, the total rate is unchanged.

DAPT's gain comes from the domain's vocabulary and facts; spending more of the prediction budget on
words that distinguish the domain from general text ("ventricular", "exon", "ischemia") rather
than on "the" and "of" is the idea of entity/salient-span masking (Guu et al. 2020, Gu et al. 2020)
applied with corpus statistics instead of an NER model. Terms come from ``dapt.masking.salience``
(log-odds of domain vs general frequency). Whole words are drawn by weighted sampling without
replacement (Efraimidis-Spirakis keys ``Exp(1) / weight``, weight ``salient_weight`` for a term and
1 otherwise) until the token budget is met, so the achieved rate is exactly the configured one and
only its allocation shifts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from dapt.errors import ConfigError
from dapt.masking.base import MaskingConfig, MaskingContext, MaskingInput, MaskingStrategy, register
from dapt.masking.corpus_stats import (
    CorpusStatsConfig,
    cache_file,
    cache_key,
    check_tokenizer,
    read_json,
    single_threaded,
    take_documents,
    tokenize_corpus,
    tokenizer_fingerprint,
    write_json_atomic,
)
from dapt.masking.salience import build_salient_terms
from dapt.masking.units import HASH_VERSION, WordTable, lookup_sorted, select_units, token_budget, word_hashes

log = logging.getLogger(__name__)

KIND = "salient_terms"


@dataclass
class SalientMaskingConfig(CorpusStatsConfig, MaskingConfig):
    """Term selection and boost (caps apply to each of the domain and general samples).

    Attributes:
        salient_weight: sampling weight of a salient word relative to any other word (1 = whole-word
            masking). At 3 on the biomedical corpus a term is masked 2.6x as often as another word
            at rate 0.15 (2.2x at 0.4); terms are 31% of tokens and get 53% of the masked ones.
        min_log_odds: keep words whose smoothed log-odds ratio (nats) is at least this; 1.5 means
            about 4.5x more frequent in the domain than in general text.
        min_z: ... and whose log-odds is this many standard errors from 0 (2 ~ 95% one-sided), so a
            word seen 6 times in the domain and never elsewhere does not qualify by chance.
        min_count: ... and that occur at least this often in the domain sample.
        max_terms: keep at most this many terms, largest log-odds first.
        smoothing: pseudo-count added to both corpora's counts (Jeffreys prior 0.5).
    """

    name: str = "salient"
    salient_weight: float = 3.0
    min_log_odds: float = 1.5
    min_z: float = 2.0
    min_count: int = 5
    max_terms: int = 20_000
    smoothing: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_caps()
        if self.salient_weight < 1.0:
            raise ConfigError(f"masking.salient_weight={self.salient_weight} must be >= 1 (1 = whole-word masking)")
        if self.min_count < 1:
            raise ConfigError(f"masking.min_count={self.min_count} must be >= 1")
        if self.max_terms < 1:
            raise ConfigError(f"masking.max_terms={self.max_terms} must be >= 1")
        if self.smoothing <= 0:
            raise ConfigError(f"masking.smoothing={self.smoothing} must be > 0")

    def stats_params(self) -> dict[str, Any]:
        """What the term list depends on (the cache key), besides tokenizer and corpus texts."""
        return {"min_log_odds": self.min_log_odds, "min_z": self.min_z, "min_count": self.min_count,
                "max_terms": self.max_terms, "smoothing": self.smoothing,
                "max_documents": self.stats_max_documents, "max_words": self.stats_max_words}


def compute_salient_terms(config: SalientMaskingConfig, context: MaskingContext) -> tuple[dict[str, Any], str | None]:
    """Load or compute (and cache) the salient-term list. Returns ``(data, cache path or None)``."""
    if config.stats_path:
        data = read_json(config.stats_path, KIND)
        check_tokenizer(data, context.tokenizer, config.stats_path)
        return data, config.stats_path
    if context.tokenizer is None or context.domain_documents is None or context.general_documents is None:
        raise ConfigError(
            "masking=salient needs a domain and a general corpus to score terms "
            "(MaskingContext.domain_documents / general_documents) or a precomputed masking.stats_path"
        )
    caps = (config.stats_max_documents, config.stats_max_words)
    domain = take_documents(context.domain_documents, *caps)
    general = take_documents(context.general_documents, *caps)
    fp = tokenizer_fingerprint(context.tokenizer)
    path = cache_file(context.cache_dir, KIND, cache_key(KIND, fp, [domain.sha, general.sha], config.stats_params()))
    if path.exists():
        log.info("salient terms: cached %s", path)
        return read_json(path, KIND), str(path)
    with single_threaded():
        terms = build_salient_terms(
            tokenize_corpus(domain.documents, context.tokenizer), tokenize_corpus(general.documents, context.tokenizer),
            context.tokenizer, min_count=config.min_count, min_z=config.min_z, min_log_odds=config.min_log_odds,
            max_terms=config.max_terms, smoothing=config.smoothing,
        )
    data = {"kind": KIND, "hash_version": HASH_VERSION, "tokenizer": fp, "corpus_sha": [domain.sha, general.sha],
            "n_documents": [len(domain.documents), len(general.documents)], "params": config.stats_params(),
            **terms.meta, "entries": terms.entries}
    write_json_atomic(path, data)
    log.info("salient terms: %d terms in %.1fs -> %s", len(terms.entries), terms.meta["seconds"], path)
    return data, str(path)


@register("salient")
class SalientMasking(MaskingStrategy):
    """Whole words by weighted sampling without replacement; salient terms weigh ``salient_weight``."""

    config_class = SalientMaskingConfig

    def __init__(self, config: SalientMaskingConfig, context: MaskingContext | None = None) -> None:
        super().__init__(config, context)
        data, self.stats_file = compute_salient_terms(config, context or MaskingContext())
        self.entries: list[dict[str, Any]] = data["entries"]
        self._hashes = torch.tensor(sorted(e["hash"] for e in self.entries), dtype=torch.long)
        self._on_device: dict[str, torch.Tensor] = {}

    def term_hashes(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self._hashes.to(device)
        return self._on_device[key]

    def salient_words(self, batch: MaskingInput) -> torch.Tensor:
        """``[batch, word]`` True where the word is a salient term."""
        table = WordTable.build(batch.word_ids)
        return self._salient(batch, table)

    def _salient(self, batch: MaskingInput, table: WordTable) -> torch.Tensor:
        return lookup_sorted(word_hashes(batch.input_ids, table), self.term_hashes(batch.input_ids.device)) & table.valid

    def select(self, batch: MaskingInput, rate: float, generator: torch.Generator) -> torch.Tensor:
        table = WordTable.build(batch.word_ids)
        weight = torch.where(self._salient(batch, table), self.config.salient_weight, 1.0)
        u = torch.rand(batch.word_ids.shape, generator=generator, device=batch.word_ids.device)
        keys = -torch.log1p(-u) / weight  # Exp(1) / weight: weighted sampling without replacement
        return select_units(batch.word_ids, keys, token_budget(batch.maskable, rate), generator)
