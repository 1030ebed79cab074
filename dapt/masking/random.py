"""Uniform random token masking (BERT), with an exact-in-expectation rate per sequence."""

from __future__ import annotations

import torch

from dapt.masking.base import MaskingInput, MaskingStrategy, register
from dapt.masking.selection import exact_count_selection, stochastic_round


@register("random")
class RandomTokenMasking(MaskingStrategy):
    """Each row masks ``rate × n_maskable`` tokens (stochastically rounded), chosen uniformly.

    Fixing the count per row (instead of a Bernoulli draw per token) keeps the rate exact in
    expectation with less variance, so short eval sets give stabler perplexities.
    """

    def select(self, batch: MaskingInput, rate: float, generator: torch.Generator) -> torch.Tensor:
        n_maskable = batch.maskable.sum(1).to(torch.float32)
        counts = stochastic_round(n_maskable * rate, generator)
        scores = torch.rand(batch.input_ids.shape, generator=generator, device=batch.input_ids.device)
        return exact_count_selection(scores, batch.maskable, counts)
