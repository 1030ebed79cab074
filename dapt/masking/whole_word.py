"""Whole-word masking: every sub-token of a chosen word is masked together.

Words are the fast tokenizer's words (``word_ids()``, carried by packed blocks as ``word_starts``),
never a ``##`` / ``Ġ`` / ``▁`` prefix test, so the same strategy is correct for WordPiece, byte-level
BPE and SentencePiece. Masking a word piece by piece lets the model fill ``##tension`` from
``hyper`` without learning anything about the context; masking whole words removes that shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dapt.masking.base import MaskingConfig, MaskingInput, MaskingStrategy, register
from dapt.masking.units import select_units, token_budget


@dataclass
class WholeWordMaskingConfig(MaskingConfig):
    """No knobs beyond the shared ones: the rate counts tokens, the units are words."""

    name: str = "whole_word"


@register("whole_word")
class WholeWordMasking(MaskingStrategy):
    """Words drawn uniformly without replacement until ``rate x maskable tokens`` is met.

    The word that crosses the budget is kept with the probability that makes the expected masked
    token count exactly ``rate x maskable`` (see ``select_units``), so the rate is comparable with
    token-level random masking even though long words are masked as a block.
    """

    config_class = WholeWordMaskingConfig

    def select(self, batch: MaskingInput, rate: float, generator: torch.Generator) -> torch.Tensor:
        keys = torch.rand(batch.word_ids.shape, generator=generator, device=batch.word_ids.device)
        return select_units(batch.word_ids, keys, token_budget(batch.maskable, rate), generator)
