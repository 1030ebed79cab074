"""The training stream mixes its sources by weight from the first block, reproducibly.

Tolerances: the number of blocks of a source with probability ``p`` among the first ``n`` is
Binomial(n, p) (the block shuffle buffer only re-orders a window of the same draws), so shares are
checked to within 4 binomial standard deviations: a false failure has probability < 1e-4.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dapt.data.stream as dm
from dapt.config import to_dataclass
from dapt.data.config import DataConfig
from dapt.data.datamodule import PackedCorpusDataModule
from dapt.data.mixing import resolve_weights
from dapt.data.sources import SourceConfig, iter_documents, source_files
from dapt.data.stream import PackedBlockStream, collate_blocks
from dapt.errors import ConfigError, DataError
from tests.helpers import needs_shared_data

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, docs: list[str]) -> SourceConfig:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return SourceConfig(type="jsonl", path=str(path))


def _big_and_small(tmp_path: Path) -> tuple[SourceConfig, SourceConfig]:
    """Two synthetic sources ~10x apart in size, with disjoint vocabularies."""
    big = _jsonl(tmp_path / "big.jsonl", [f"cardiology patient artery heart valve number {i}" for i in range(3000)])
    small = _jsonl(tmp_path / "small.jsonl", [f"football season league goal {i}" for i in range(300)])
    return big, small


def _take(stream: PackedBlockStream, n: int) -> list[dict[str, Any]]:
    return list(itertools.islice(iter(stream), n))


def _within(count: int, n: int, p: float, sds: float = 4.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def _key(blocks: list[dict[str, Any]]) -> list[tuple[int, ...]]:
    return [(int(b.get("source", -1)), *b["input_ids"].tolist()) for b in blocks]


# --------------------------------------------------------------------------------------- shares


def test_default_weights_follow_size_and_shares_match(tmp_path, tokenizer):
    big, small = _big_and_small(tmp_path)
    p_small = os.path.getsize(small.path) / (os.path.getsize(big.path) + os.path.getsize(small.path))
    stream = PackedBlockStream([big, small], None, tokenizer, 32, shuffle_buffer=256, seed=1)
    assert [c.probability for c in stream.components()] == pytest.approx([1 - p_small, p_small])
    n = 2000
    blocks = _take(stream, n)
    count = sum(b["source"] == 1 for b in blocks)
    assert _within(count, n, p_small), (count, n * p_small)
    # the small source shows up from the start, not after the big one is exhausted
    assert any(b["source"] == 1 for b in blocks[:100])
    # the tag tells the truth: a block holds only its own source's words
    football = tokenizer.convert_tokens_to_ids("football")
    cardiology = tokenizer.convert_tokens_to_ids("cardiology")
    for b in blocks:
        ids = set(b["input_ids"].tolist())
        assert (cardiology if b["source"] == 1 else football) not in ids


def test_explicit_weights_and_independent_cycling(tmp_path, tokenizer):
    big, small = _big_and_small(tmp_path)
    big.weight, small.weight = 1.0, 3.0  # the small source gets 75%: it must cycle many passes
    stream = PackedBlockStream([big, small], None, tokenizer, 32, shuffle_buffer=64, seed=2)
    n = 2000
    count = sum(b["source"] == 1 for b in _take(stream, n))
    assert _within(count, n, 0.75), count
    small_blocks_per_pass = sum(1 for _ in stream.source_stream(1).packer.pack(iter_documents(small, None)))
    assert count > 3 * small_blocks_per_pass  # several passes of the small source, while the big one continues


def test_weights_must_be_all_or_none_and_hf_needs_them(tmp_path):
    big, small = _big_and_small(tmp_path)
    hf = SourceConfig(type="hf", path="some/dataset")
    with pytest.raises(ConfigError, match=r"data\.train\[1\]\.weight"):
        resolve_weights([big, hf], None, "data.train")
    big.weight = 2.0
    with pytest.raises(ConfigError, match=r"data\.train\[1\]\.weight"):
        resolve_weights([big, small], None, "data.train")
    hf.weight = 6.0
    assert resolve_weights([big, hf], None, "data.train") == [0.25, 0.75]
    assert resolve_weights([SourceConfig(type="hf", path="x")], None, "data.train") == [1.0]  # one source
    with pytest.raises(ConfigError, match="weight"):
        SourceConfig(type="jsonl", path="x", weight=0.0)


@needs_shared_data
def test_real_biomed_sources_mix_by_weight(tokenizer, data_dir):
    ohsumed = SourceConfig(type="jsonl", path="biomed/corpus/ohsumed/train.jsonl", weight=1.0)
    craft = SourceConfig(type="text", path="biomed/corpus/craft", glob="*.txt", weight=1.0)
    stream = PackedBlockStream([ohsumed, craft], str(data_dir), tokenizer, 32, shuffle_buffer=256, seed=0)
    n = 2000
    count = sum(b["source"] == 1 for b in _take(stream, n))
    assert _within(count, n, 0.5), count


@needs_shared_data
def test_300_step_prefix_of_data_biomed_contains_craft(compose, tokenizer, data_dir):
    """The audit's failure: 300 steps x 16 blocks of 128 tokens of data=biomed held 0 CRAFT blocks."""
    cfg = to_dataclass(DataConfig, compose(["data=biomed"]).data, prefix="data")
    assert (cfg.batch_size, cfg.max_seq_length, cfg.shuffle_buffer) == (16, 128, 2048)  # the real defaults
    from dapt.masking import build_masker

    module = PackedCorpusDataModule(cfg, tokenizer, build_masker({"name": "random", "rate": 0.15}, tokenizer), data_dir=str(data_dir))
    stream = module.train_stream
    names = stream.source_names
    assert names == ["biomed/corpus/ohsumed/train.jsonl", "biomed/corpus/craft"]
    p_craft = stream.components()[1].probability
    assert 0.4 < p_craft < 0.5  # by size: CRAFT is ~46% of the bytes
    n = 300 * 16
    count = sum(b["source"] == 1 for b in _take(stream, n))
    assert _within(count, n, p_craft), (count, n * p_craft)
    assert all(f.name != "LICENSE.txt" for f in source_files(stream.sources[1], str(data_dir)))


