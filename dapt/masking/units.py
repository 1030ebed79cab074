"""Word tables, word/n-gram hashes and budgeted unit selection, shared by the word-level strategies.

Whole-word, span, PMI and salient masking differ only in how they group tokens into *units* (a word,
a run of words, a PMI n-gram) and in which units they prefer. Everything else is here, vectorised
over a ``[batch, seq]`` block with no Python loop over tokens:

* ``WordTable`` - per-row word lengths, positions and "gap before" flags (a word after a special
  token or separator, so that no unit ever spans two documents);
* ``word_hashes`` / ``ngram_hashes`` - 64-bit hashes of each word's token-id sequence and of each
  run of n words. The same functions hash the corpus when the PMI vocabulary and the salient terms
  are computed, so "this n-gram is in the vocabulary" at training time is one sorted lookup;
* ``select_units`` - pick units in priority order until ``rate x maskable tokens`` is met, the unit
  that straddles the budget being kept with the probability that makes the token count exact in
  expectation;
* ``encode_word_starts`` - the one rule for which token starts a word (from the fast tokenizer's word
  ids), used by the block packer (``dapt.data.packing``) and by the corpus statistics alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from dapt.errors import ConfigError

# splitmix64 constants, written as signed int64 (torch has no uint64 arithmetic; int64 products wrap).
_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_TOKEN_MUL = 0x9E3779B97F4A7C15 - (1 << 64)
_NGRAM_MUL = 0xD6E8FEB86659FD93 - (1 << 64)
# Bump when the hash definition changes: cached vocabularies store hashes and are keyed on this.
HASH_VERSION = 1


def plain_backend(tokenizer: Any) -> Any:
    """The fast tokenizer's Rust ``tokenizers.Tokenizer``, with truncation and padding switched off.

    Both are call-time state a previous ``tokenizer(..., truncation=True)`` may have left set; a
    corpus must be encoded whole.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; word-level masking needs word ids")
    backend.no_truncation()
    backend.no_padding()
    return backend


def encode_word_starts(backend: Any, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids (int64) and "starts a word" flags of each text, without special tokens.

    A token starts a word when its word id differs from the previous token's (the first token always
    does): the tokenizer's own word ids, never ``##`` / ``Ġ`` prefixes, so every fast tokenizer
    works. ``backend`` comes from ``plain_backend``; one batched call for all ``texts``.
    """
    out = []
    for enc in backend.encode_batch(texts, add_special_tokens=False):
        ids = np.asarray(enc.ids, dtype=np.int64)
        starts = np.empty(ids.size, dtype=bool)
        if ids.size:
            words = np.asarray(enc.word_ids, dtype=np.float64)  # None -> nan
            starts[0] = True
            np.not_equal(words[1:], words[:-1], out=starts[1:])
        out.append((ids, starts))
    return out


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser: spreads every input bit over the output so sums of keys don't collide."""
    x = x ^ _shr(x, 30)
    x = x * _M1
    x = x ^ _shr(x, 27)
    x = x * _M2
    return x ^ _shr(x, 31)


