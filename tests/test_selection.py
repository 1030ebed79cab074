"""Adaptation-data selection (``dapt.pipeline.selection``, ``dapt.data.dsir``): kNN-TAPT and DSIR pick
task-like documents, never read the task's dev/test files, cache their JSONL and load as a source.

Everything runs on small synthetic corpora in ``tmp_path``: biomedical sentences (the target's domain)
mixed with football, cooking and stock-market ones. Only the kNN tests load the real MiniLM encoder.
"""

from __future__ import annotations

import builtins
import json
import math
import pathlib
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dapt.data.sources import SourceConfig, as_source, iter_documents
from dapt.errors import ConfigError, DataError
from dapt.pipeline.selection import SelectionConfig, select_documents, task_train_texts

BIO_SUBJECTS = ["the kinase", "the receptor", "the inhibitor", "the protein", "the enzyme", "the antibody", "the ligand"]
BIO_VERBS = ["phosphorylates", "binds", "inhibits", "activates", "downregulates", "is expressed with", "antagonises"]
BIO_OBJECTS = ["the tyrosine kinase receptor", "the protein complex", "mitochondrial enzymes", "the EGFR pathway",
               "insulin receptor substrate", "the apoptosis regulator", "cytokine signalling"]
BIO_TAILS = ["in human cells", "in vitro", "in mouse liver", "after drug treatment", "at nanomolar concentrations"]
OTHER = {
    "football": (["the striker", "the goalkeeper", "the midfielder", "the coach"], ["scored against", "passed to", "tackled", "praised"],
                 ["the home team", "the referee", "the league leaders", "the penalty spot"], ["in the second half", "at the stadium", "before the final whistle"]),
    "cooking": (["the chef", "the baker", "my grandmother", "the recipe"], ["whisks", "bakes", "seasons", "slices"],
                ["the chocolate cake", "fresh basil pasta", "the onion soup", "a loaf of sourdough"], ["for dinner", "in a hot oven", "with garlic butter"]),
    "markets": (["the stock market", "the central bank", "investors", "the hedge fund"], ["sold", "bought", "rallied on", "priced in"],
                ["bond yields", "technology shares", "the quarterly earnings", "oil futures"], ["on wall street", "before the closing bell", "amid inflation fears"]),
}
MARKER = "zebra xylophone quartet marmalade lighthouse zephyr"  # only in dev/test (and one corpus document)


def _sentence(rng: random.Random, parts: tuple[list[str], ...], n: int = 2) -> str:
    return " ".join(f"{rng.choice(parts[0]).capitalize()} {rng.choice(parts[1])} {rng.choice(parts[2])} {rng.choice(parts[3])}."
                    for _ in range(n))


def _bio(rng: random.Random) -> str:
    return _sentence(rng, (BIO_SUBJECTS, BIO_VERBS, BIO_OBJECTS, BIO_TAILS), rng.randint(1, 3))


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _corpus(tmp_path: Path, n_bio: int, n_other: int, seed: int = 0) -> tuple[list[SourceConfig], set[str]]:
    """A shuffled corpus of ``n_bio`` biomedical and ``n_other`` unrelated documents plus one marker
    document; returns its source and the set of biomedical texts."""
    rng = random.Random(seed)
    bio = [_bio(rng) for _ in range(n_bio)]
    other = [_sentence(rng, OTHER[rng.choice(sorted(OTHER))], rng.randint(1, 3)) for _ in range(n_other)]
    docs = bio + other + [MARKER + " " + MARKER]
    rng.shuffle(docs)
    path = _write_jsonl(tmp_path / "corpus" / "docs.jsonl", [{"text": t} for t in docs])
    return [SourceConfig(type="jsonl", path=str(path))], set(bio)


