"""Properties every masking strategy must have, on random token sequences and on real text.

* specials and padding are never masked;
* each row masks ``rate x maskable`` tokens up to one unit (exact in expectation, checked on real text);
* word-level strategies mask whole words only, with a WordPiece *and* a byte-level BPE tokenizer
  (word boundaries come from ``word_ids()``, never from ``##`` / ``Ġ``);
* outputs are a function of the seed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dapt.labels import IGNORE_INDEX
from dapt.masking import Masker, MaskingContext, MaskingInput, achieved_rate, build_masker
from dapt.masking.units import WordTable
from experiments.throughput.masking_bench import pack_blocks
from tests.helpers import OHSUMED, WIKI, needs_shared_data, texts
from tests.helpers import minilm_tokenizer as wordpiece

WORD_LEVEL = ("whole_word", "span", "pmi", "salient")
ALL = ("random", *WORD_LEVEL)
# Longest unit in words per strategy (bounds how far one row can be from its budget).
UNIT_WORDS = {"random": 0, "whole_word": 1, "salient": 1, "span": 10, "pmi": 5}
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

pytestmark = [needs_shared_data, pytest.mark.usefixtures("one_thread")]


@lru_cache(maxsize=None)
def byte_level_bpe() -> Any:
    """A RoBERTa-style byte-level BPE tokenizer trained on 300 OHSUMED abstracts (words carry ``Ġ``)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(texts(OHSUMED, 300), vocab_size=2000, min_frequency=2, special_tokens=specials, show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", mask_token="<mask>", unk_token="<unk>",
    )


TOKENIZERS = {"wordpiece": wordpiece, "bpe": byte_level_bpe}
_CACHE: dict[str, Path] = {}


def small_context(tokenizer: Any, cache_dir: Path) -> MaskingContext:
    """Corpus statistics from a small sample (a second, not the ~20 s of the default corpus)."""
    return MaskingContext(
        tokenizer=tokenizer,
        domain_documents=lambda: iter(texts(OHSUMED, 600)),
        general_documents=lambda: iter(texts(WIKI, 60)),
        cache_dir=str(cache_dir),
    )


SMALL_STATS = {"pmi": {"min_count": 3, "min_pmi": 2.0}, "salient": {"min_count": 3}}