@dataclass
class WordTable:
    """Per-row word facts, indexed ``[batch, word]`` with ``word < seq_len`` (absent words: length 0).

    Attributes:
        word_ids: the ``[batch, seq]`` word index of each token (-1 for special tokens and padding).
        length: tokens per word.
        first_pos / last_pos: position of each word's first / last token.
        valid: the word exists in this row.
        gap_before: the word does not directly follow the previous word (first word of a row, or a
            special token / separator in between); units never cross such a gap.
    """

    word_ids: torch.Tensor
    length: torch.Tensor
    first_pos: torch.Tensor
    last_pos: torch.Tensor
    valid: torch.Tensor
    gap_before: torch.Tensor

    @classmethod
    def build(cls, word_ids: torch.Tensor) -> "WordTable":
        batch, seq = word_ids.shape
        device = word_ids.device
        slot = torch.where(word_ids >= 0, word_ids, torch.full_like(word_ids, seq))  # seq = dump slot
        pos = torch.arange(seq, device=device).expand(batch, seq)
        length = torch.zeros(batch, seq + 1, dtype=torch.long, device=device)
        length.scatter_add_(1, slot, torch.ones_like(slot))
        first = torch.full((batch, seq + 1), seq, dtype=torch.long, device=device)
        first.scatter_reduce_(1, slot, pos, reduce="amin")
        last = torch.full((batch, seq + 1), -1, dtype=torch.long, device=device)
        last.scatter_reduce_(1, slot, pos, reduce="amax")
        length, first, last = length[:, :seq], first[:, :seq], last[:, :seq]
        valid = length > 0
        prev_last = torch.nn.functional.pad(last[:, :-1], (1, 0), value=-2)
        gap_before = valid & (first != prev_last + 1)
        return cls(word_ids=word_ids, length=length, first_pos=first, last_pos=last, valid=valid, gap_before=gap_before)

    def to_tokens(self, per_word: torch.Tensor, fill: int | bool | float = 0) -> torch.Tensor:
        """Broadcast a ``[batch, word]`` value to every token of the word (``fill`` elsewhere)."""
        gathered = per_word.gather(1, self.word_ids.clamp(min=0))
        return torch.where(self.word_ids >= 0, gathered, torch.full_like(gathered, fill))


def word_hashes(input_ids: torch.Tensor, table: WordTable) -> torch.Tensor:
    """A 64-bit hash of each word's token-id sequence, ``[batch, word]`` (0 for absent words).

    Built from token ids (not strings), so it is tokenizer-agnostic and needs no decoding; the same
    word always hashes the same in the corpus statistics and in a packed training block. A word cut
    by a block boundary hashes differently from the whole word and so simply matches nothing.
    """
    token_valid = table.word_ids >= 0
    start = table.first_pos.gather(1, table.word_ids.clamp(min=0))
    offset = torch.arange(input_ids.shape[1], device=input_ids.device) - start
    key = mix64(input_ids.long() * _TOKEN_MUL + offset + 1)
    key = torch.where(token_valid, key, torch.zeros_like(key))
    slot = torch.where(token_valid, table.word_ids, torch.full_like(table.word_ids, input_ids.shape[1]))
    summed = torch.zeros(input_ids.shape[0], input_ids.shape[1] + 1, dtype=torch.long, device=input_ids.device)
    summed.scatter_add_(1, slot, key)
    hashed = mix64(summed[:, :-1] + table.length * _NGRAM_MUL)
    return torch.where(table.valid, hashed, torch.zeros_like(hashed))


