"""What each strategy promises beyond the shared properties: span lengths, PMI units, salient boost,
hash consistency between corpus statistics and packed blocks, budgeted unit selection."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dapt.labels import IGNORE_INDEX
from dapt.masking import MaskingContext, MaskingInput, build_masker
from dapt.masking.corpus_stats import tokenize_corpus
from dapt.masking.span import SpanMasking, SpanMaskingConfig, sample_span_lengths
from dapt.masking.units import WordTable, select_units, word_hashes
from experiments.throughput.masking_bench import pack_blocks
from tests.helpers import OHSUMED, WIKI, texts
from tests.helpers import minilm_tokenizer as tokenizer
from tests.helpers import needs_shared_data as needs_data


def span_length_probs(p: float, max_len: int) -> torch.Tensor:
    """The reference law the sampler must follow: P(length = 1..max_len) of the truncated,
    renormalised geometric distribution (index 0 is length 1), written out independently."""
    k = torch.arange(1, max_len + 1, dtype=torch.float64)
    probs = p * (1.0 - p) ** (k - 1)
    return probs / probs.sum()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> MaskingContext:
    return MaskingContext(
        tokenizer=tokenizer(),
        domain_documents=lambda: iter(texts(OHSUMED, 800)),
        general_documents=lambda: iter(texts(WIKI, 80)),
        cache_dir=str(tmp_path_factory.mktemp("masking_cache")),
    )


def plain_batch(rows: int, seq: int, start_prob: float, seed: int) -> MaskingInput:
    """Rows of random non-special ids with no separators; words of random token length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (rows, seq), generator=g)
    starts = torch.rand(rows, seq, generator=g) < start_prob
    return MaskingInput.from_word_starts(ids, starts, torch.ones(rows, seq, dtype=torch.bool))


# ---------------------------------------------------------------- budgeted unit selection

@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=20), rate=st.floats(0.05, 0.95))
def test_select_units_is_exact_in_expectation(lengths: list[int], rate: float) -> None:
    """Averaged over many draws, the masked token count equals rate x tokens, whatever the unit lengths."""
    unit_of_token = torch.tensor([u for u, n in enumerate(lengths) for _ in range(n)]).unsqueeze(0)
    reps = 4000
    units = unit_of_token.expand(reps, -1)
    g = torch.Generator().manual_seed(0)
    keys = torch.rand(units.shape, generator=g)
    selected = select_units(units, keys, torch.full((reps,), rate * units.shape[1]), g)
    total = units.shape[1]
    counts = selected.sum(1).float()
    assert abs(counts.mean().item() - rate * total) < 4 * max(lengths) / reps**0.5 + 1e-3
    assert ((counts - rate * total).abs() <= max(lengths)).all()
    # whole units only
    per_unit = torch.zeros(reps, len(lengths), dtype=torch.long).scatter_add_(1, units, selected.long())
    assert ((per_unit == 0) | (per_unit == torch.tensor(lengths))).all()


def test_word_starts_after_special_tokens_always_start_a_word() -> None:
    """A packer that leaves word_starts False after [SEP] must not glue two documents' words together."""
    ids = torch.tensor([[101, 2000, 2001, 102, 2002, 2003, 102]])
    starts = torch.tensor([[False, True, False, False, False, True, False]])
    maskable = ~torch.isin(ids, torch.tensor([101, 102]))
    batch = MaskingInput.from_word_starts(ids, starts, maskable)
    assert batch.word_ids.tolist() == [[-1, 0, 0, -1, 1, 2, -1]]
    table = WordTable.build(batch.word_ids)
    assert table.gap_before[0, :3].tolist() == [True, True, False]


# ---------------------------------------------------------------- span

def test_span_length_law_matches_spanbert() -> None:
    probs = span_length_probs(0.2, 10)
    mean = float((probs * torch.arange(1, 11, dtype=torch.float64)).sum())
    assert abs(mean - 3.8) < 0.01  # SpanBERT: "mean span length 3.8"
    draws = sample_span_lengths((200_000,), 0.2, 10, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=11)[1:].double() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.004)
    assert sample_span_lengths((10,), 1.0, 10, torch.Generator()).eq(1).all()


