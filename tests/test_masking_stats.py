"""Corpus statistics for PMI / salient masking: computed once, cached by content, refused when they
do not match the tokenizer; the ``dapt masking-stats`` command; the collation benchmark."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dapt.data.sources import SourceConfig, iter_documents
from dapt.errors import ConfigError
from dapt.masking import MaskingContext, build_masker, corpus_stats
from dapt.masking.corpus_stats import take_documents, tokenizer_fingerprint
from tests.helpers import OHSUMED, WIKI, needs_shared_data
from tests.helpers import minilm_tokenizer as tokenizer

pytestmark = [needs_shared_data, pytest.mark.usefixtures("one_thread")]
SMALL = {"min_count": 3, "stats_max_documents": 300}


def head(path: Path, n: int) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return out


@pytest.fixture()
def small_corpora(tmp_path: Path) -> tuple[Path, Path]:
    domain, general = tmp_path / "domain.jsonl", tmp_path / "general.jsonl"
    domain.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(head(OHSUMED, 300))))
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in head(WIKI, 12)))
    return domain, general


def jsonl(path: Path) -> SourceConfig:
    return SourceConfig(type="jsonl", path=str(path))


def context_for(domain: Path, general: Path, cache: Path) -> MaskingContext:
    """What ``dapt train`` passes: documents read by ``dapt.data.sources``."""
    return MaskingContext(tokenizer=tokenizer(), domain_documents=lambda: iter_documents(jsonl(domain), None),
                          general_documents=lambda: iter_documents(jsonl(general), None), cache_dir=str(cache))


@pytest.mark.parametrize("name", ["pmi", "salient"])
def test_statistics_are_cached_by_content(name: str, small_corpora: tuple[Path, Path], tmp_path: Path) -> None:
    domain, general = small_corpora
    cache = tmp_path / "cache"
    first = build_masker({"name": name, **SMALL}, tokenizer(), context=context_for(domain, general, cache)).strategy
    assert Path(first.stats_file).parent == cache and first.entries
    mtime = Path(first.stats_file).stat().st_mtime_ns
    started = time.perf_counter()
    again = build_masker({"name": name, **SMALL}, tokenizer(), context=context_for(domain, general, cache)).strategy
    assert again.stats_file == first.stats_file and Path(first.stats_file).stat().st_mtime_ns == mtime
    assert time.perf_counter() - started < 1.0
    assert again.entries == first.entries
    # other parameters or other text -> other statistics, never a stale file
    other = build_masker({"name": name, **SMALL, "min_count": 4}, tokenizer(), context=context_for(domain, general, cache)).strategy
    assert other.stats_file != first.stats_file
    domain.write_text(domain.read_text().replace("patients", "subjects"))
    edited = build_masker({"name": name, **SMALL}, tokenizer(), context=context_for(domain, general, cache)).strategy
    assert edited.stats_file != first.stats_file


def test_caps_bound_the_sample() -> None:
    sample = take_documents(lambda: iter_documents(jsonl(OHSUMED), None), max_documents=10**6, max_words=5000)
    assert 5000 <= sample.n_words < 5000 + 2000 and len(sample.documents) < 40
    assert len(take_documents(lambda: iter_documents(jsonl(OHSUMED), None), 7, 10**9).documents) == 7


def test_tokenizer_fingerprint_ignores_call_state() -> None:
    tok = tokenizer()
    before = tokenizer_fingerprint(tok)
    tok(["a b c"] * 2, padding=True, truncation=True, max_length=4)
    assert tokenizer_fingerprint(tok) == before


def test_stats_path_from_another_tokenizer_is_refused(small_corpora: tuple[Path, Path], tmp_path: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    domain, general = small_corpora
    strategy = build_masker({"name": "pmi", **SMALL}, tokenizer(), context=context_for(domain, general, tmp_path)).strategy
    loaded = build_masker({"name": "pmi", "stats_path": strategy.stats_file}, tokenizer()).strategy
    assert loaded.entries == strategy.entries
    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(head(OHSUMED, 50), vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<mask>"], show_progress=False)
    other = PreTrainedTokenizerFast(tokenizer_object=raw._tokenizer, pad_token="<pad>", mask_token="<mask>",
                                    cls_token="<s>", sep_token="</s>")
    with pytest.raises(ConfigError, match="another tokenizer"):
        build_masker({"name": "pmi", "stats_path": strategy.stats_file}, other)
    with pytest.raises(ConfigError, match="not 'salient_terms'"):
        build_masker({"name": "salient", "stats_path": strategy.stats_file}, tokenizer())
    with pytest.raises(ConfigError, match="does not exist"):
        build_masker({"name": "pmi", "stats_path": str(tmp_path / "missing.json")}, tokenizer())


# ---------------------------------------------------------------- dapt masking-stats

def test_cli_computes_caches_and_copies(small_corpora: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dapt.commands.masking_stats import main

    domain, general = small_corpora
    cache, out = tmp_path / "cache", tmp_path / "out"
    overrides = ["masking.min_count=3", "masking.stats_max_documents=300"]
    for kind in ("pmi", "salient"):
        code = main([f"masking={kind}", *overrides, "--domain", str(domain), "--general", str(general),
                     "--cache-dir", str(cache), "--out", str(out), "--top", "3"])
        assert code == 0
    text = capsys.readouterr().out
    assert "== pmi:" in text and "2-grams" in text and "== salient:" in text and "top terms" in text
    assert (out / "pmi.json").exists() and (out / "salient.json").exists()
    # a run with the same config and corpus finds the CLI's cache (no recomputation)
    files = sorted(cache.iterdir())
    strategy = build_masker({"name": "pmi", **SMALL}, tokenizer(), context=context_for(domain, general, cache)).strategy
    assert Path(strategy.stats_file) in files and sorted(cache.iterdir()) == files
    # and the copied file works as masking.stats_path
    loaded = build_masker({"name": "salient", "stats_path": str(out / "salient.json")}, tokenizer()).strategy
    assert loaded.entries


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from dapt.commands.masking_stats import main

    assert main(["masking=span"]) == 2
    assert main(["masking=pmi", "--domain", str(tmp_path / "nope.jsonl"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "span" in err[0] and "nope.jsonl" in err[1]


def test_cli_sees_exactly_the_documents_of_the_data_layer(tmp_path: Path) -> None:
    """One reader: records the data layer drops (empty, blank, null, non-string text, malformed JSON)
    never reach the statistics; a title-only record is not read as a document."""
    from dapt.commands.masking_stats import main

    good = head(OHSUMED, 120)
    bad = ['{"text": "", "title": "A title only the old reader took"}', '{"text": "   "}', '{"text": null}',
           '{"text": 7}', '{"text": "unterminated']
    lines = [json.dumps({"text": t}) for t in good]
    for i, line in enumerate(bad):
        lines.insert(10 + 20 * i, line)
    corpus = tmp_path / "domain.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["masking=pmi", "masking.min_count=3", "--domain", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out), "--top", "1"]) == 0
    data = json.loads((out / "pmi.json").read_text())
    expected = take_documents(lambda: iter_documents(jsonl(corpus), None), 50_000, 2_000_000)
    assert expected.documents == good
    assert data["corpus_sha"] == [expected.sha] and data["n_documents"] == [len(good)]


def test_cli_folders_are_read_by_the_data_layer(tmp_path: Path) -> None:
    """A folder on the command line: its .txt files (license/readme skipped, empty files dropped)."""
    from dapt.commands.masking_stats import path_sources

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "sub" / "b.txt").write_text("second document")
    (folder / "empty.txt").write_text("  \n")
    (folder / "LICENSE.txt").write_text("not domain text")
    (folder / "notes.md").write_text("not a corpus file")
    assert list(iter_documents(path_sources([str(folder)]), None)) == ["first document", "second document"]
    with pytest.raises(ConfigError, match="notes.md"):
        path_sources([str(folder / "notes.md")])


def test_masking_reads_no_corpus_files_itself() -> None:
    """Documents reach masking from its caller; the one reader is ``dapt.data.sources``."""
    import dapt.masking as masking

    assert not hasattr(corpus_stats, "iter_documents")
    for name in ("base", "corpus_stats", "ngrams", "pmi", "salient", "term_scores", "units"):
        module = getattr(masking, name)
        assert not hasattr(module, "iter_documents"), name
        assert "jsonl" not in Path(module.__file__).read_text(), name


def test_corpus_words_are_block_words() -> None:
    """One word-start rule: the corpus statistics' flags are the packer's, document by document."""
    from dapt.data.packing import BlockPacker

    tok = tokenizer()
    docs = head(OHSUMED, 20)
    corpus = corpus_stats.tokenize_corpus(docs, tok)
    packed = BlockPacker(tok, 512).encode_each(docs)
    ids = torch.from_numpy(np.concatenate([i[:-1] for i, _ in packed]))
    starts = torch.from_numpy(np.concatenate([s[:-1] for _, s in packed]))
    row = corpus.input_ids[0]
    keep = row != -1
    assert torch.equal(row[keep], ids)
    first = torch.zeros_like(row, dtype=torch.bool)
    first[corpus.table.first_pos[0][corpus.table.valid[0]]] = True
    assert torch.equal(first[keep], starts)


# ---------------------------------------------------------------- collation speed

def test_benchmark_reports_every_strategy_far_above_training_speed(small_corpora: tuple[Path, Path], tmp_path: Path) -> None:
    """Target: >= 20x MiniLM training (~1.5k tokens/s on 2 cores), i.e. >= 30k tokens/s per strategy."""
    from experiments.throughput.masking_bench import STRATEGIES, benchmark_masking, build_maskers

    domain, general = small_corpora
    ctx = context_for(domain, general, tmp_path)
    maskers = {name: build_masker({"name": name, **(SMALL if name in ("pmi", "salient") else {})}, tokenizer(), context=ctx)
               for name in STRATEGIES}
    speed = benchmark_masking(batch_size=32, seq_len=128, repeats=5, tokenizer=tokenizer(), maskers=maskers)
    assert set(speed) == set(STRATEGIES)
    assert min(speed.values()) > 30_000, speed
    assert callable(build_maskers)
