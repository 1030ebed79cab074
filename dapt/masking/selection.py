"""The primitives every masking strategy shares: choosing an exact number of positions, rounding a
rate to a count without bias, the 80/10/10 corruption, and the rate a batch actually got.

Strategies differ only in *which* units they score; these make the counts and the corruption the
same for all of them, so an ablation compares strategies and not their bookkeeping.
"""

from __future__ import annotations

import math

import torch

from dapt.labels import IGNORE_INDEX


def achieved_rate(labels: torch.Tensor, maskable: torch.Tensor) -> float:
    """Fraction of maskable tokens that carry a label: the rate a batch actually got.

    Logged next to the configured rate so a strategy whose units make it over- or under-shoot is
    visible in the run, not only in the tests.
    """
    n = int(maskable.sum())
    if n == 0:
        return 0.0
    return float(((labels != IGNORE_INDEX) & maskable.bool()).sum()) / n


def exact_count_selection(scores: torch.Tensor, eligible: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Select, per row, the ``counts[row]`` eligible positions with the lowest ``scores``.

    Vectorised: one sort per batch. Used to pick tokens (random masking) or units (words, spans).
    """
    scores = scores.masked_fill(~eligible, math.inf)
    order = scores.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return (ranks < counts.unsqueeze(1)) & eligible


def stochastic_round(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round to an integer so that the expectation is exact (``E[round(x)] = x``)."""
    floor = values.floor()
    frac = values - floor
    u = torch.rand(values.shape, generator=generator, device=values.device)
    return (floor + (u < frac).to(values.dtype)).long()


def apply_corruption(
    input_ids: torch.Tensor,
    selected: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    mask_fraction: float,
    random_fraction: float,
    generator: torch.Generator,
    random_token_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the selected positions and return ``(inputs, labels)``.

    Labels are the original ids at selected positions and ``-100`` elsewhere. Of the selected
    positions, ``mask_fraction`` become ``[MASK]``, ``random_fraction`` a random token (drawn from
    ``random_token_ids`` when given, so special tokens never appear as noise), the rest keep theirs.
    """
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    inputs = input_ids.clone()
    u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    to_mask = selected & (u < mask_fraction)
    to_random = selected & (u >= mask_fraction) & (u < mask_fraction + random_fraction)
    inputs[to_mask] = mask_token_id
    n_random = int(to_random.sum())
    if n_random:
        if random_token_ids is not None:
            idx = torch.randint(len(random_token_ids), (n_random,), generator=generator, device=input_ids.device)
            inputs[to_random] = random_token_ids.to(input_ids.device)[idx]
        else:
            inputs[to_random] = torch.randint(vocab_size, (n_random,), generator=generator, device=input_ids.device)
    return inputs, labels