@pytest.mark.parametrize("rate", [0.15, 0.4])
def test_span_segments_and_masked_spans_follow_the_law(rate: float) -> None:
    strategy = SpanMasking(SpanMaskingConfig(rate=rate))
    batch = plain_batch(128, 512, 0.7, seed=1)
    table = WordTable.build(batch.word_ids)
    gen = torch.Generator().manual_seed(3)
    twin = torch.Generator().set_state(gen.get_state())  # select() segments with the generator first
    selected = strategy.select(batch, rate, gen)
    units = strategy.units(batch, twin)
    seq = units.shape[1]
    words_per_span = torch.zeros(units.shape[0], seq + 1, dtype=torch.long).scatter_add_(
        1, torch.where(units >= 0, units, seq), torch.ones_like(units))[:, :seq]
    probs = span_length_probs(0.2, 10)
    segments = words_per_span[words_per_span > 0]
    freq = torch.bincount(segments, minlength=11)[1:].double() / segments.numel()
    assert torch.allclose(freq, probs, atol=0.015)
    assert abs(segments.double().mean().item() - 3.8) < 0.1
    # masked spans: whole segments, contiguous words, similar lengths (the budget-straddling span
    # is kept with probability < 1, which slightly favours short spans: measured mean ~3.7)
    slot = table.to_tokens(units, -1)
    slot = torch.where(slot >= 0, slot, seq)
    masked = torch.zeros(units.shape[0], seq + 1, dtype=torch.long).scatter_add_(1, slot, selected.long())[:, :seq]
    tokens_per_span = torch.zeros(units.shape[0], seq + 1, dtype=torch.long).scatter_add_(1, slot, torch.ones_like(slot))[:, :seq]
    chosen = masked > 0
    assert ((masked == 0) | (masked == tokens_per_span)).all()
    assert abs(words_per_span[chosen].double().mean().item() - 3.8) < 0.25
    assert abs(selected.float().mean().item() - rate) < 0.005


def test_spans_never_cross_a_separator() -> None:
    ids = torch.randint(1000, 30000, (64, 40))
    ids[:, ::5] = 102  # a separator every 5 tokens
    maskable = ids != 102
    batch = MaskingInput.from_word_starts(ids, torch.ones_like(ids, dtype=torch.bool), maskable)
    units = SpanMasking(SpanMaskingConfig()).units(batch, torch.Generator().manual_seed(0))
    table = WordTable.build(batch.word_ids)
    unit_tok = table.to_tokens(units, -1)
    for row in unit_tok.tolist():
        segments = [row[i + 1: i + 5] for i in range(0, 40, 5)]
        ids_per_segment = [set(s) for s in segments]
        for a in range(len(ids_per_segment)):
            for b in range(a + 1, len(ids_per_segment)):
                assert not ids_per_segment[a] & ids_per_segment[b]


# ---------------------------------------------------------------- hashing and PMI

@needs_data
def test_word_hash_is_the_same_in_corpus_and_in_packed_blocks() -> None:
    tok = tokenizer()
    docs = list(texts(OHSUMED, 30))
    corpus = tokenize_corpus(docs, tok)
    corpus_hashes = set(corpus.word_hash[0][corpus.table.valid[0]].tolist())
    ids, starts = pack_blocks(docs, tok, 64)
    batch = MaskingInput.from_word_starts(ids, starts, ~torch.isin(ids, torch.tensor(tok.all_special_ids)))
    table = WordTable.build(batch.word_ids)
    block_hashes = word_hashes(ids, table)[table.valid]
    # every word not cut by a block edge is a corpus word
    first_cut = table.gap_before & (table.first_pos == 1)
    whole = table.valid & ~first_cut
    last = table.valid & ~torch.nn.functional.pad(table.valid[:, 1:], (0, 1), value=False)
    whole &= ~last
    found = torch.tensor([h in corpus_hashes for h in word_hashes(ids, table)[whole].tolist()])
    assert found.all() and block_hashes.numel() > 1000


