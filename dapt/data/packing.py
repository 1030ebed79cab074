"""Tokenize documents in batches and pack them into fixed-length blocks.

Each block is ``[CLS] t_1 ... t_n [SEP]`` (the tokenizer's own special tokens, so RoBERTa gets
``<s> ... </s>``) where the body is a contiguous slice of the token stream of all documents joined by
separator tokens. Nothing is dropped except the final partial block, and no padding is ever needed.
Blocks also carry ``word_starts`` (True where a token begins a word per the fast tokenizer's word
ids; ``dapt.masking.units.encode_word_starts``, the rule the corpus statistics use too) so word-level
masking works for any tokenizer without looking at ``##`` or ``Ġ``.

Memory is bounded per document: a document longer than ``chunk_chars`` characters is tokenized in
pieces cut at whitespace (``split_long``), and ``pack`` streams the pieces into the block buffer, so
one 50 MB document costs what a batch of ordinary documents costs, not one tokenizer call whose
encoding (token strings, offsets, Python id lists) takes gigabytes. Cutting at whitespace, with the
whitespace kept at the start of the next piece, gives the tokens of the whole document for
whitespace-splitting tokenizers (WordPiece) and byte-level BPE (``Ġword``) alike.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from dapt.errors import ConfigError
from dapt.masking.units import encode_word_starts, plain_backend

CHUNK_CHARS = 1_000_000
_CUT_AT = (" ", "\n", "\t", "\r")


def split_long(text: str, chunk_chars: int) -> Iterator[str]:
    """``text`` in pieces of at most ~``chunk_chars`` characters, each cut just before whitespace.

    The cut is at the last space/newline/tab/CR in the second half of the window, so no word is
    split; a window without any (a 500 kB "word") is cut at its end. Joining the pieces gives
    ``text`` back exactly.
    """
    start, n = 0, len(text)
    while n - start > chunk_chars:
        end = start + chunk_chars
        cut = max(text.rfind(c, start + chunk_chars // 2, end) for c in _CUT_AT)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


class BlockPacker:
    """Packs a document stream into ``block_size`` blocks of ``input_ids`` + ``word_starts``."""

    def __init__(self, tokenizer: Any, block_size: int, *, docs_per_batch: int = 64, chunk_chars: int = CHUNK_CHARS) -> None:
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
        if chunk_chars < 2:
            raise ConfigError(f"chunk_chars={chunk_chars} must be >= 2")
        self.chunk_chars = chunk_chars
        # The Rust tokenizer directly: no BatchEncoding/Python-object overhead per document.
        self._backend = plain_backend(tokenizer)

    def _encode_pieces(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and word-start flags of each text (no separator; possibly empty)."""
        return encode_word_starts(self._backend, texts)

    def encode_each(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per document: token ids followed by a separator, and word-start flags (empty docs dropped).

        Long documents are tokenized piece by piece (``split_long``); the arrays returned are still
        whole documents (held-out sampling needs per-document tokens).
        """
        short = [t for t in texts if len(t) <= self.chunk_chars]
        short_parts = iter(self._encode_pieces(short) if short else [])  # one batch call, as before
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for text in texts:
            if len(text) <= self.chunk_chars:
                pieces = [next(short_parts)]
            else:
                # one piece per call: the tokenizer never holds more than chunk_chars of text at once
                pieces = [self._encode_pieces([piece])[0] for piece in split_long(text, self.chunk_chars)]
            ids, starts = self._with_sep(pieces)
            if ids.size:
                out.append((ids, starts))
        return out

    def _with_sep(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """One document's pieces joined, followed by the separator (flag False)."""
        ids = np.concatenate([p[0] for p in pieces] + [np.asarray([self.sep_id], dtype=np.int64)])
        starts = np.concatenate([p[1] for p in pieces] + [np.zeros(1, dtype=bool)])
        if ids.size == 1:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        return ids, starts

    def _pieces(self, documents: Iterable[str]) -> Iterator[tuple[str, bool]]:
        """(piece, is the document's last piece) for every document; short documents are one piece."""
        for doc in documents:
            if len(doc) <= self.chunk_chars:
                yield doc, True
                continue
            pieces = split_long(doc, self.chunk_chars)
            piece = next(pieces)
            for following in pieces:
                yield piece, False
                piece = following
            yield piece, True

    def _encode_stream(self, batch: list[str], last: list[bool], open_doc: list[bool]) -> tuple[np.ndarray, np.ndarray]:
        """Ids and flags of a batch of pieces: a separator after each document's last piece when
        the document had any token (``open_doc[0]`` carries that across batches)."""
        ids_parts: list[np.ndarray] = []
        start_parts: list[np.ndarray] = []
        sep_ids = np.asarray([self.sep_id], dtype=np.int64)
        sep_flag = np.zeros(1, dtype=bool)
        for (ids, starts), ends in zip(self._encode_pieces(batch), last):
            if ids.size:
                ids_parts.append(ids)
                start_parts.append(starts)
                open_doc[0] = True
            if ends and open_doc[0]:
                ids_parts.append(sep_ids)
                start_parts.append(sep_flag)
                open_doc[0] = False
        if not ids_parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        return np.concatenate(ids_parts), np.concatenate(start_parts)

    def pack(self, documents: Iterable[str]) -> Iterator[dict[str, np.ndarray]]:
        prefix = np.asarray(self.prefix, dtype=np.int64)
        suffix = np.asarray(self.suffix, dtype=np.int64)
        pad_flags_pre = np.zeros(len(self.prefix), dtype=bool)
        pad_flags_suf = np.zeros(len(self.suffix), dtype=bool)
        buf_ids = np.zeros(0, dtype=np.int64)
        buf_starts = np.zeros(0, dtype=bool)
        batch: list[str] = []
        last: list[bool] = []
        chars = 0
        open_doc = [False]

        def flush(ids: np.ndarray, starts: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
            n_blocks = len(ids) // self.body
            for b in range(n_blocks):
                sl = slice(b * self.body, (b + 1) * self.body)
                yield {
                    "input_ids": np.concatenate([prefix, ids[sl], suffix]),
                    "word_starts": np.concatenate([pad_flags_pre, starts[sl], pad_flags_suf]),
                }

        # A batch is tokenized when it has docs_per_batch pieces or chunk_chars characters: the
        # character bound keeps a batch of long pieces from costing docs_per_batch × chunk_chars.
        for piece, ends in self._pieces(documents):
            batch.append(piece)
            last.append(ends)
            chars += len(piece)
            if len(batch) < self.docs_per_batch and chars < self.chunk_chars:
                continue
            ids, starts = self._encode_stream(batch, last, open_doc)
            batch, last, chars = [], [], 0
            buf_ids = np.concatenate([buf_ids, ids])
            buf_starts = np.concatenate([buf_starts, starts])
            yield from flush(buf_ids, buf_starts)
            used = (len(buf_ids) // self.body) * self.body
            buf_ids, buf_starts = buf_ids[used:], buf_starts[used:]
        if batch:
            ids, starts = self._encode_stream(batch, last, open_doc)
            buf_ids = np.concatenate([buf_ids, ids])
            buf_starts = np.concatenate([buf_starts, starts])
            yield from flush(buf_ids, buf_starts)
