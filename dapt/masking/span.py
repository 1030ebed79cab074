"""SpanBERT span masking: contiguous runs of whole words, lengths from a clipped geometric law.

Joshi et al. (2020) draw span lengths (in words) from Geometric(p=0.2) clipped at 10 (mean 3.8)
and mask spans until 15% of tokens are covered; predicting a whole span forces the model to use
context beyond the immediate neighbours. Here each row's words are cut into consecutive segments
with i.i.d. lengths from that law (re-cut at every separator, so a span never joins two
documents), and segments are drawn uniformly without replacement until the token budget is met
(``select_units``). Spans therefore never overlap; two chosen spans may be adjacent, as in SpanBERT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dapt.errors import ConfigError
from dapt.masking.base import MaskingConfig, MaskingInput, MaskingStrategy, register
from dapt.masking.units import WordTable, select_units, token_budget, units_from_starts


@dataclass
class SpanMaskingConfig(MaskingConfig):
    """Span-length law.

    Attributes:
        geometric_p: success probability of the geometric law (SpanBERT: 0.2). 1.0 gives one-word
            spans, i.e. whole-word masking.
        max_span_words: clip (the law is truncated at this length and renormalised, as in SpanBERT's
            code: mean 3.8 words for p=0.2, max 10).
    """

    name: str = "span"
    geometric_p: float = 0.2
    max_span_words: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.geometric_p <= 1.0:
            raise ConfigError(f"masking.geometric_p={self.geometric_p} must be in (0, 1]")
        if self.max_span_words < 1:
            raise ConfigError(f"masking.max_span_words={self.max_span_words} must be >= 1")


def sample_span_lengths(shape: tuple[int, ...], p: float, max_len: int, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw lengths from the truncated geometric law by inverting its CDF (vectorised, seeded)."""
    if p >= 1.0 or max_len == 1:
        return torch.ones(shape, dtype=torch.long, device=device)
    u = torch.rand(shape, generator=generator, device=device)
    tail = 1.0 - (1.0 - p) ** max_len  # mass of 1..max_len before renormalising
    lengths = torch.ceil(torch.log1p(-u * tail) / math.log1p(-p))
    return lengths.clamp(1, max_len).long()


@register("span")
class SpanMasking(MaskingStrategy):
    """Random geometric segmentation of each row's words, then segments until the token budget."""

    config_class = SpanMaskingConfig

    def units(self, batch: MaskingInput, generator: torch.Generator) -> torch.Tensor:
        """``[batch, word]`` span id of every word (-1 for absent words), a fresh segmentation per call."""
        return self._segment(WordTable.build(batch.word_ids), generator)

    def _segment(self, table: WordTable, generator: torch.Generator) -> torch.Tensor:
        cfg = self.config
        batch_size, seq = table.word_ids.shape
        device = table.word_ids.device
        lengths = sample_span_lengths((batch_size, seq), cfg.geometric_p, cfg.max_span_words, generator, device)
        ends = lengths.cumsum(1)  # exclusive end word of each segment; seq segments always cover seq words
        word_index = torch.arange(seq, device=device).expand(batch_size, seq).contiguous()
        segment = torch.searchsorted(ends, word_index, right=True)
        new_segment = segment != torch.nn.functional.pad(segment[:, :-1], (1, 0), value=-1)
        return units_from_starts(new_segment | table.gap_before, table.valid)

    def select(self, batch: MaskingInput, rate: float, generator: torch.Generator) -> torch.Tensor:
        table = WordTable.build(batch.word_ids)
        unit_of_token = table.to_tokens(self._segment(table, generator), fill=-1)
        keys = torch.rand(batch.word_ids.shape, generator=generator, device=batch.word_ids.device)
        return select_units(unit_of_token, keys, token_budget(batch.maskable, rate), generator)