@needs_data
def test_pmi_units_are_vocabulary_ngrams_and_masked_whole(context: MaskingContext) -> None:
    tok = tokenizer()
    m = build_masker({"name": "pmi", "min_count": 3, "min_pmi": 3.0}, tok, context=context)
    strategy = m.strategy
    assert strategy.entries and all(2 <= e["n"] <= 5 for e in strategy.entries)
    vocab_texts = {e["text"] for e in strategy.entries}
    ids, starts = pack_blocks(texts(OHSUMED, 200), tok, 128)
    batch = MaskingInput.from_word_starts(ids, starts, m.maskable(ids))
    table = WordTable.build(batch.word_ids)
    units = strategy.units(batch)
    seq = units.shape[1]
    words_per_unit = torch.zeros(units.shape[0], seq + 1, dtype=torch.long).scatter_add_(
        1, torch.where(units >= 0, units, seq), torch.ones_like(units))[:, :seq]
    assert (words_per_unit > 1).sum() > 100  # n-gram units are found in text
    # every multi-word unit decodes to a vocabulary n-gram
    checked = 0
    for row in range(8):
        for u in (words_per_unit[row] > 1).nonzero().flatten().tolist():
            words = (units[row] == u).nonzero().flatten().tolist()
            text = " ".join(tok.decode(ids[row, table.first_pos[row, w]: table.last_pos[row, w] + 1]).strip() for w in words)
            assert text in vocab_texts
            checked += 1
    assert checked > 5
    # and units are masked all-or-nothing
    unit_tok = table.to_tokens(units, -1)
    for seed in range(3):
        selected = m(ids, starts, torch.Generator().manual_seed(seed), rate=0.3)["labels"] != IGNORE_INDEX
        slot = torch.where(unit_tok >= 0, unit_tok, seq)
        masked = torch.zeros(units.shape[0], seq + 1, dtype=torch.long).scatter_add_(1, slot, selected.long())[:, :seq]
        size = torch.zeros(units.shape[0], seq + 1, dtype=torch.long).scatter_add_(1, slot, torch.ones_like(slot))[:, :seq]
        assert ((masked == 0) | (masked == size)).all()


@needs_data
def test_pmi_finds_a_planted_collocation(context: MaskingContext) -> None:
    """A vocabulary n-gram inside new text, in any position of a block, becomes one unit."""
    tok = tokenizer()
    m = build_masker({"name": "pmi", "min_count": 3, "min_pmi": 3.0}, tok, context=context)
    entry = next(e for e in m.strategy.entries if e["n"] >= 3)
    for prefix in ("we studied", "in the cohort of thirty adults the", "x"):
        text = f"{prefix} {entry['text']} was observed"
        ids, starts = pack_blocks([text] * 10, tok, 32)
        batch = MaskingInput.from_word_starts(ids, starts, m.maskable(ids))
        units = m.strategy.units(batch)
        sizes = torch.bincount(units[0][units[0] >= 0])
        assert (sizes == entry["n"]).any(), (text, units[0].tolist())


# ---------------------------------------------------------------- salient

@needs_data
def test_salient_terms_are_masked_more_often_at_the_same_rate(context: MaskingContext) -> None:
    tok = tokenizer()
    salient = build_masker({"name": "salient", "min_count": 3}, tok, context=context)
    control = build_masker({"name": "whole_word"}, tok)
    terms = {e["text"] for e in salient.strategy.entries}
    assert {"patients", "cells"} & terms and not {"the", "of", "and"} & terms
    ids, starts = pack_blocks(texts(OHSUMED, 800)[600:], tok, 128)
    batch = MaskingInput.from_word_starts(ids, starts, salient.maskable(ids))
    table = WordTable.build(batch.word_ids)
    is_term = salient.strategy.salient_words(batch)
    assert 0.05 < is_term.sum() / table.valid.sum() < 0.6
    for rate in (0.15, 0.4):
        ratios, achieved = {}, {}
        for name, m in (("salient", salient), ("control", control)):
            hit = torch.zeros(table.length.shape)
            total = 0
            for seed in range(3):
                sel = (m(ids, starts, torch.Generator().manual_seed(seed), rate=rate)["labels"] != IGNORE_INDEX)
                total += int(sel.sum())
                hit += torch.zeros_like(table.length).scatter_add_(1, batch.word_ids.clamp(min=0), sel.long()).gt(0).float()
            ratios[name] = float(hit[is_term].mean() / hit[table.valid & ~is_term].mean())
            achieved[name] = total / (3 * int(batch.maskable.sum()))
        assert ratios["salient"] > 1.7 and abs(ratios["control"] - 1) < 0.15, ratios
        assert abs(achieved["salient"] - rate) < 0.005 and abs(achieved["control"] - rate) < 0.005