# ------------------------------------------------------------------------------ license / readme


def test_license_and_readme_files_are_never_training_documents(tmp_path, tokenizer):
    marker = "zyxwvmarker"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"article{i:02d}.txt").write_text(f"protein binding assay result {i} " * 20)
    (corpus / "LICENSE.txt").write_text(f"{marker} licensed under CC BY {marker}\n" * 30)
    (corpus / "readme.txt").write_text(f"{marker} how to use this corpus\n" * 30)
    (corpus / "NOTICE").write_text(f"{marker}\n")
    for source in (
        SourceConfig(type="text", path=str(corpus), glob="*.txt"),
        SourceConfig(type="text", path=str(corpus), glob="*"),
        SourceConfig(type="text", path=str(corpus / "*.txt")),
        SourceConfig(type="text", path=str(corpus), glob="*.txt", split_by="line"),
    ):
        assert all(marker not in d for d in iter_documents(source, None))
        stream = PackedBlockStream([source], None, tokenizer, 32, max_passes=2, seed=0)
        text = " ".join(tokenizer.decode(b["input_ids"]) for b in stream)
        assert "protein" in text and marker not in text
    # a single file named explicitly is read, whatever its name
    assert list(iter_documents(SourceConfig(type="text", path=str(corpus / "NOTICE")), None)) == [f"{marker}\n"]
    # the patterns are configurable
    keep_all = SourceConfig(type="text", path=str(corpus), glob="*.txt", exclude=[])
    assert any(marker in d for d in iter_documents(keep_all, None))


# ----------------------------------------------------------------------------- reproducibility


def _replay_stream(tmp_path: Path, tokenizer: Any, seed: int, **kwargs: Any) -> PackedBlockStream:
    big, small = _big_and_small(tmp_path)
    general = _jsonl(tmp_path / "general.jsonl", [f"the river flows past the old town {i}" for i in range(500)])
    return PackedBlockStream([big, small], None, tokenizer, 32, shuffle_buffer=64, seed=seed,
                             replay=[general], replay_fraction=0.2, **kwargs)


def test_same_seed_same_stream_and_start_block_is_the_tail(tmp_path, tokenizer):
    n, k = 600, 237
    full = _key(_take(_replay_stream(tmp_path, tokenizer, 5), n))
    assert full == _key(_take(_replay_stream(tmp_path, tokenizer, 5), n))
    assert full != _key(_take(_replay_stream(tmp_path, tokenizer, 6), n))
    assert _key(_take(_replay_stream(tmp_path, tokenizer, 5, start_block=k), n - k)) == full[k:]


