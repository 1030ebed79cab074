"""Packing and sharding: no token lost or duplicated, exact block shapes, disjoint shards."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from dapt.data.packing import BlockPacker
from dapt.data.sources import SourceConfig, iter_documents
from dapt.data.stream import PackedBlockStream
from dapt.errors import ConfigError


def _docs(data_dir, n=300):
    src = SourceConfig(type="jsonl", path="biomed/corpus/ohsumed/test.jsonl", max_documents=n)
    return list(iter_documents(src, str(data_dir)))


def test_blocks_have_exact_length_and_special_tokens(tokenizer, data_dir):
    blocks = list(BlockPacker(tokenizer, 64).pack(_docs(data_dir, 50)))
    assert blocks
    for b in blocks:
        assert b["input_ids"].shape == (64,) and b["word_starts"].shape == (64,)
        assert b["input_ids"][0] == tokenizer.cls_token_id and b["input_ids"][-1] == tokenizer.sep_token_id
        assert not b["word_starts"][0] and not b["word_starts"][-1]


def test_no_token_lost_except_final_partial_block(tokenizer, data_dir):
    docs = _docs(data_dir, 120)
    packer = BlockPacker(tokenizer, 128, docs_per_batch=7)  # batch size that does not divide the docs
    stream: list[int] = []
    for d in docs:
        stream += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    bodies = [b["input_ids"][1:-1] for b in packer.pack(docs)]
    packed = np.concatenate(bodies).tolist()
    assert len(stream) - len(packed) < packer.body  # only the final partial block is dropped
    assert packed == stream[: len(packed)]  # order and content preserved, separators between docs


def test_word_starts_follow_tokenizer_word_ids(tokenizer):
    docs = ["Unbelievable hyperlipidemia treatments", "cardiomyopathy was noted"]
    block = next(BlockPacker(tokenizer, 12, docs_per_batch=2).pack(docs))
    ids, starts = block["input_ids"][1:-1], block["word_starts"][1:-1]
    enc = tokenizer(docs[0], add_special_tokens=False)
    words = enc.word_ids()
    expected = [True] + [words[i] != words[i - 1] for i in range(1, len(words))]
    assert starts[: len(words)].tolist() == expected
    assert ids[len(words)] == tokenizer.sep_token_id and not starts[len(words)]


def test_shards_cover_every_block_once(tokenizer, data_dir, monkeypatch):
    """2 DDP ranks x 2 dataloader workers: the union of shard streams is the corpus, without repeats."""
    import dapt.data.stream as dm

    source = SourceConfig(type="jsonl", path="biomed/corpus/ohsumed/test.jsonl", max_documents=200)
    all_docs = list(iter_documents(source, str(data_dir)))
    per_shard_docs = []
    blocks = []
    for rank in range(2):
        for worker in range(2):
            info = type("W", (), {"num_workers": 2, "id": worker})()
            monkeypatch.setattr(dm, "get_worker_info", lambda info=info: info)
            stream = PackedBlockStream([source], str(data_dir), tokenizer, 64, shuffle_buffer=8, max_passes=1)
            stream.rank, stream.world_size = rank, 2
            shard, count = dm.shard_of(rank, 2)
            per_shard_docs.append(list(iter_documents([source], str(data_dir), shard_index=shard, num_shards=count)))
            blocks.append([tuple(b["input_ids"].tolist()) for b in stream])
    docs_seen = Counter(d for shard in per_shard_docs for d in shard)
    assert sum(docs_seen.values()) == len(all_docs) and set(docs_seen) == set(all_docs)
    flat = [b for shard in blocks for b in shard]
    assert len(flat) == len(set(flat)), "a block was produced by two shards"
    for a, b in itertools.combinations(range(4), 2):
        assert not set(blocks[a]) & set(blocks[b])
    # every token of the corpus is in some block, up to one partial block per shard
    total_tokens = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in all_docs)
    assert total_tokens - len(flat) * 62 < 4 * 62


def test_sources_text_parquet_and_holdout(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first doc\n\nsecond para\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 bytes\n")  # invalid UTF-8: replaced, counted
    pq.write_table(pa.table({"body": ["p1", "p2", "p3"]}), tmp_path / "c.parquet")
    files = list(iter_documents(SourceConfig(type="text", path=str(tmp_path)), None))
    assert files == ["first doc\n\nsecond para\n", "caf\ufffd bytes\n"]
    paras = list(iter_documents(SourceConfig(type="text", path=str(tmp_path / "a.txt"), split_by="blank_line"), None))
    assert paras == ["first doc", "second para"]
    pq_docs = list(iter_documents(SourceConfig(type="parquet", path=str(tmp_path / "c.parquet"), text_field="body"), None))
    assert pq_docs == ["p1", "p2", "p3"]
    pq.write_table(pa.table({"body": [f"d{i}" for i in range(8)]}), tmp_path / "split.parquet")

    def part(name: str, every: int = 3) -> list[str]:
        src = SourceConfig(type="parquet", path=str(tmp_path / "split.parquet"), text_field="body", holdout_every=every, part=name)
        return list(iter_documents(src, None))

    assert part("dev") == ["d0", "d3", "d6"] and part("test") == ["d1", "d4", "d7"] and part("train") == ["d2", "d5"]
    assert sorted(part("dev") + part("test") + part("train")) == part("all")  # a partition: no document in two parts
    assert part("dev", 2) == ["d0", "d2", "d4", "d6"] and part("test", 2) == ["d1", "d3", "d5", "d7"]
    with pytest.raises(ConfigError, match="no train part"):
        SourceConfig(type="parquet", path="x", holdout_every=2, part="train")
    with pytest.raises(ConfigError, match="needs source.holdout_every"):
        SourceConfig(type="parquet", path="x", part="dev")


def test_hf_datasets_sources_stream_builder_files_and_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "ds.jsonl"
    path.write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    docs = list(iter_documents(SourceConfig(type="hf", path="json", hf_data_files=str(path)), None))
    assert docs == ["alpha", "beta"]
    ds_dir = tmp_path / "hf"
    datasets.Dataset.from_dict({"text": ["alpha", "beta", "gamma"]}).save_to_disk(str(ds_dir))
    assert list(iter_documents(SourceConfig(type="hf", path=str(ds_dir)), None)) == ["alpha", "beta", "gamma"]


def test_general_replay_mixes_the_configured_fraction(tmp_path, tokenizer):
    (tmp_path / "domain.jsonl").write_text("".join(f'{{"text": "cardiology patient {i}"}}\n' for i in range(3000)))
    (tmp_path / "general.jsonl").write_text("".join(f'{{"text": "football season {i}"}}\n' for i in range(3000)))
    stream = PackedBlockStream(
        [SourceConfig(type="jsonl", path=str(tmp_path / "domain.jsonl"))], None, tokenizer, 32, max_passes=1, seed=3,
        replay=[SourceConfig(type="jsonl", path=str(tmp_path / "general.jsonl"))], replay_fraction=0.25,
    )
    football = tokenizer.convert_tokens_to_ids("football")
    blocks = list(stream)
    share = sum(football in b["input_ids"] for b in blocks) / len(blocks)
    assert 0.2 < share < 0.3, share