def ngram_hashes(word_hash: torch.Tensor, table: WordTable, max_n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hashes of the n-grams starting at every word, for n = 1..max_n.

    Returns ``[(hash_n, ok_n)]`` (index 0 is n=1): ``hash_n[b, i]`` hashes words ``i..i+n-1`` in
    order, and ``ok_n`` says they all exist in the row with no gap (special token, separator, block
    edge) between them.
    """
    out = [(word_hash, table.valid.clone())]
    hashed, ok = word_hash, table.valid
    for k in range(1, max_n):
        nxt = _shift_left(word_hash, k, 0)
        joined = _shift_left(table.valid & ~table.gap_before, k, False)
        hashed = mix64(hashed * _NGRAM_MUL + nxt)
        ok = ok & joined
        out.append((hashed, ok))
    return out


def _shift_left(x: torch.Tensor, k: int, fill: int | bool) -> torch.Tensor:
    """``out[:, i] = x[:, i + k]``, padded with ``fill`` at the end (all ``fill`` when ``k >= seq``)."""
    k = min(k, x.shape[1])
    pad = torch.full((x.shape[0], k), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x[:, k:], pad], dim=1)


def lookup_sorted(values: torch.Tensor, sorted_table: torch.Tensor) -> torch.Tensor:
    """Bool mask: which ``values`` occur in the sorted 1-D ``sorted_table`` (one binary search each)."""
    if sorted_table.numel() == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    idx = torch.searchsorted(sorted_table, values.contiguous()).clamp(max=sorted_table.numel() - 1)
    return sorted_table[idx] == values


class SortedHashes:
    """A sorted set of int64 hashes (n-gram vocabulary, salient terms) with one copy per device.

    Collation may run on the CPU (DataLoader) or on the accelerator (``on_after_batch_transfer``):
    each device's copy is made once, on first use, instead of every batch.
    """

    def __init__(self, hashes: Iterable[int]) -> None:
        self._copies: dict[str, torch.Tensor] = {"cpu": torch.tensor(sorted(hashes), dtype=torch.long)}

    def __len__(self) -> int:
        return self._copies["cpu"].numel()

    def on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._copies:
            self._copies[key] = self._copies["cpu"].to(device)
        return self._copies[key]

    def contains(self, values: torch.Tensor) -> torch.Tensor:
        """Bool mask: which ``values`` are in the set (see ``lookup_sorted``)."""
        return lookup_sorted(values, self.on(values.device))


def units_from_starts(unit_start: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Number units from per-word "starts a unit" flags: ``[batch, word]`` unit ids, -1 for absent words."""
    ids = (unit_start & valid).long().cumsum(1) - 1
    return torch.where(valid, ids, torch.full_like(ids, -1))


def select_units(
    unit_of_token: torch.Tensor,
    keys: torch.Tensor,
    budget: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Select whole units in increasing ``keys`` order until each row's token ``budget`` is met.

    Args:
        unit_of_token: ``[batch, seq]`` unit index of each token (< seq), -1 for never-maskable ones.
        keys: ``[batch, seq]`` priority of each unit (lower first); uniform noise gives uniform
            sampling without replacement, ``Exp(1) / weight`` gives weighted sampling (Efraimidis-
            Spirakis). Entries of absent units are ignored.
        budget: ``[batch]`` tokens to mask per row (``rate x maskable``, real-valued).

    In priority order, let a unit of ``len`` tokens start at cumulative count ``S``. It is taken
    when ``S + v * len < budget`` with ``v ~ U(0, 1)``: units wholly inside the budget always, the
    one straddling it with probability ``(budget - S) / len``, later ones never. So, whatever the
    keys, the expected number of masked tokens in a row is exactly ``budget`` and the realised count
    is within one unit of it. Returns the ``[batch, seq]`` bool selection.
    """
    batch, seq = unit_of_token.shape
    device = unit_of_token.device
    present = unit_of_token >= 0
    slot = torch.where(present, unit_of_token, torch.full_like(unit_of_token, seq))
    length = torch.zeros(batch, seq + 1, dtype=torch.long, device=device)
    length.scatter_add_(1, slot, torch.ones_like(slot))
    length = length[:, :seq]
    keys = keys.masked_fill(length == 0, float("inf"))
    order = keys.argsort(dim=1, stable=True)
    # float32 is exact for counts below 2**24 and works on every device (MPS has no float64).
    sorted_len = length.gather(1, order).to(torch.float32)
    start = sorted_len.cumsum(1) - sorted_len
    v = torch.rand(batch, seq, generator=generator, device=device)
    take_sorted = (start + v * sorted_len < budget.to(torch.float32).unsqueeze(1)) & (sorted_len > 0)
    take = torch.zeros_like(take_sorted).scatter_(1, order, take_sorted)
    selected = take.gather(1, slot.clamp(max=seq - 1))
    return selected & present


def token_budget(maskable: torch.Tensor, rate: float) -> torch.Tensor:
    """``rate x`` the maskable tokens of each row: word-level strategies count the rate in tokens."""
    return maskable.sum(1).to(torch.float32) * rate
