"""Turn task examples into model inputs, and model outputs back into words and labels.

NER follows the BERT recipe: a word's label goes on its first sub-token and the other sub-tokens are
ignored in the loss (``-100``); predictions are read back from first sub-tokens only. The word-to-token
map comes from the fast tokenizer's ``word_ids``, never from ``##`` prefixes, so the same code works for
WordPiece, BPE and SentencePiece. Words the tokenizer drops (zero sub-tokens) or truncation cuts off
keep their gold tag and are predicted ``O``, so truncation costs recall instead of silently
shrinking the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from dapt.evaluation.readers import NerExample, TextExample
from dapt.labels import IGNORE_INDEX

_TOKENIZE_CHUNK = 1024


@dataclass
class EncodedSplit(Dataset):
    """A tokenized split: per-example features plus what scoring needs.

    ``features[i]`` has ``input_ids``, ``labels`` and ``index`` (its position in the split, so
    predictions from length-sorted batches map back). NER examples also carry ``word_starts``: the
    token position of each word's first sub-token, or -1 when the word has none.
    """

    kind: str
    features: list[dict[str, Any]]
    gold: list[Any]  # NER: list of tag sequences (strings); classification: label ids

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    def lengths(self) -> list[int]:
        return [len(f["input_ids"]) for f in self.features]


def _tokenized_chunks(examples: Sequence[Any], tokenize: Callable[[Sequence[Any]], Any]) -> Iterator[tuple[int, Any, Any, int]]:
    """Tokenize ``_TOKENIZE_CHUNK`` examples per call (one Rust batch call each, bounded memory) and
    yield ``(index in split, example, batch encoding, row in the batch)`` per example."""
    for start in range(0, len(examples), _TOKENIZE_CHUNK):
        chunk = examples[start : start + _TOKENIZE_CHUNK]
        enc = tokenize(chunk)
        for j, ex in enumerate(chunk):
            yield start + j, ex, enc, j


def encode_ner(
    examples: Sequence[NerExample],
    tokenizer: Any,
    label2id: dict[str, int],
    *,
    max_length: int,
) -> EncodedSplit:
    """Tokenize pre-split words and put each word's label on its first sub-token."""
    features: list[dict[str, Any]] = []
    batches = _tokenized_chunks(examples, lambda chunk: tokenizer(
        [list(ex.tokens) for ex in chunk], is_split_into_words=True, truncation=True, max_length=max_length))
    for index, ex, enc, j in batches:
        word_ids = enc.word_ids(j)
        labels = [IGNORE_INDEX] * len(word_ids)
        word_starts = [-1] * len(ex.tokens)
        previous = None
        for pos, word in enumerate(word_ids):
            if word is not None and word != previous:
                word_starts[word] = pos
                # dev/test tags unseen in train were mapped to O by load_task; .get guards anyway
                labels[pos] = label2id.get(ex.tags[word], IGNORE_INDEX)
            previous = word
        features.append({"input_ids": enc["input_ids"][j], "labels": labels, "word_starts": word_starts, "index": index})
    return EncodedSplit(kind="ner", features=features, gold=[list(ex.tags) for ex in examples])


def encode_classification(
    examples: Sequence[TextExample],
    tokenizer: Any,
    label2id: dict[str, int],
    *,
    max_length: int,
) -> EncodedSplit:
    """Tokenize texts as they are (ChemProt's ``<< >>`` / ``[[ ]]`` markers stay ordinary text)."""
    batches = _tokenized_chunks(examples, lambda chunk: tokenizer([ex.text for ex in chunk], truncation=True,
                                                                   max_length=max_length))
    features = [{"input_ids": enc["input_ids"][j], "labels": label2id[ex.label], "index": index}
                for index, ex, enc, j in batches]
    return EncodedSplit(kind="classification", features=features, gold=[label2id[ex.label] for ex in examples])


def make_collate(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Pad a batch to its longest row (dynamic padding: short NER sentences stay cheap)."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in batch)
        n = len(batch)
        input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        token_labels = isinstance(batch[0]["labels"], list)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if token_labels else torch.empty(n, dtype=torch.long)
        for i, f in enumerate(batch):
            ids = f["input_ids"]
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, : len(ids)] = 1
            if token_labels:
                labels[i, : len(ids)] = torch.tensor(f["labels"], dtype=torch.long)
            else:
                labels[i] = f["labels"]
        out: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "index": [f["index"] for f in batch],
        }
        if "word_starts" in batch[0]:
            out["word_starts"] = [f["word_starts"] for f in batch]
        return out

    return collate


def decode_ner(pred_ids: torch.Tensor, word_starts: Sequence[Sequence[int]], id2label: Sequence[str]) -> list[list[str]]:
    """One tag per word from first-sub-token predictions; words without a token are ``O``."""
    rows = pred_ids.tolist()
    return [[id2label[row[p]] if p >= 0 else "O" for p in starts] for row, starts in zip(rows, word_starts)]
