"""Held-out MLM perplexity with a bootstrap confidence interval over documents.

A perplexity from one held-out sample is an estimate: another sample of documents from the same
split would give another number. Masked tokens of one document are not independent (same topic,
same vocabulary), so the interval resamples *documents* (a cluster bootstrap): each replicate draws
the split's documents with replacement and recomputes ``exp(sum of losses / masked tokens)``.
``HeldoutPerplexity`` keeps each masked token's loss, correctness and document id (a few hundred KB
per set), synchronised across ranks by concatenation, so the interval is computed from exactly the
tokens the point estimate used.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


def document_sums(doc_ids: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-document (loss sum, masked-token count) for the documents that have masked tokens."""
    _, inverse = np.unique(doc_ids, return_inverse=True)
    sums = np.bincount(inverse, weights=losses)
    counts = np.bincount(inverse).astype(np.float64)
    return sums, counts


def bootstrap_perplexity_ci(
    loss_sums: np.ndarray,
    counts: np.ndarray,
    *,
    level: float = 0.95,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile CI of ``exp(Σ loss / Σ count)`` resampling documents with replacement.

    ``loss_sums``/``counts`` hold one entry per document. With a single document there is nothing to
    resample and the interval is ``(nan, nan)``: the caller reports it as unknown, not as exact.
    """
    n = len(loss_sums)
    if n < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)
    mean_loss = (weights @ loss_sums) / np.maximum(weights @ counts, 1.0)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(mean_loss, [tail, 100 - tail])
    return float(math.exp(low)), float(math.exp(high))


class HeldoutPerplexity(Metric):
    """Perplexity, mean loss, masked-token accuracy and a document-bootstrap CI for one held-out set."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("losses", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("doc_ids", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor) -> None:
        """``logits[n, vocab]`` and ``targets[n]`` of the masked positions, ``doc_ids[n]`` their documents."""
        losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
        self.losses.append(losses.detach())
        self.correct.append((logits.argmax(-1) == targets).float())
        self.doc_ids.append(doc_ids.detach())

    def compute(self) -> dict[str, float]:
        if not self.losses:
            return {}
        losses = dim_zero_cat(self.losses).double().cpu().numpy()
        correct = dim_zero_cat(self.correct).double().cpu().numpy()
        docs = dim_zero_cat(self.doc_ids).cpu().numpy()
        mean_loss = float(losses.mean())
        low, high = bootstrap_perplexity_ci(*document_sums(docs, losses))
        return {
            "loss": mean_loss,
            "ppl": math.exp(mean_loss) if mean_loss < 700 else math.inf,
            "ppl_low": low,
            "ppl_high": high,
            "acc": float(correct.mean()),
            "masked_tokens": float(losses.size),
            "documents": float(len(np.unique(docs))),
        }