_DIGEST_SCRIPT = """
import hashlib, itertools, json, sys
from dapt.data.stream import PackedBlockStream
from dapt.data.sources import SourceConfig
from tests.helpers import minilm_tokenizer
d = sys.argv[1]
src = lambda name: SourceConfig(type="jsonl", path=f"{d}/{name}.jsonl")
stream = PackedBlockStream([src("big"), src("small")], None, minilm_tokenizer(), 32, shuffle_buffer=64, seed=11,
                           replay=[src("general")], replay_fraction=0.3)
h = hashlib.sha256()
for b in itertools.islice(iter(stream), 400):
    h.update(b["input_ids"].tobytes())
print(h.hexdigest())
"""


def test_stream_is_identical_across_processes_with_different_hash_seeds(tmp_path, tokenizer):
    _replay_stream(tmp_path, tokenizer, 0)  # writes the three sources
    procs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
        procs.append(subprocess.Popen([sys.executable, "-c", _DIGEST_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    digests = [out.strip().splitlines()[-1] for out, _ in outs]
    assert digests[0] == digests[1]


def test_skip_batches_resumes_exactly_with_dataloader_workers(tmp_path, tokenizer):
    """Batch b of a DataLoader comes from worker b % workers: each worker skips its own share."""
    big, small = _big_and_small(tmp_path)
    cfg = DataConfig(train=[big, small], batch_size=4, max_seq_length=32, shuffle_buffer=32, num_workers=2)
    from dapt.masking import build_masker

    masker = build_masker({"name": "random", "rate": 0.15}, tokenizer)

    def batches(skip: int, n: int) -> list[list[tuple[int, ...]]]:
        module = PackedCorpusDataModule(cfg, tokenizer, masker, data_dir=None, seed=3)
        module.skip_batches(skip)
        loader = module.train_dataloader()
        out = [[tuple(row) for row in b["input_ids"].tolist()] for b in itertools.islice(loader, n)]
        del loader
        return out

    full = batches(0, 12)
    assert batches(5, 7) == full[5:]


# ---------------------------------------------------------------------- document-level shuffle


def _docs_dir(tmp_path: Path, files: int = 12, per_file: int = 5) -> SourceConfig:
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for f in range(files):
        (corpus / f"part{f:02d}.txt").write_text("".join(f"document {f} {j} text\n" for j in range(per_file)))
    return SourceConfig(type="text", path=str(corpus), glob="*.txt", split_by="line")


@pytest.mark.parametrize("kind", ["directory", "jsonl"])
def test_documents_are_shuffled_per_pass_and_each_pass_covers_every_document_once(tmp_path, tokenizer, kind):
    source = _docs_dir(tmp_path) if kind == "directory" else _jsonl(tmp_path / "d.jsonl", [f"document {i}" for i in range(60)])
    canonical = list(iter_documents(source, None))
    stream = PackedBlockStream([source], None, tokenizer, 16, doc_shuffle_buffer=16, seed=4)
    orders = []
    for pass_index in range(3):
        per_shard = [list(stream.source_stream(0, shard, 2).documents(pass_index)) for shard in range(2)]
        assert not set(per_shard[0]) & set(per_shard[1])  # disjoint shards within a pass
        combined = per_shard[0] + per_shard[1]
        assert Counter(combined) == Counter(canonical)  # every document exactly once per pass
        for shard in per_shard:
            assert len(shard) == len(set(shard))
        orders.append(per_shard[0])
    assert orders[0] != sorted(orders[0], key=canonical.index)  # not the file order
    assert orders[0] != orders[1] and orders[1] != orders[2]  # a new order each pass
    one = list(stream.source_stream(0).documents(0))
    assert sorted(one) == sorted(canonical) and one != canonical


def test_max_passes_bounds_each_source_and_tiny_source_errors_name_it(tmp_path, tokenizer):
    big, small = _big_and_small(tmp_path)
    per_pass = [sum(1 for _ in PackedBlockStream([s], None, tokenizer, 32, max_passes=1)) for s in (big, small)]
    blocks = list(PackedBlockStream([big, small], None, tokenizer, 32, max_passes=2, shuffle_buffer=16))
    counts = Counter(b["source"] for b in blocks)
    assert counts == {0: 2 * per_pass[0], 1: 2 * per_pass[1]}  # each source did exactly 2 passes
    tiny = _jsonl(tmp_path / "tiny.jsonl", ["just a few words"])
    with pytest.raises(DataError, match="tiny.jsonl"):
        _take(PackedBlockStream([big, tiny], None, tokenizer, 32), 500)


# -------------------------------------------------------------------------------------- replay


def test_replay_share_matches_fraction_and_is_reproducible(tmp_path, tokenizer):
    n = 2000
    blocks = _take(_replay_stream(tmp_path, tokenizer, 9), n)
    replay = sum(b["source"] == 2 for b in blocks)
    assert _within(replay, n, 0.2), replay
    names = _replay_stream(tmp_path, tokenizer, 9).source_names
    assert names[2] == f"replay:{tmp_path / 'general.jsonl'}"
    river = tokenizer.convert_tokens_to_ids("river")
    assert all((river in b["input_ids"]) == (b["source"] == 2) for b in blocks[:300])
    assert _key(blocks) == _key(_take(_replay_stream(tmp_path, tokenizer, 9), n))


# -------------------------------------------------------------------------------------- shards


def test_shards_are_disjoint_and_cover_each_source_and_mix_all_sources(tmp_path, tokenizer, monkeypatch):
    """2 DDP ranks x 2 dataloader workers."""
    jsonl = _jsonl(tmp_path / "j.jsonl", [f"cardiology report {i}" for i in range(200)])
    directory = _docs_dir(tmp_path, files=20, per_file=8)
    sources = [jsonl, directory]
    docs_by_shard: list[list[list[str]]] = []
    for rank in range(2):
        for worker in range(2):
            info = type("W", (), {"num_workers": 2, "id": worker})()
            monkeypatch.setattr(dm, "get_worker_info", lambda info=info: info)
            stream = PackedBlockStream(sources, None, tokenizer, 16, shuffle_buffer=16, seed=7)
            stream.rank, stream.world_size = rank, 2
            shard, count = dm.shard_of(rank, 2)
            assert count == 4
            docs_by_shard.append([list(stream.source_stream(i, shard, count).documents(0)) for i in range(2)])
            assert {b["source"] for b in itertools.islice(iter(stream), 200)} == {0, 1}
    for i, source in enumerate(sources):
        shards = [shard_docs[i] for shard_docs in docs_by_shard]
        for a, b in itertools.combinations(shards, 2):
            assert not set(a) & set(b)
        assert Counter(d for s in shards for d in s) == Counter(iter_documents(source, None))


# ---------------------------------------------------------------------------------- accounting


def test_tokens_per_source_counts_the_delivered_batches(tmp_path, tokenizer):
    big, small = _big_and_small(tmp_path)
    general = _jsonl(tmp_path / "general.jsonl", [f"the river flows past the old town {i}" for i in range(500)])
    cfg = DataConfig(train=[big, small], replay=[general], replay_fraction=0.25, batch_size=8,
                     max_seq_length=32, shuffle_buffer=32)
    from dapt.masking import build_masker

    module = PackedCorpusDataModule(cfg, tokenizer, build_masker({"name": "random", "rate": 0.15}, tokenizer), data_dir=None)
    expected = Counter()
    for batch in itertools.islice(module.train_dataloader(), 25):
        assert batch["source"].dtype == torch.long and batch["source"].shape == (8,)
        for s in batch["source"].tolist():
            expected[module.train_stream.source_names[s]] += 32
        out = module.on_after_batch_transfer(batch, 0)
        assert set(out) >= {"input_ids", "labels"} and out["input_ids"].shape == (8, 32)
    counts = module.tokens_per_source()
    assert counts == {name: expected[name] for name in module.train_stream.source_names}
    assert sum(counts.values()) == 25 * 8 * 32 and counts[f"replay:{general.path}"] > 0
    # held-out batches are not training tokens
    module.on_after_batch_transfer((torch.zeros(4, 32, dtype=torch.long), torch.zeros(4, 32, dtype=torch.long), torch.zeros(4, 32, dtype=torch.long)), 0)
    assert module.tokens_per_source() == counts
    restored = PackedCorpusDataModule(cfg, tokenizer, module.masker, data_dir=None)
    restored.load_state_dict(module.state_dict())
    assert restored.tokens_per_source() == counts
    # a checkpoint of 2 DDP ranks resumed on 1 process keeps the run's total (both ranks' counts), once
    state = module.state_dict()
    restored.load_state_dict({**state, "ranks": [state, state]})
    assert restored.tokens_per_source() == {name: 2 * n for name, n in counts.items()}


def test_collate_carries_the_source_index():
    blocks = [{"input_ids": np.arange(4), "word_starts": np.ones(4, dtype=bool), "source": s} for s in (0, 2, 1)]
    batch = collate_blocks(blocks)
    assert batch["source"].tolist() == [0, 2, 1] and batch["source"].dtype == torch.long
    assert batch["input_ids"].shape == (3, 4) and batch["word_starts"].dtype == torch.bool
