"""Sparse MLM prediction: run the vocabulary projection only on masked positions.

For small and medium encoders the decoder (hidden × vocab) is most of the compute: with 15% masking,
projecting all positions wastes ~85% of it. The MLM heads of BERT-, RoBERTa- and DistilBERT-style
models are position-wise, so applying them to the gathered ``[n_masked, hidden]`` states gives the
same logits as the dense head at those positions (``tests/test_sparse_head.py`` checks the loss).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from dapt.labels import IGNORE_INDEX


def mlm_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The position-wise head mapping hidden states to vocabulary logits, or None if unknown."""
    for name in ("cls", "lm_head", "generator_lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return head
    if hasattr(model, "vocab_projector"):  # DistilBERT splits its head into attributes

        def distil_head(hidden: torch.Tensor) -> torch.Tensor:
            x = model.vocab_transform(hidden)
            x = model.activation(x)
            x = model.vocab_layer_norm(x)
            return model.vocab_projector(x)

        return distil_head
    return None


def sparse_mlm_loss(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    encoder: Callable[..., Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLM cross-entropy computed on masked positions only.

    Returns ``(loss, logits[n_masked, vocab], targets[n_masked])``. Falls back to the model's dense
    forward for architectures whose head is not known to be position-wise. ``encoder`` replaces
    ``model.base_model`` (e.g. its ``torch.compile`` wrapper: the encoder sees fixed ``[batch, seq]``
    shapes and compiles once, while the head sees a varying number of masked rows and stays eager).
    """
    selected = labels != IGNORE_INDEX
    targets = labels[selected]
    head = mlm_head(model)
    if head is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        logits = out.logits[selected]
    else:
        hidden = (encoder if encoder is not None else model.base_model)(input_ids=input_ids, attention_mask=attention_mask)[0]
        picked = hidden[selected]
        device = picked.device.type
        if not model.training and torch.is_autocast_enabled(device):
            # Evaluation under bf16 autocast: the vocabulary projection in fp32, so a reported
            # perplexity is not rounded to bf16's 8-bit mantissa at the logits (cheap: forward only,
            # masked rows only). Training keeps the autocast head, as mixed-precision training does.
            with torch.autocast(device, enabled=False):
                logits = head(picked.float())
        else:
            logits = head(picked)
    loss = F.cross_entropy(logits.float(), targets, reduction=reduction)
    return loss, logits, targets


def dense_mlm_loss(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference: the model's own dense forward and loss (every position projected)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