@lru_cache(maxsize=None)
def masker(tokenizer_name: str, name: str, cache_dir: str) -> Masker:
    tokenizer = TOKENIZERS[tokenizer_name]()
    cfg = {"name": name, **SMALL_STATS.get(name, {})}
    return build_masker(cfg, tokenizer, context=small_context(tokenizer, Path(cache_dir)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("masking_cache"))


def word_table(m: Masker, input_ids: torch.Tensor, word_starts: torch.Tensor) -> tuple[MaskingInput, WordTable]:
    batch = MaskingInput.from_word_starts(input_ids, word_starts, m.maskable(input_ids))
    return batch, WordTable.build(batch.word_ids)


def max_run_tokens(table: WordTable, words: int) -> torch.Tensor:
    """Per row, the most tokens in any ``words`` consecutive words (the largest possible unit)."""
    if words == 0:
        return torch.ones(table.length.shape[0], dtype=torch.long)
    c = torch.nn.functional.pad(table.length.cumsum(1), (1, 0))
    return (c[:, words:] - c[:, :-words]).max(1).values if c.shape[1] > words else c[:, -1]


def check_batch(m: Masker, name: str, input_ids: torch.Tensor, word_starts: torch.Tensor, rate: float, seed: int) -> None:
    out = m(input_ids, word_starts, torch.Generator().manual_seed(seed), rate=rate)
    selected = out["labels"] != IGNORE_INDEX
    batch, table = word_table(m, input_ids, word_starts)
    # 1. never a special token or padding; labels are the original ids
    assert not (selected & ~batch.maskable).any()
    assert torch.equal(out["labels"][selected], input_ids[selected])
    assert torch.equal(out["input_ids"][~selected], input_ids[~selected])
    # 2. the row's masked count is within one unit of rate x maskable
    n_maskable = batch.maskable.sum(1).float()
    slack = max_run_tokens(table, UNIT_WORDS[name]).float()
    assert ((selected.sum(1).float() - rate * n_maskable).abs() <= slack + 1e-4).all()
    # 3. whole words: a word is masked in all of its tokens or in none
    if name in WORD_LEVEL:
        masked_tokens = torch.zeros_like(table.length).scatter_add_(1, batch.word_ids.clamp(min=0), (selected & batch.maskable).long())
        assert ((masked_tokens == 0) | (masked_tokens == table.length)).all()
    # 4. a function of the seed
    again = m(input_ids, word_starts, torch.Generator().manual_seed(seed), rate=rate)
    assert torch.equal(out["input_ids"], again["input_ids"]) and torch.equal(out["labels"], again["labels"])


# ---------------------------------------------------------------- random token sequences

@st.composite
def random_blocks(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] words [SEP] (words [SEP]) [PAD]...: random ids, random word boundaries, random padding."""
    tok = wordpiece()
    rows, seq = draw(st.integers(1, 4)), draw(st.integers(4, 64))
    ids, starts = [], []
    for _ in range(rows):
        body = draw(st.lists(st.tuples(st.integers(1000, len(tok) - 1), st.booleans()), min_size=0, max_size=seq - 2))
        row = [(tok.cls_token_id, False)] + body
        if body and draw(st.booleans()):
            cut = draw(st.integers(1, len(row) - 1))
            row.insert(cut, (tok.sep_token_id, False))
        row = (row + [(tok.sep_token_id, False)])[:seq]
        row += [(tok.pad_token_id, False)] * (seq - len(row))
        ids.append([i for i, _ in row])
        starts.append([s for _, s in row])
    return torch.tensor(ids), torch.tensor(starts)


@pytest.mark.parametrize("name", ALL)
@FAST
@given(block=random_blocks(), rate=st.floats(0.05, 0.8), seed=st.integers(0, 2**31 - 1))
def test_random_sequences_properties(name: str, block: tuple[torch.Tensor, torch.Tensor], rate: float, seed: int, cache_dir: str) -> None:
    check_batch(masker("wordpiece", name, cache_dir), name, *block, rate=rate, seed=seed)


# ---------------------------------------------------------------- real text, two tokenizer families

@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "bpe"])
@pytest.mark.parametrize("name", ALL)
@FAST
@given(start=st.integers(0, 250), n_docs=st.integers(1, 8), seq=st.sampled_from([16, 64, 128]),
       rate=st.sampled_from([0.15, 0.3, 0.4]), seed=st.integers(0, 2**31 - 1))
def test_real_text_properties(tokenizer_name: str, name: str, start: int, n_docs: int, seq: int, rate: float, seed: int, cache_dir: str) -> None:
    m = masker(tokenizer_name, name, cache_dir)
    input_ids, word_starts = pack_blocks(texts(OHSUMED, 300)[start: start + n_docs], TOKENIZERS[tokenizer_name](), seq)
    if input_ids.shape[0]:
        check_batch(m, name, input_ids, word_starts, rate, seed)


@pytest.mark.parametrize("tokenizer_name", ["wordpiece", "bpe"])
def test_words_come_from_word_ids_not_prefixes(tokenizer_name: str) -> None:
    """Multi-token words exist and are grouped as the tokenizer's ``word_ids()`` say, for both families."""
    tok = TOKENIZERS[tokenizer_name]()
    text = "Echocardiographic hypokinesis in cardiomyopathy patients"
    enc = tok([text], add_special_tokens=False)
    wids = enc.word_ids(0)
    assert max(wids) + 1 < len(wids), "expected some multi-token words"
    input_ids, word_starts = pack_blocks([text] * 4, tok, 16)
    batch = MaskingInput.from_word_starts(input_ids, word_starts, torch.ones_like(input_ids, dtype=torch.bool))
    row_tokens = tok.convert_ids_to_tokens(input_ids[0, 1:].tolist())
    if tokenizer_name == "bpe":  # Ġ marks a space, not a word start the first time: word_ids decide
        assert any(t.startswith("Ġ") for t in row_tokens)
    assert batch.word_ids[0, 1:].tolist() == sorted(batch.word_ids[0, 1:].tolist())


# ---------------------------------------------------------------- expected rate on real text

@pytest.mark.parametrize("name", ALL)
def test_expected_rate_on_real_text(name: str, cache_dir: str) -> None:
    """Mean achieved rate over 768 real blocks x 2 seeds is the configured rate (tolerance 0.003, ~5 s.d.)."""
    m = masker("wordpiece", name, cache_dir)
    input_ids, word_starts = pack_blocks(texts(OHSUMED, 600), wordpiece(), 128, max_blocks=768)
    maskable = m.maskable(input_ids)
    for rate in (0.15, 0.4):
        rates = [achieved_rate(m(input_ids, word_starts, torch.Generator().manual_seed(s), rate=rate)["labels"], maskable) for s in range(2)]
        assert abs(sum(rates) / len(rates) - rate) < 0.003, (name, rate, rates)


# ---------------------------------------------------------------- reproducibility

@pytest.mark.parametrize("name", ALL)
def test_seed_determines_masks(name: str, cache_dir: str) -> None:
    m = masker("wordpiece", name, cache_dir)
    input_ids, word_starts = pack_blocks(texts(OHSUMED, 40), wordpiece(), 128, max_blocks=16)
    a = m(input_ids, word_starts, torch.Generator().manual_seed(7))
    b = m(input_ids, word_starts, torch.Generator().manual_seed(7))
    c = m(input_ids, word_starts, torch.Generator().manual_seed(8))
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert not torch.equal(a["labels"], c["labels"])
    # the same masker rebuilt from config gives the same masks (nothing hidden in Python's random)
    rebuilt = masker.__wrapped__("wordpiece", name, cache_dir)
    d = rebuilt(input_ids, word_starts, torch.Generator().manual_seed(7))
    assert torch.equal(a["labels"], d["labels"])
