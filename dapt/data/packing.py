"""Tokenize documents in batches and pack them into fixed-length blocks.

Each block is ``[CLS] t_1 ... t_n [SEP]`` (the tokenizer's own special tokens, so RoBERTa gets
``<s> ... </s>``) where the body is a contiguous slice of the token stream of all documents joined by
separator tokens. Nothing is dropped except the final partial block, and no padding is ever needed.
Blocks also carry ``word_starts`` (True where a token begins a word per the fast tokenizer's word
ids) so word-level masking works for any tokenizer without looking at ``##`` or ``Ġ``.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from dapt.errors import ConfigError


class BlockPacker:
    """Packs a document stream into ``block_size`` blocks of ``input_ids`` + ``word_starts``."""

    def __init__(self, tokenizer: Any, block_size: int, *, docs_per_batch: int = 64) -> None:
        wrapped = list(tokenizer("", add_special_tokens=True)["input_ids"])  # e.g. [CLS, SEP] or [<s>, </s>]
        if len(wrapped) > 2 or block_size <= len(wrapped) + 1:
            raise ConfigError(f"data.max_seq_length={block_size} too small for the tokenizer's special tokens")
        self.prefix = wrapped[:1] if len(wrapped) == 2 else []
        self.suffix = wrapped[-1:] if wrapped else []
        sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if sep is None:
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no sep/eos token to separate documents")
        self.sep_id = int(sep)
        self.block_size = block_size
        self.body = block_size - len(self.prefix) - len(self.suffix)
        self.docs_per_batch = docs_per_batch
        # The Rust tokenizer directly: no BatchEncoding/Python-object overhead per document.
        self._backend = tokenizer.backend_tokenizer
        self._backend.no_truncation()
        self._backend.no_padding()

    def encode_each(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per document: token ids followed by a separator, and word-start flags (empty docs dropped)."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for enc in self._backend.encode_batch(texts, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if ids.size == 0:
                continue
            words = np.asarray(enc.word_ids, dtype=np.float64)  # None -> nan
            starts = np.empty(ids.size + 1, dtype=bool)
            starts[0] = True
            np.not_equal(words[1:], words[:-1], out=starts[1:-1])
            starts[-1] = False  # the separator
            out.append((np.append(ids, self.sep_id), starts))
        return out

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and word-start flags of ``texts`` concatenated, each followed by a separator."""
        parts = self.encode_each(texts)
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def pack(self, documents: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
        prefix = np.asarray(self.prefix, dtype=np.int64)
        suffix = np.asarray(self.suffix, dtype=np.int64)
        pad_flags_pre = np.zeros(len(self.prefix), dtype=bool)
        pad_flags_suf = np.zeros(len(self.suffix), dtype=bool)
        buf_ids = np.zeros(0, dtype=np.int64)
        buf_starts = np.zeros(0, dtype=bool)
        batch: list[str] = []

        def flush(ids: np.ndarray, starts: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
            n_blocks = len(ids) // self.body
            for b in range(n_blocks):
                sl = slice(b * self.body, (b + 1) * self.body)
                yield {
                    "input_ids": np.concatenate([prefix, ids[sl], suffix]),
                    "word_starts": np.concatenate([pad_flags_pre, starts[sl], pad_flags_suf]),
                }

        for doc in documents:
            batch.append(doc)
            if len(batch) < self.docs_per_batch:
                continue
            ids, starts = self._encode(batch)
            batch = []
            buf_ids = np.concatenate([buf_ids, ids])
            buf_starts = np.concatenate([buf_starts, starts])
            yield from flush(buf_ids, buf_starts)
            used = (len(buf_ids) // self.body) * self.body
            buf_ids, buf_starts = buf_ids[used:], buf_starts[used:]
        if batch:
            ids, starts = self._encode(batch)
            buf_ids = np.concatenate([buf_ids, ids])
            buf_starts = np.concatenate([buf_starts, starts])
            yield from flush(buf_ids, buf_starts)
