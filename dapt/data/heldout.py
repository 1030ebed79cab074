"""Held-out perplexity sets: documents sampled across a whole split, packed, masked once.

Why not "the first N blocks": a split's first blocks are a handful of neighbouring documents (58 of
4,043 OHSUMED test abstracts, three ACL papers), so perplexity measured on them varies with which
documents happen to come first far more than with the model. Here documents are drawn uniformly from
the whole split with a fixed seed until a token budget is reached (one streaming pass, memory bounded
by the budget), packed into blocks, and masked once with the eval seed, so every evaluation of every
run sees identical inputs. Every token keeps the index of its document, so the evaluation can report
a bootstrap confidence interval over documents (the independent units of a held-out corpus).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dapt.data.packing import BlockPacker
from dapt.data.quality import QualityPolicy
from dapt.data.sources import SourceConfig, iter_documents, resolve_path
from dapt.errors import DataError
from dapt.labels import IGNORE_INDEX

NO_DOCUMENT = -1  # doc id of the block's special tokens ([CLS]/[SEP] wrappers)


@dataclass
class HeldoutSample:
    """The sampled documents of one held-out split, as token arrays in sampling order."""

    ids: list[np.ndarray]
    word_starts: list[np.ndarray]
    documents_in_split: int

    @property
    def n_tokens(self) -> int:
        return int(sum(len(x) for x in self.ids))


def sample_documents(
    source: SourceConfig,
    data_dir: str | None,
    packer: BlockPacker,
    *,
    max_tokens: int,
    seed: int,
    max_doc_tokens: int | None = None,
    batch_docs: int = 256,
    policy: QualityPolicy | None = None,
) -> HeldoutSample:
    """Documents drawn uniformly at random (seeded) from the whole split until ``max_tokens``.

    Each document gets a uniform random key in stream order; the sample is the shortest prefix, in key
    order, whose tokens reach ``max_tokens``. It is kept in a heap while streaming (memory O(budget)),
    so the result equals "shuffle all documents, take them until the budget" without holding the
    corpus. ``max_doc_tokens`` truncates very long documents (full papers) so that the budget spans
    more documents, which is what narrows the confidence interval.
    """
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int, np.ndarray, np.ndarray]] = []  # (-key, index, ids, starts): max-key on top
    total = 0
    seen = 0
    docs = iter_documents(source, data_dir, policy=policy)
    while batch := list(itertools.islice(docs, batch_docs)):
        for ids, starts in packer.encode_each(batch):
            if max_doc_tokens is not None and len(ids) > max_doc_tokens:
                ids, starts = ids[:max_doc_tokens], starts[:max_doc_tokens]
            key = float(rng.random())
            seen += 1
            heapq.heappush(heap, (-key, seen, ids, starts))
            total += len(ids)
            # Drop the largest-key document while the rest still reach the budget.
            while len(heap) > 1 and total - len(heap[0][2]) >= max_tokens:
                total -= len(heapq.heappop(heap)[2])
    if not heap:
        raise DataError(f"held-out set {resolve_path(source.path, data_dir)} has no document")
    chosen = sorted(heap, key=lambda item: -item[0])
    return HeldoutSample(ids=[c[2] for c in chosen], word_starts=[c[3] for c in chosen], documents_in_split=seen)


def pack_with_documents(sample: HeldoutSample, packer: BlockPacker) -> dict[str, torch.Tensor]:
    """Concatenate the sampled documents into ``[CLS] body [SEP]`` blocks, keeping each token's doc id.

    Like training packing, a block may span a document boundary; only the final partial block is
    dropped. Special tokens get ``NO_DOCUMENT``.
    """
    ids = np.concatenate(sample.ids)
    starts = np.concatenate(sample.word_starts)
    docs = np.concatenate([np.full(len(x), i, dtype=np.int64) for i, x in enumerate(sample.ids)])
    n_blocks = len(ids) // packer.body
    if n_blocks == 0:
        raise DataError(f"held-out sample of {len(ids)} tokens is shorter than one block of {packer.block_size}")
    pre, suf = len(packer.prefix), len(packer.suffix)

    def wrap(body: np.ndarray, before: Any, after: Any) -> np.ndarray:
        body = body[: n_blocks * packer.body].reshape(n_blocks, packer.body)
        parts = [np.full((n_blocks, pre), before, dtype=body.dtype), body, np.full((n_blocks, suf), after, dtype=body.dtype)]
        return np.concatenate(parts, axis=1)

    return {
        "input_ids": torch.from_numpy(wrap(ids, packer.prefix[0] if pre else 0, packer.suffix[0] if suf else 0)),
        "word_starts": torch.from_numpy(wrap(starts, False, False)),
        "doc_ids": torch.from_numpy(wrap(docs, NO_DOCUMENT, NO_DOCUMENT)),
    }


def tensors_digest(*tensors: torch.Tensor) -> str:
    """A short content hash of tensors (dtype, shape and values, in order)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def same_heldout_set(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two recorded held-out sets (results.json ``heldout_sets`` entries) are the same tokens
    and masks: equal digests where both recorded one (runs before the digest did not), else equal
    documents, tokens and masked tokens."""
    if not a or not b:
        return False
    if a.get("digest") and b.get("digest"):
        return a["digest"] == b["digest"]
    return all(a.get(k) == b.get(k) for k in ("documents", "tokens", "masked_tokens"))


def build_heldout_set(
    source: SourceConfig,
    data_dir: str | None,
    tokenizer: Any,
    masker: Any,
    *,
    block_size: int,
    max_tokens: int,
    sample_seed: int,
    mask_seed: int,
    max_doc_tokens: int | None = None,
    policy: QualityPolicy | None = None,
) -> tuple[TensorDataset, dict[str, Any]]:
    """A fixed-mask ``TensorDataset(input_ids, labels, doc_ids)`` plus its size (documents, tokens) and
    ``digest``, a hash of the masked blocks themselves: two runs' perplexities are comparable only on
    identical tokens and masks, and a change of text that keeps the counts must still be seen."""
    packer = BlockPacker(tokenizer, block_size)
    sample = sample_documents(source, data_dir, packer, max_tokens=max_tokens, seed=sample_seed, max_doc_tokens=max_doc_tokens,
                              policy=policy)
    blocks = pack_with_documents(sample, packer)
    generator = torch.Generator().manual_seed(mask_seed)
    masked = masker(blocks["input_ids"], blocks["word_starts"], generator)
    info = {
        "documents": len(sample.ids),
        "documents_in_split": sample.documents_in_split,
        "blocks": int(blocks["input_ids"].shape[0]),
        "tokens": int(blocks["input_ids"].numel()),
        "masked_tokens": int((masked["labels"] != IGNORE_INDEX).sum()),
        "digest": tensors_digest(masked["input_ids"], masked["labels"], blocks["doc_ids"]),
    }
    return TensorDataset(masked["input_ids"], masked["labels"], blocks["doc_ids"]), info