@pytest.fixture()
def task_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A tiny ChemProt-shaped task ``synth`` (jsonl classification, train/dev/test files under
    ``data_dir``) registered in a config dir of its own; dev/test hold the marker sentence."""
    rng = random.Random(1)
    data_dir = tmp_path / "data"
    base = data_dir / "biomed/classification/synth"
    train = [{"text": _bio(rng), "label": rng.choice(["INHIBITOR", "ACTIVATOR"])} for _ in range(12)]
    _write_jsonl(base / "train.txt", train)
    for split in ("dev", "test"):
        _write_jsonl(base / f"{split}.txt", [{"text": MARKER, "label": "INHIBITOR"}, {"text": MARKER, "label": "ACTIVATOR"}])
    conf = tmp_path / "conf" / "task"
    conf.mkdir(parents=True)
    (conf / "synth.yaml").write_text(
        "name: synth\ntype: classification\nmetric: micro_f1\nreader:\n  format: jsonl\n  text_field: text\n  label_field: label\n"
        "train: biomed/classification/synth/train.txt\ndev: biomed/classification/synth/dev.txt\n"
        "test: biomed/classification/synth/test.txt\n", encoding="utf-8")
    monkeypatch.setenv("DAPT_CONFIG_DIR", str(tmp_path / "conf"))
    return {"data_dir": str(data_dir), "cache_dir": str(tmp_path / "cache"), "train": [r["text"] for r in train],
            "dev": base / "dev.txt", "test": base / "test.txt"}


def _selected_texts(result: Any) -> list[str]:
    return [json.loads(line)["text"] for line in Path(result.path).read_text(encoding="utf-8").splitlines()]


def test_knn_selects_documents_nearer_the_task_than_random(tmp_path, task_env):
    sources, bio = _corpus(tmp_path, n_bio=50, n_other=150)
    cfg = SelectionConfig(method="knn", task="synth", size=30, k=5, candidates=None, batch_size=32, max_length=64)
    result = select_documents(cfg, sources=sources, data_dir=task_env["data_dir"], cache_dir=task_env["cache_dir"])
    assert result.method == "knn" and result.scanned == 201 and result.task == "synth" and result.task_documents == 12
    assert 0 < result.documents <= 30
    # The encoder's own figure: the selection is far more similar to the task than a random sample...
    assert result.mean_similarity_selected > result.mean_similarity_random + 0.15, result.as_results()
    # ...and it is made of the biomedical documents.
    texts = _selected_texts(result)
    assert sum(t in bio for t in texts) / len(texts) >= 0.9
    assert json.loads(json.dumps(result.as_results()))["documents"] == result.documents


def test_dsir_selects_target_like_documents_reproducibly(tmp_path, task_env):
    sources, bio = _corpus(tmp_path, n_bio=60, n_other=200)
    kwargs = dict(sources=sources, data_dir=task_env["data_dir"], cache_dir=task_env["cache_dir"])
    first = select_documents(SelectionConfig(method="dsir", task="synth", size=25, seed=0, cache=False), **kwargs)
    texts = _selected_texts(first)
    assert first.documents == 25 and first.scanned == 261
    assert sum(t in bio for t in texts) / len(texts) >= 0.9
    assert first.stats["mean_log_weight_selected"] > first.stats["mean_log_weight_all"]
    again = select_documents(SelectionConfig(method="dsir", task="synth", size=25, seed=0, cache=False), **kwargs)
    assert _selected_texts(again) == texts  # same seed: the same sample, even rebuilt
    other_seeds = [_selected_texts(select_documents(SelectionConfig(method="dsir", task="synth", size=25, seed=s), **kwargs))
                   for s in (1, 2)]
    assert any(o != texts for o in other_seeds)  # another seed: another draw from the same weights


def test_dsir_weights_and_resampling_unit():
    from dapt.data.dsir import dsir_select, ngram_ids

    assert ngram_ids("Kinase binds", 1000) == ngram_ids("kinase   BINDS", 1000)  # lowercased words, stable hash
    assert len(ngram_ids("a b c", 1000)) == 5  # 3 unigrams + 2 bigrams
    target = ["the kinase binds the receptor"] * 5
    raw = ["the kinase binds the receptor", "football is played outdoors", "", "the receptor binds a kinase"]
    selected, stats = dsir_select(target, lambda: iter(raw), 2, buckets=1000, seed=3)
    assert sorted(d.index for d in selected) == [0, 3]  # the target-like two, in corpus order
    assert stats["scanned"] == 4 and stats["skipped_empty"] == 1


@pytest.mark.parametrize("method", ["dsir", "knn"])
def test_selection_never_reads_the_tasks_dev_or_test_files(tmp_path, task_env, monkeypatch, method):
    sources, _ = _corpus(tmp_path, n_bio=20, n_other=30)
    opened: list[str] = []
    real_path_open, real_open = pathlib.Path.open, builtins.open

    def path_open(self, *args, **kwargs):
        opened.append(str(Path(self).resolve()))
        return real_path_open(self, *args, **kwargs)

    def plain_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            opened.append(str(Path(file).resolve()))
        return real_open(file, *args, **kwargs)

    cfg = SelectionConfig(method=method, task="synth", size=10, k=3, max_length=32)
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "open", path_open)
        m.setattr(builtins, "open", plain_open)
        result = select_documents(cfg, sources=sources, data_dir=task_env["data_dir"], cache_dir=task_env["cache_dir"])
    train = str((Path(task_env["data_dir"]) / "biomed/classification/synth/train.txt").resolve())
    assert train in opened, "the recorder saw no read of the train file: it records nothing"
    for split in ("dev", "test"):
        assert str(task_env[split].resolve()) not in opened, f"selection opened the task's {split} file"
    # Had dev/test been a target, the corpus's marker document (identical to their text) would be chosen.
    assert not any(MARKER in t for t in _selected_texts(result))
    assert task_train_texts("synth", task_env["data_dir"]) == task_env["train"]


def test_carved_dev_is_left_out_like_load_task_and_ner_words_are_joined(tmp_path):
    from dapt.evaluation.tasks import load_task, resolve_task

    rng = random.Random(2)
    path = _write_jsonl(tmp_path / "t" / "train.jsonl", [{"text": f"doc {i} " + _bio(rng), "label": "AB"[i % 2]} for i in range(30)])
    _write_jsonl(tmp_path / "t" / "test.jsonl", [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}])
    spec = {"name": "carved", "type": "classification", "metric": "accuracy", "reader": {"format": "jsonl"},
            "train": str(path), "dev": None, "test": str(tmp_path / "t" / "test.jsonl"), "dev_fraction": 0.2}
    texts = task_train_texts(spec, tmp_path)
    assert texts == [ex.text for ex in load_task(resolve_task(spec), tmp_path).train]
    assert len(texts) == 24  # 6 of 30 carved out as dev, never in the target
    conll = tmp_path / "ner" / "train.txt"
    conll.parent.mkdir()
    conll.write_text("The\tO\nkinase\tB-Protein\nbinds\tO\n\nEGFR\tB-Protein\n", encoding="utf-8")
    ner = {"name": "ner", "type": "ner", "metric": "f1", "reader": {"format": "conll", "separator": "tab"},
           "train": str(conll), "dev": str(conll), "test": str(conll)}
    assert task_train_texts(ner, tmp_path) == ["The kinase binds", "EGFR"]


def test_selection_jsonl_loads_as_a_source(tmp_path, task_env):
    sources, _ = _corpus(tmp_path, n_bio=20, n_other=40)
    result = select_documents(SelectionConfig(method="dsir", task="synth", size=15), sources=sources,
                              data_dir=task_env["data_dir"], cache_dir=task_env["cache_dir"])
    spec = result.as_source()
    assert spec["type"] == "jsonl" and Path(spec["path"]).is_absolute() and spec["text_field"] == "text"
    docs = list(iter_documents(as_source(spec), None))
    lines = Path(result.path).read_text(encoding="utf-8").splitlines()
    assert result.documents == len(lines) == len(docs) == 15
    assert result.bytes == Path(result.path).stat().st_size
    corpus = set(iter_documents(sources, None))
    assert set(docs) <= corpus and len(set(docs)) == 15


def test_second_call_is_a_cache_hit_and_size_changes_the_key(tmp_path, task_env, monkeypatch):
    import dapt.pipeline.selection as selection

    sources, _ = _corpus(tmp_path, n_bio=20, n_other=40)
    kwargs = dict(sources=sources, data_dir=task_env["data_dir"], cache_dir=task_env["cache_dir"])
    first = select_documents(SelectionConfig(method="dsir", task="synth", size=10), **kwargs)
    assert not first.cached
    assert Path(first.path) == Path(task_env["cache_dir"]).resolve() / "selections" / f"{first.cache_key}.jsonl"
    assert Path(first.path).with_suffix(".json").is_file()

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit read the corpus")

    with monkeypatch.context() as m:
        m.setattr(selection, "iter_documents", no_reading)
        hit = select_documents(SelectionConfig(method="dsir", task="synth", size=10), **kwargs)
    assert hit.cached and hit.cache_key == first.cache_key and hit.path == first.path and hit.documents == first.documents
    bigger = select_documents(SelectionConfig(method="dsir", task="synth", size=12), **kwargs)
    assert not bigger.cached and bigger.cache_key != first.cache_key and bigger.documents == 12
    # The task's train text is part of the key: editing it rebuilds.
    train = Path(task_env["data_dir"]) / "biomed/classification/synth/train.txt"
    train.write_text(train.read_text(encoding="utf-8") + json.dumps({"text": "the kinase binds", "label": "INHIBITOR"}) + "\n")
    edited = select_documents(SelectionConfig(method="dsir", task="synth", size=10), **kwargs)
    assert not edited.cached and edited.cache_key != first.cache_key
    # A damaged entry (data file of another size than recorded) is rebuilt, not served.
    Path(first.path).write_text("", encoding="utf-8")
    train.write_text("".join(train.read_text(encoding="utf-8").splitlines(keepends=True)[:-1]))
    rebuilt = select_documents(SelectionConfig(method="dsir", task="synth", size=10), **kwargs)
    assert rebuilt.cache_key == first.cache_key and not rebuilt.cached and rebuilt.documents == 10


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"method": "foo"}, "selection.method"),
        ({"method": "knn"}, "selection.task"),
        ({"method": "dsir"}, "selection.task"),
        ({"method": "dsir", "task": "synth", "size": 0}, "selection.size"),
        ({"method": "knn", "task": "synth", "k": 0}, "selection.k"),
        ({"method": "knn", "task": "synth", "candidates": 0}, "selection.candidates"),
        ({"method": "knn", "task": "synth", "batch_size": 0}, "selection.batch_size"),
        ({"method": "knn", "task": "synth", "max_length": 1}, "selection.max_length"),
    ],
)
def test_bad_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        SelectionConfig(**overrides)
    assert "\n" not in str(info.value)


def test_unknown_key_none_method_and_empty_selection(tmp_path, task_env):
    from dapt.config import to_dataclass

    with pytest.raises(ConfigError, match=r"selection\.sizes"):
        to_dataclass(SelectionConfig, {"method": "dsir", "task": "synth", "sizes": 3}, prefix="selection")
    assert to_dataclass(SelectionConfig, {"method": "dsir", "task": "synth", "candidates": None}, prefix="selection").candidates is None
    corpus = _write_jsonl(tmp_path / "empty" / "docs.jsonl", [{"text": "!!! ???"}, {"text": "..."}])
    kwargs = dict(sources=[SourceConfig(type="jsonl", path=str(corpus))], data_dir=task_env["data_dir"], cache_dir=task_env["cache_dir"])
    with pytest.raises(ConfigError, match=r"selection\.method=none"):
        select_documents(SelectionConfig(), **kwargs)
    with pytest.raises(DataError, match="selected no document") as info:
        select_documents(SelectionConfig(method="dsir", task="synth", size=5), **kwargs)
    assert "\n" not in str(info.value)
    assert not list((Path(task_env["cache_dir"]) / "selections").glob("*.json"))  # nothing cached for a failure


def test_knn_union_caps_by_best_similarity():
    from dapt.pipeline.selection import KnnScan, knn_union

    scan = KnnScan(neighbour_index=np.array([[0, 2, -1], [2, 4, 5]]), neighbour_similarity=np.zeros((2, 3)),
                   best_similarity=np.array([0.9, 0.1, 0.5, 0.0, 0.95, 0.2]))
    assert knn_union(scan, 10).tolist() == [0, 2, 4, 5]
    assert knn_union(scan, 2).tolist() == [0, 4]


# --- the run: DAPT trains on the selection, held-out sets and the control stay as configured -------------

def test_dsir_selection_run_trains_on_the_selected_documents_only(compose, one_thread, tmp_path):
    from dapt.pipeline.run import train
    from tests.conftest import TINY_OVERRIDES

    _, objects = train(compose([*TINY_OVERRIDES, "selection=dsir", "selection.task=chemprot", "selection.size=60",
                                "selection.candidates=600", f"paths.cache_dir={tmp_path / 'cache'}"]))
    results = objects["results"]
    block = results["selection"]
    assert block["documents"] == 60 and block["scanned"] == 600 and block["task"] == "chemprot"
    # every trained token came from the selection file; the configured corpus was only scanned
    assert list(results["train_sources"]) == [block["path"]] and results["train_sources"][block["path"]] > 0
    assert [s["path"] for s in results["data"]["train"]] == [block["path"]]
    assert results["config"]["data"]["train"][0]["path"].startswith("biomed/")  # what was configured (and scanned)
    assert results["control"] is not None and math.isfinite(results["domain_ppl_after"])
