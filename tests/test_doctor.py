"""``dapt doctor`` profiles corpora, ranks findings (near-duplicates, contamination, size, noise...) and
writes doctor.json / doctor.md for a corpus, a run or a sweep."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from dapt.diagnostics.contamination import contamination_finding, corpus_ngrams, split_overlap
from dapt.diagnostics.corpus import CorpusProfile, domain_terms, fragmentation, profile, size_findings, vocabulary_overlap
from dapt.diagnostics.findings import SCHEMA_VERSION, SEVERITIES, Finding
from dapt.diagnostics.near_duplicates import near_duplicate_finding, near_duplicates
from dapt.diagnostics.report import COMMON_KEYS, CORPUS_KEYS, RUN_KEYS, document, markdown

FINDING_FIELDS = {f.name for f in dataclasses.fields(Finding)}
DOMAIN_SYLLABLES = ["kin", "ase", "pro", "tein", "cyto", "gen", "path", "ol", "hep", "at", "ic", "onc", "lym", "pho", "neur", "al"]
GENERAL_SYLLABLES = ["foot", "ball", "ga", "me", "town", "riv", "er", "sto", "ne", "wa", "ll", "mu", "sic", "po", "et", "ry"]


def _vocab(syllables: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = {"".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(n * 3)}
    return sorted(words)[:n]


def _docs(n: int, words: int, seed: int, vocab: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(words)) + "." for _ in range(n)]


def _edited(doc: str, rng: random.Random, vocab: list[str]) -> str:
    """A near-copy: one word replaced, one appended (Jaccard of word 5-grams ~0.93)."""
    words = doc.split()
    words[rng.randrange(len(words))] = rng.choice(vocab)
    return " ".join([*words, rng.choice(vocab)])


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


DOMAIN = _vocab(DOMAIN_SYLLABLES, 400, 0)
GENERAL = _vocab(GENERAL_SYLLABLES, 400, 1)


def _near_dup_corpus(n_unique: int = 140, n_copies: int = 60) -> list[str]:
    rng = random.Random(7)
    docs = _docs(n_unique, 150, 3, DOMAIN)
    for _ in range(n_copies):
        docs.append(_edited(docs[rng.randrange(n_unique)], rng, DOMAIN))
    return docs


# ----------------------------------------------------------------------------- units

def test_profile_flags_duplicates_noise_and_fragmentation(tokenizer):
    docs = ["the cardiomyopathy patient had hyperlipidemia " * 5] * 3 + ["football is a game played " * 6, "\ufffd\ufffd ### 123 456"]
    p = profile(docs, tokenizer)
    assert p.documents == 5 and abs(p.duplicate_documents - 2 / 5) < 1e-9
    assert p.replacement_chars == 2 and p.short_documents == 1 / 5
    assert p.tokens > p.words > 0 and p.bytes == sum(len(d.encode()) for d in docs) and not p.capped
    assert profile(docs, tokenizer, max_documents=4).capped
    general = profile(["football is a game played by the team " * 5], tokenizer)
    terms = domain_terms(p, general)
    assert "cardiomyopathy" in terms and "football" not in terms
    assert fragmentation(["cardiomyopathy", "hyperlipidemia"], tokenizer) > fragmentation(["the", "game"], tokenizer) == 1.0
    assert 0 < vocabulary_overlap(p, general) < 1


def test_near_duplicates_found_in_edited_copies_not_in_a_clean_corpus():
    docs = _near_dup_corpus()
    report = near_duplicates(docs)
    assert report.documents == 200
    assert report.near_duplicates == 60, report.as_dict()  # the 60 edited copies, nothing else
    ex = report.examples[0]
    assert docs[ex["earlier"]][:80] == ex["earlier_text"] and docs[ex["later"]][:80] == ex["later_text"] and ex["earlier"] < ex["later"]
    found = near_duplicate_finding(report)
    assert found.severity == "warning" and found.check == "corpus.near_duplicates" and "30.0%" in found.title
    clean = near_duplicates(_docs(200, 150, 3, DOMAIN))
    assert clean.near_duplicates == 0 and near_duplicate_finding(clean).severity == "ok"
    assert near_duplicates(["same text " * 20] * 4).near_duplicates == 3  # exact copies count too


def test_contamination_flags_test_as_error_dev_as_warning_and_passes_clean_text():
    corpus_docs = _docs(50, 120, 5, DOMAIN)
    leaked = _docs(20, 25, 9, DOMAIN)  # task sentences
    corpus_docs[10] += " " + " ".join(leaked)  # all of them pasted into one document
    grams = corpus_ngrams(corpus_docs)
    test = split_overlap(grams, [s.upper() for s in leaked])  # lowercased words: case does not hide a copy
    assert test.contaminated == 20 and test.contaminated_share == 1.0 and test.ngram_overlap == 1.0
    error = contamination_finding("leaky", "test", test)
    assert error.severity == "error" and "leaky" in error.title and "test" in error.title and error.scope == "task leaky test"
    assert contamination_finding("leaky", "dev", test).severity == "warning"
    clean = split_overlap(grams, _docs(20, 25, 11, DOMAIN) + ["too short"])
    assert clean.contaminated == 0 and clean.too_short == 1 and contamination_finding("clean", "test", clean).severity == "ok"


def _profile(tokens: int, documents: int = 100, capped: bool = False) -> CorpusProfile:
    return CorpusProfile(documents=documents, words=tokens, tokens=tokens, tokens_per_word=1.0, duplicate_documents=0.0,
                         short_documents=0.0, replacement_chars=0, non_alpha_share=0.05, top_words=[], bytes=4 * tokens, capped=capped)


def test_many_planned_epochs_over_a_tiny_corpus_is_a_finding():
    plan = {"steps": 300, "tokens_per_step": 2048, "planned_tokens": 614_400, "accumulate_grad_batches": 1, "devices": 1}
    tiny = size_findings(_profile(20_000), plan, corpus_tokens=20_000, estimated=False, method="whole")
    epochs = next(f for f in tiny if f.check == "corpus.epochs")
    assert epochs.severity == "warning" and abs(epochs.measured["epochs"] - 30.72) < 1e-6
    assert epochs.overrides == ["trainer.max_steps=29"]  # ~3 passes
    assert next(f for f in tiny if f.check == "corpus.size").severity == "info"  # far below published DAPT scale
    big = size_findings(_profile(20_000), plan, corpus_tokens=5e9, estimated=True, method="bytes")
    assert [f.severity for f in big] == ["ok", "ok"]


def test_doctor_json_schema_is_stable():
    findings = [Finding("corpus.x", "ok", "fine"), Finding("corpus.y", "error", "bad", {"a": 1}, {"a": 0}, "why", ["k=v"], "s")]
    extra = {k: None for k in CORPUS_KEYS}
    doc = document("corpus", findings, extra)
    assert tuple(doc) == (*COMMON_KEYS, *CORPUS_KEYS) and doc["schema_version"] == SCHEMA_VERSION == 1
    assert [f["severity"] for f in doc["findings"]] == ["error", "ok"] and doc["counts"] == {"error": 1, "warning": 0, "info": 0, "ok": 1}
    assert all(set(f) == FINDING_FIELDS for f in doc["findings"])
    assert FINDING_FIELDS == {"check", "severity", "title", "measured", "threshold", "why", "overrides", "scope"}
    assert tuple(SEVERITIES) == ("error", "warning", "info", "ok")
    with pytest.raises(ValueError, match="differ from the schema"):
        document("corpus", findings, {**extra, "surprise": 1})
    with pytest.raises(ValueError, match="kind"):
        document("model", findings, {"path": "x", "runs": []})
    assert "`k=v`" in markdown(doc) and "## error: bad" in markdown(doc)


# ----------------------------------------------------------------------------- the command

def _conll(path: Path, sentences: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in sentences:
        words = s.rstrip(".").split()
        lines += [f"{w}\t{'B-Gene' if i == 0 else 'O'}" for i, w in enumerate(words)] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def _tasks(tmp_path: Path, leaked: list[str]) -> str:
    """tasks=[...] with an NER task whose *test* sentences are ``leaked`` and a clean classification task."""
    ner = tmp_path / "tasks" / "leaky"
    files = {split: _conll(ner / f"{split}.txt", sents) for split, sents in
             (("train", _docs(10, 12, 21, DOMAIN)), ("dev", _docs(10, 12, 22, DOMAIN)), ("test", leaked))}
    cls = tmp_path / "tasks" / "clean"
    rng = random.Random(4)
    for split, seed in (("train", 31), ("dev", 32), ("test", 33)):
        rows = [{"text": t, "label": rng.choice(["A", "B"])} for t in _docs(12, 15, seed, DOMAIN)]
        rows[0]["label"], rows[1]["label"] = "A", "B"
        (cls / f"{split}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (cls / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return ("tasks=[{name: leaky, type: ner, metric: f1, reader: {format: conll}, "
            f"train: {files['train']}, dev: {files['dev']}, test: {files['test']}}}, "
            "{name: clean, type: classification, metric: micro_f1, reader: {format: jsonl}, "
            f"train: {cls / 'train.jsonl'}, dev: {cls / 'dev.jsonl'}, test: {cls / 'test.jsonl'}}}]")


def _overrides(domain: Path, general: Path, *extra: str) -> list[str]:
    return ["base_prep=none", f"data.train=[{{type: jsonl, path: {domain}, text_field: text}}]",
            f"data.replay=[{{type: jsonl, path: {general}, text_field: text}}]", *extra]


@pytest.fixture()
def general_corpus(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "general.jsonl", _docs(60, 120, 2, GENERAL))


def test_doctor_cli_ranks_near_duplicates_contamination_and_epochs(tmp_path, general_corpus, capsys):
    from dapt.cli import main

    leaked = _docs(12, 14, 40, DOMAIN)
    docs = _near_dup_corpus()
    docs[5] += " " + " ".join(leaked)
    domain = _write_jsonl(tmp_path / "domain.jsonl", docs)
    out = tmp_path / "report"
    assert main(["doctor", *_overrides(domain, general_corpus, _tasks(tmp_path, leaked), "trainer.max_steps=3000"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "doctor.json").read_text())
    assert tuple(doc) == (*COMMON_KEYS, *CORPUS_KEYS) and doc["schema_version"] == SCHEMA_VERSION and doc["kind"] == "corpus"
    assert all(set(f) == FINDING_FIELDS for f in doc["findings"])
    by = {(f["check"], f["scope"]): f for f in doc["findings"]}
    top = doc["findings"][0]
    assert (top["check"], top["severity"], top["scope"]) == ("corpus.contamination", "error", "task leaky test")
    assert "leaky" in top["title"] and "test" in top["title"]
    assert by[("corpus.contamination", "task leaky dev")]["severity"] == "ok"
    assert {by[("corpus.contamination", f"task clean {s}")]["severity"] for s in ("dev", "test")} == {"ok"}
    assert by[("corpus.near_duplicates", "data.train")]["severity"] == "warning"
    epochs = by[("corpus.epochs", "data.train")]  # 3000 steps x 16 x 128 tokens over a ~120K-token corpus
    assert epochs["severity"] == "warning" and epochs["measured"]["epochs"] > 10 and not epochs["measured"]["corpus_tokens_estimated"]
    assert doc["near_duplicates"]["examples"] and doc["contamination"]["leaky"]["test"]["contaminated"] == 12
    from dapt.config import compose_config

    suggested = sorted({o for f in doc["findings"] for o in f["overrides"]})
    assert {"vocabulary=extend", "model=pubmedbert"} <= set(suggested) and any(o.startswith("trainer.max_steps=") for o in suggested)
    for override in suggested:  # every suggestion is a real key of conf/ that composes
        compose_config([*_overrides(domain, general_corpus), override, "paths.output_dir=."])
    md = (out / "doctor.md").read_text()
    assert "## error: task leaky test" in md and "corpus.near_duplicates" in md
    assert "corpus.contamination" in printed and "1 error" in printed


def test_doctor_cli_is_quiet_on_a_clean_corpus(tmp_path, general_corpus, capsys):
    from dapt.cli import main

    domain = _write_jsonl(tmp_path / "domain.jsonl", _docs(200, 150, 3, DOMAIN))
    assert main(["doctor", *_overrides(domain, general_corpus, "trainer.max_steps=2", "tasks=[]"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    loud = [f for f in doc["findings"] if f["severity"] not in ("ok", "info")]
    assert not loud, loud
    assert {f["check"] for f in doc["findings"] if f["severity"] == "ok"} >= {
        "corpus.near_duplicates", "corpus.exact_duplicates", "corpus.noise", "corpus.epochs", "corpus.vocabulary_overlap"}


@pytest.mark.parametrize("texts, words", [([], "is empty"), (["a few words only"] * 3 + [" "], "too small to diagnose")])
def test_an_empty_or_too_small_corpus_is_a_one_line_data_error(tmp_path, general_corpus, capsys, texts, words):
    from dapt.cli import main

    domain = _write_jsonl(tmp_path / "domain.jsonl", texts)
    assert main(["doctor", *_overrides(domain, general_corpus, "tasks=[]")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.train: the domain corpus") and words in err and "\n" not in err, err


def test_doctor_on_a_run_dir_writes_reports_and_the_wandb_summary(tmp_path, monkeypatch, capsys):
    import wandb

    from dapt.cli import main
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    run = wandb.init(project="dapt-test", id="doc12345", dir=str(run_dir), mode="offline")
    run.log({"train/loss": 1.0})
    run.finish()
    seen: list[Path] = []

    def diagnose_path(path: Path) -> dict[str, Any]:
        seen.append(path)
        return {"kind": "run", "path": str(path), "runs": [{"path": str(path)}],
                "findings": [Finding("run.ok", "ok", "fine"), Finding("run.forgetting", "warning", "general ppl up 40%", {"x": 1.4}, {"x": 1.1})]}

    monkeypatch.setitem(sys.modules, "dapt.reporting.diagnosis", types.SimpleNamespace(diagnose_path=diagnose_path))
    assert main(["doctor", str(run_dir)]) == 0
    assert seen == [run_dir.resolve()]
    doc = json.loads((run_dir / "doctor.json").read_text())
    assert tuple(doc) == (*COMMON_KEYS, *RUN_KEYS) and doc["kind"] == "run" and doc["findings"][0]["check"] == "run.forgetting"
    assert "general ppl up 40%" in (run_dir / "doctor.md").read_text()
    printed = capsys.readouterr().out
    assert "run.forgetting" in printed and "doc12345" in printed
    files = offline_runs(run_dir)
    assert len(files) == 2  # the training run, then the doctor's resumed one (same id, synced into one W&B run)
    # wandb names a second run folder started in the same second "<name>-1", which sorts first: find it by content
    (resumed,) = [r for r in map(read_offline_run, files) if "doctor/warning" in r.summary]
    assert resumed.run_id == "doc12345" and resumed.project == "dapt-test"
    assert resumed.summary["doctor/warning"] == 1 and resumed.summary["doctor/top_check"] == "run.forgetting"


def test_doctor_cli_on_the_real_biomedical_corpus(capsys, data_dir):
    from dapt.cli import main

    assert main(["doctor", "--max-documents", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["domain"]["documents"] == 200 and report["general"]["documents"] == 200
    assert report["domain_term_fragmentation"] > report["general_word_fragmentation"]
    assert 0 < report["vocabulary_overlap_top10k"] < 1
    assert report["corpus_size"]["corpus_tokens_estimated"] and report["contamination"]["ncbi_disease"]["test"]["checked"] > 0


def test_doctor_on_a_sweep_dir_annotates_each_jobs_wandb_run(tmp_path, monkeypatch):
    import wandb

    from dapt.cli import main
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    sweep = tmp_path / "sweep"
    jobs = [sweep / "0", sweep / "1"]
    for i, job in enumerate(jobs):
        job.mkdir(parents=True)
        (job / "results.json").write_text("{}")
        wandb.init(project="dapt-test", id=f"job{i}abcd", dir=str(job), mode="offline").finish()
    findings = [Finding("sweep.effect", "info", "masking.rate moved nothing", scope="sweep"),
                Finding("run.domain_gain_vs_control", "error", "no gain", scope="1")]
    monkeypatch.setitem(sys.modules, "dapt.reporting.diagnosis", types.SimpleNamespace(
        diagnose_path=lambda p: {"kind": "sweep", "path": str(p), "findings": findings, "runs": [str(j) for j in jobs]}))
    assert main(["doctor", str(sweep)]) == 0
    doc = json.loads((sweep / "doctor.json").read_text())
    assert doc["kind"] == "sweep" and tuple(doc) == (*COMMON_KEYS, *RUN_KEYS) and (sweep / "doctor.md").is_file()
    assert len(offline_runs(jobs[0])) == 1  # no finding of its own: untouched
    (annotated,) = [r for r in map(read_offline_run, offline_runs(jobs[1])) if "doctor/error" in r.summary]
    assert len(offline_runs(jobs[1])) == 2 and annotated.run_id == "job1abcd" and annotated.summary["doctor/error"] == 1 and annotated.summary["doctor/info"] == 0
