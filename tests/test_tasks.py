"""Task readers and task configs on the real shared files, label alignment, metrics and seed stats."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from dapt.errors import ConfigError, DataError
from dapt.evaluation.encoding import decode_ner, encode_classification, encode_ner, make_collate
from dapt.evaluation.metrics import classification_scores, ner_scores
from dapt.evaluation.readers import NerExample, TextExample, iob1_to_iob2, read_conll, read_jsonl, read_label_tsv
from dapt.evaluation.stats import aggregate_seeds, paired_comparison, summarize
from dapt.evaluation.tasks import TaskConfig, available_tasks, load_task, resolve_task
from dapt.labels import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DAPT_DATA_DIR") or REPO.parent / "shared" / "data")
needs_data = pytest.mark.skipif(not (DATA_DIR / "biomed").is_dir(), reason=f"shared data not found at {DATA_DIR}")


def n_entities(examples: list[NerExample]) -> int:
    from seqeval.metrics.sequence_labeling import get_entities

    return sum(len(get_entities(list(ex.tags))) for ex in examples)


# --- real shared files ---------------------------------------------------------------------------
@needs_data
def test_ncbi_disease_sentence_and_entity_counts():
    data = load_task(resolve_task("ncbi_disease"), DATA_DIR)
    assert (len(data.train), len(data.dev), len(data.test)) == (5424, 923, 940)
    assert (n_entities(data.train), n_entities(data.dev), n_entities(data.test)) == (5134, 787, 960)
    assert data.labels == ["O", "B-Disease", "I-Disease"]
    first = data.train[0]
    assert first.tokens[:3] == ("Identification", "of", "APC2")
    assert first.tags[8:12] == ("B-Disease", "I-Disease", "I-Disease", "I-Disease")


@needs_data
def test_scierc_iob1_becomes_iob2_and_docstart_is_skipped():
    data = load_task(resolve_task("scierc"), DATA_DIR)
    assert (len(data.train), len(data.dev), len(data.test)) == (1861, 275, 551)
    for split in (data.train, data.dev, data.test):
        for ex in split:
            assert "-DOCSTART-" not in ex.tokens
            for prev, tag in zip(("O",) + ex.tags, ex.tags):
                if tag.startswith("I-"):  # IOB2: an I- only continues an entity of its own type
                    assert prev != "O" and prev[2:] == tag[2:], ex
    assert data.train[0].tags[0] == "B-Material"  # 'English' was I-Material in IOB1
    # An IOB1 B- splits two adjacent Methods: "approximation of" + "HPSG".
    sentence = next(ex for ex in data.train if ex.tokens[:6] == ("We", "demonstrate", "that", "an", "approximation", "of"))
    assert sentence.tags[4:7] == ("B-Method", "I-Method", "B-Method")
    assert n_entities(data.train) == 5572
    assert {t[2:] for t in data.labels if t != "O"} == {"Generic", "Material", "Method", "Metric", "OtherScientificTerm", "Task"}


@needs_data
def test_conll2003_three_space_columns_label_in_second():
    data = load_task(resolve_task("conll2003"), DATA_DIR)
    assert (len(data.train), len(data.dev), len(data.test)) == (14041, 3250, 3453)
    assert n_entities(data.test) == 5648
    assert data.train[0] == NerExample(("EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."),
                                       ("B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"))


@needs_data
def test_chemprot_jsonl_keeps_markers_and_reports_missing_test_label():
    data = load_task(resolve_task("chemprot"), DATA_DIR)
    assert (len(data.train), len(data.dev), len(data.test)) == (4169, 2427, 3469)
    assert len(data.labels) == 13
    assert "<<" in data.train[0].text and "[[" in data.train[0].text
    assert any("test has no example" in n and "SUBSTRATE_PRODUCT-OF" in n for n in data.notes)


@needs_data
def test_acl_arc_and_r8_carved_dev():
    acl = load_task(resolve_task("acl_arc"), DATA_DIR)
    assert (len(acl.train), len(acl.dev), len(acl.test), len(acl.labels)) == (1688, 114, 139, 6)
    r8 = load_task(resolve_task("r8"), DATA_DIR)
    assert len(r8.train) + len(r8.dev) == 5485 and len(r8.dev) == 548 and len(r8.test) == 2189
    assert r8.labels == sorted(["earn", "acq", "trade", "ship", "grain", "crude", "interest", "money-fx"])
    again = load_task(resolve_task("r8"), DATA_DIR)
    assert again.dev == r8.dev  # fixed split seed: every model is selected on the same dev set


def test_every_task_config_validates():
    names = available_tasks()
    for name in ("ncbi_disease", "chemprot", "scierc", "acl_arc", "conll2003", "r8", "ncbi_disease_hub"):
        assert name in names
    for name in names:
        task = resolve_task(name)
        assert task.name == name


# --- readers on hand-made files --------------------------------------------------------------------
def test_iob1_to_iob2():
    assert iob1_to_iob2(["I-A", "I-A", "B-A", "O", "I-B", "I-A"]) == ["B-A", "I-A", "B-A", "O", "B-B", "B-A"]
    assert iob1_to_iob2(["B-A", "I-A", "O"]) == ["B-A", "I-A", "O"]  # IOB2 passes through


def test_conll_docstart_tabs_and_trailing_sentence(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("-DOCSTART-\tO\n\nJohn\tB-PER\nlives\tO\n\n\n-DOCSTART-\tO\nParis\tB-LOC\nis\tO")  # no final newline
    sents = read_conll(f, separator="tab", label_column=1)
    assert sents == [NerExample(("John", "lives"), ("B-PER", "O")), NerExample(("Paris", "is"), ("B-LOC", "O"))]


def test_malformed_conll_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("a NN O O\nb NN O\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: malformed CoNLL line, expected 4"):
        read_conll(f, separator="space")


def test_label_column_that_does_not_exist(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("a\tB-X\n")
    with pytest.raises(DataError, match=r"x\.txt:1: label_column=3 does not exist"):
        read_conll(f, separator="tab", label_column=3)
    with pytest.raises(DataError, match="not O, B-TYPE or I-TYPE"):
        read_conll(f, separator="tab", label_column=0)


def test_jsonl_and_tsv_errors(tmp_path):
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "a", "label": "X"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'label' does not exist"):
        read_jsonl(j)
    j.write_text('{"text": "a", "meta": {"y": "Z"}}\nnot json\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        read_jsonl(j, label_field="meta.y")
    t = tmp_path / "x.tsv"
    t.write_text("earn\tsome text\tmore\nno tab here\n")
    with pytest.raises(DataError, match=r"x\.tsv:2: malformed line"):
        read_label_tsv(t)
    t.write_text("earn\tsome text\tmore\n")
    assert read_label_tsv(t) == [TextExample("some text\tmore", "earn")]


def _write_task(tmp_path: Path, train: str, dev: str, test: str, **kw) -> TaskConfig:
    for name, text in (("train", train), ("dev", dev), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text(text)
    spec = {"name": "toy", "type": "classification", "metric": "accuracy", "reader": {"format": "jsonl"},
            "train": "train.jsonl", "dev": "dev.jsonl", "test": "test.jsonl", **kw}
    return resolve_task(spec)


def _rows(*labels: str) -> str:
    return "".join(json.dumps({"text": f"t{i}", "label": lab}) + "\n" for i, lab in enumerate(labels))


def test_empty_split_is_an_error(tmp_path):
    task = _write_task(tmp_path, _rows("A", "B"), "", _rows("A"))
    with pytest.raises(DataError, match="toy: dev split is empty"):
        load_task(task, tmp_path)


def test_unseen_dev_test_labels_warned_by_name_and_ignored(tmp_path, caplog):
    task = _write_task(tmp_path, _rows("A", "B", "A"), _rows("A", "C"), _rows("B", "C", "C", "D"))
    with caplog.at_level(logging.WARNING):
        data = load_task(task, tmp_path)
    assert [ex.label for ex in data.dev] == ["A"] and [ex.label for ex in data.test] == ["B"]
    assert "C (2 examples), D (1 examples)" in caplog.text and "test" in caplog.text
    strict = _write_task(tmp_path, _rows("A", "B"), _rows("A", "C"), _rows("B"), unseen_labels="error")
    with pytest.raises(DataError, match="dev has labels unseen in train: C"):
        load_task(strict, tmp_path)


def test_unseen_ner_type_becomes_o_with_warning(tmp_path, caplog):
    for name, body in (("train", "a B-X\nb O\n"), ("dev", "a B-X\n"), ("test", "a B-Y\nb I-Y\nc B-X\n")):
        (tmp_path / f"{name}.txt").write_text(body)
    task = resolve_task({"name": "toyner", "type": "ner", "metric": "f1", "reader": {"format": "conll", "label_column": 1},
                         "train": "train.txt", "dev": "dev.txt", "test": "test.txt"})
    with caplog.at_level(logging.WARNING):
        data = load_task(task, tmp_path)
    assert data.test[0].tags == ("O", "O", "B-X")
    assert "Y (1 entities)" in caplog.text


def test_unknown_task_lists_available():
    with pytest.raises(ConfigError, match=r"unknown task 'nope'.*available tasks: .*chemprot.*ncbi_disease"):
        resolve_task("nope")


def test_task_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown config key 'task.t.colour'"):
        resolve_task({"name": "t", "type": "ner", "metric": "f1", "train": "a", "test": "b", "colour": 1})
    with pytest.raises(ConfigError, match="metric='accuracy'"):
        resolve_task({"name": "t", "type": "ner", "metric": "accuracy", "train": "a", "dev": "a", "test": "b"})


@needs_data
def test_missing_data_file_names_path(tmp_path):
    with pytest.raises(DataError, match="train file not found"):
        load_task(resolve_task("ncbi_disease"), tmp_path)


def test_hub_reader_maps_classlabel_ints(monkeypatch):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({
        "tokens": datasets.Sequence(datasets.Value("string")),
        "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-Disease", "I-Disease"])),
    })
    ds = datasets.Dataset.from_dict({"tokens": [["a", "b", "c"]], "ner_tags": [[0, 1, 2]]}, features=feats)
    seen = {}

    def fake_load(name, config=None, split=None, revision=None):
        seen["args"] = (name, split)
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = load_task(resolve_task("ncbi_disease_hub"), "/nonexistent")
    assert data.train[0] == NerExample(("a", "b", "c"), ("O", "B-Disease", "I-Disease"))
    assert seen["args"] == ("ncbi/ncbi_disease", "test")


# --- label alignment -----------------------------------------------------------------------------
def test_first_subword_alignment_wordpiece(tokenizer):
    ex = NerExample(("adenomatous", "polyposis", "coli", "is", "rare"), ("B-Disease", "I-Disease", "I-Disease", "O", "O"))
    label2id = {"O": 0, "B-Disease": 1, "I-Disease": 2}
    enc = encode_ner([ex], tokenizer, label2id, max_length=64)
    feat = enc.features[0]
    pieces = tokenizer.convert_ids_to_tokens(feat["input_ids"])
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert len(pieces) > len(ex.tokens) + 2  # some word was split into several WordPieces
    labelled = [(p, lab) for p, lab in zip(pieces, feat["labels"]) if lab != IGNORE_INDEX]
    assert [lab for _, lab in labelled] == [1, 2, 2, 0, 0]
    assert all(not p.startswith("##") for p, _ in labelled)  # labels only on first sub-tokens
    assert feat["labels"][0] == IGNORE_INDEX and feat["labels"][-1] == IGNORE_INDEX
    assert [pieces[i] for i in feat["word_starts"]] == [p for p, _ in labelled]
    # Predictions read back per word; a perfect sub-token prediction gives the gold tags.
    batch = make_collate(tokenizer.pad_token_id)([feat])
    tags = decode_ner(batch["labels"].clamp(min=0), batch["word_starts"], ["O", "B-Disease", "I-Disease"])
    assert tags == [list(ex.tags)]


def test_truncated_words_keep_gold_and_predict_o(tokenizer):
    ex = NerExample(tuple(["word"] * 20) + ("tumour",), tuple(["O"] * 20) + ("B-Disease",))
    enc = encode_ner([ex], tokenizer, {"O": 0, "B-Disease": 1, "I-Disease": 2}, max_length=10)
    assert len(enc.features[0]["input_ids"]) == 10
    assert enc.features[0]["word_starts"][-1] == -1 and enc.gold[0][-1] == "B-Disease"


def test_classification_encoding_and_padding(tokenizer):
    exs = [TextExample("<< aspirin >> inhibits [[ COX ]]", "INHIBITOR"), TextExample("short", "AGONIST")]
    enc = encode_classification(exs, tokenizer, {"AGONIST": 0, "INHIBITOR": 1}, max_length=32)
    assert enc.gold == [1, 0]
    batch = make_collate(tokenizer.pad_token_id)([enc[0], enc[1]])
    assert batch["input_ids"].shape[0] == 2 and batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()
    assert tokenizer.convert_ids_to_tokens(enc[0]["input_ids"])[1:3] == ["<", "<"]  # markers stay as text


# --- metrics and seed statistics -------------------------------------------------------------------
def test_seqeval_strict_f1_on_hand_made_predictions():
    gold = [["B-Disease", "I-Disease", "O", "B-Chem"], ["O", "B-Disease", "O"]]
    pred = [["B-Disease", "I-Disease", "O", "O"], ["O", "B-Disease", "B-Chem"]]
    s = ner_scores(gold, pred)
    # 3 gold entities, 3 predicted, 2 correct.
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(2 / 3)
    assert s["per_type"]["Disease"]["f1"] == pytest.approx(1.0) and s["per_type"]["Chem"]["f1"] == 0.0
    # Strict: a boundary error is a miss, and an I- after O does not open an entity.
    assert ner_scores([["B-D", "I-D"]], [["B-D", "O"]])["f1"] == 0.0
    assert ner_scores([["B-D", "I-D"]], [["I-D", "I-D"]])["f1"] == 0.0
    assert ner_scores([["O", "O"]], [["O", "O"]])["f1"] == 0.0


def test_classification_scores():
    s = classification_scores([0, 1, 1, 2], [0, 1, 2, 2], ["a", "b", "c", "d"])
    assert s["accuracy"] == pytest.approx(0.75) and s["micro_f1"] == pytest.approx(0.75)
    assert s["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3, abs=1e-6)  # 'd' absent everywhere: skipped


def test_aggregation_and_paired_test():
    assert summarize([0.5, 0.7, 0.6]) == pytest.approx({"mean": 0.6, "std": 0.1, "values": [0.5, 0.7, 0.6], "n": 3})
    assert summarize([0.4])["std"] == 0.0
    per_seed = [{"seed": s, "test": {"f1": v, "precision": 0.5}, "dev": {"f1": v - 0.1}} for s, v in enumerate([0.5, 0.7])]
    agg = aggregate_seeds(per_seed, ["f1", "precision", "recall"])
    assert agg["test_f1"]["values"] == [0.5, 0.7] and agg["dev_f1"]["mean"] == pytest.approx(0.5)
    assert "test_recall" not in agg
    from scipy.stats import ttest_rel

    before, after = [0.70, 0.72, 0.69, 0.71], [0.74, 0.75, 0.73, 0.76]
    cmp = paired_comparison(before, after)
    assert cmp["delta"] == pytest.approx(0.04) and cmp["p_value"] == pytest.approx(ttest_rel(after, before).pvalue)
    assert cmp["significant"] and cmp["verdict"].startswith("significant gain")
    noisy = paired_comparison([0.70, 0.75, 0.68], [0.72, 0.71, 0.70])
    assert not noisy["significant"] and noisy["verdict"].startswith("inconclusive")  # p >= alpha is not "no effect"
    one = paired_comparison([0.7], [0.8])
    assert one["p_value"] is None and "one seed" in one["verdict"]
    assert paired_comparison([0.7, 0.7], [0.7, 0.7])["p_value"] is None
    with pytest.raises(ValueError):
        paired_comparison([0.1], [0.1, 0.2])
