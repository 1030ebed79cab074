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


def test_near_duplicate_chains_count_every_link():
    """A~B and B~C but C is not similar to A: C duplicates B, which is indexed too (2 duplicates, not 1)."""
    base = _docs(1, 200, 13, DOMAIN)[0].rstrip(".").split()
    a = " ".join(base)
    b = " ".join(base[16:] + [f"zzb{i}" for i in range(8)])  # drop 16 words, add 8
    c = " ".join(base[32:] + [f"zzb{i}" for i in range(8)] + [f"zzc{i}" for i in range(8)])  # and again
    from datasketch import MinHash

    from dapt.diagnostics.near_duplicates import NUM_PERM, shingles

    def estimate(x: str, y: str) -> float:  # the check's own MinHash estimate (seed 1)
        mx, my = MinHash(num_perm=NUM_PERM, seed=1), MinHash(num_perm=NUM_PERM, seed=1)
        mx.update_batch(list(shingles(x)))
        my.update_batch(list(shingles(y)))
        return mx.jaccard(my)

    assert estimate(a, b) >= 0.82 and estimate(b, c) >= 0.82 and estimate(a, c) < 0.76, (estimate(a, b), estimate(b, c), estimate(a, c))
    others = _docs(20, 200, 17, DOMAIN)
    report = near_duplicates([a, *others, b, c], threshold=0.8, num_perm=NUM_PERM)
    assert report.near_duplicates == 2, report.as_dict()
    assert near_duplicate_finding(report, sample_capped=True).measured["lower_bound"] is True


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


def test_contamination_streams_the_whole_corpus_not_the_sample(tmp_path, general_corpus, capsys):
    """The task's whole test set sits in document 251 of 300; the statistics sample stops at 200."""
    from dapt.cli import main

    leaked = _docs(12, 14, 40, DOMAIN)
    docs = _docs(300, 150, 3, DOMAIN)
    docs[251] += " " + " ".join(leaked)
    domain = _write_jsonl(tmp_path / "domain.jsonl", docs)
    args = ["doctor", *_overrides(domain, general_corpus, _tasks(tmp_path, leaked), "trainer.max_steps=2"), "--max-documents", "200", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["domain"]["documents"] == 200 and doc["domain"]["capped"]
    by = {f["scope"]: f for f in doc["findings"] if f["check"] == "corpus.contamination"}
    assert by["task leaky test"]["severity"] == "error", by["task leaky test"]
    assert doc["contamination"]["leaky"]["test"]["contaminated"] == 12 and doc["contamination"]["leaky"]["test"]["documents_checked"] == 300
    # A capped contamination check never says "ok": it says how much it read.
    assert main([*args, "--contamination-documents", "100"]) == 0
    capped = {f["scope"]: f for f in json.loads(capsys.readouterr().out)["findings"] if f["check"] == "corpus.contamination"}
    assert {f["severity"] for f in capped.values()} == {"info"}, capped
    assert "checked 100 of ~" in capped["task leaky test"]["title"] and capped["task leaky test"]["measured"]["capped"]


def test_contamination_checks_a_cached_selection_and_notes_an_unbuilt_one(tmp_path, general_corpus, capsys, monkeypatch):
    import dapt.pipeline.selection as selection
    from dapt.cli import main

    leaked = _docs(12, 14, 40, DOMAIN)
    domain = _write_jsonl(tmp_path / "domain.jsonl", _docs(50, 150, 3, DOMAIN))
    cache = tmp_path / "cache"
    monkeypatch.setattr(selection, "selection_cache_key", lambda *a, **k: "k1")
    args = ["doctor", *_overrides(domain, general_corpus, _tasks(tmp_path, leaked), "trainer.max_steps=2", "selection=dsir",
                                  "selection.task=ncbi_disease", f"paths.cache_dir={cache}"), "--json"]
    assert main(args) == 0
    notes = [f for f in json.loads(capsys.readouterr().out)["findings"] if f["scope"] == "selection"]
    assert len(notes) == 1 and "not built yet" in notes[0]["title"] and notes[0]["severity"] == "info"
    # A selection that (artificially) holds the test set: it is the training data, so it is an error.
    jsonl = _write_jsonl(cache / "selections" / "k1.jsonl", [*_docs(5, 150, 8, DOMAIN), " ".join(leaked)])
    (cache / "selections" / "k1.json").write_text(json.dumps({"documents": 6, "bytes": jsonl.stat().st_size}))
    assert main(args) == 0
    by = {f["scope"]: f for f in json.loads(capsys.readouterr().out)["findings"] if f["check"] == "corpus.contamination"}
    assert by["task leaky test"]["severity"] == "ok" and by["task leaky test (selection)"]["severity"] == "error"
    assert "selection" not in by


def test_planned_passes_count_only_the_domain_share_and_the_selection(tmp_path, general_corpus, capsys):
    from dapt.cli import main

    domain = _write_jsonl(tmp_path / "domain.jsonl", _docs(200, 150, 3, DOMAIN))
    base = ["doctor", *_overrides(domain, general_corpus, "trainer.max_steps=3000", "tasks=[]")]
    assert main([*base, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)["corpus_size"]
    assert main([*base, "data.replay_fraction=0.5", "--json"]) == 0
    replay = json.loads(capsys.readouterr().out)["corpus_size"]
    assert replay["domain_tokens"] == replay["planned_tokens"] // 2 == plain["planned_tokens"] // 2
    assert abs(replay["epochs"] - plain["epochs"] / 2) < 1e-6
    assert main([*base, "selection=dsir", "selection.task=ncbi_disease", "selection.size=50",
                 f"paths.cache_dir={tmp_path / 'cache'}", "--json"]) == 0
    selected = json.loads(capsys.readouterr().out)["corpus_size"]
    assert "selection" in selected["corpus_tokens_method"] and "not built yet" in selected["corpus_tokens_method"]
    assert abs(selected["corpus_tokens"] - plain["sample_tokens"] / 200 * 50) < 2


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


def test_doctor_on_a_run_dir_writes_reports_and_leaves_an_offline_wandb_run_alone(tmp_path, monkeypatch, capsys):
    """wandb cannot resume an offline run (0.31 starts a second run with the same id, and syncing two folders
    with one id can replace the first run's data): doctor writes no W&B segment and says so."""
    import wandb

    from dapt.cli import main
    from dapt.tracking.wandb_offline import offline_runs

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    run = wandb.init(project="dapt-test", id="doc12345", dir=str(run_dir), mode="offline")
    run.log({"train/loss": 1.0})
    run.finish()
    folders = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
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
    printed = " ".join(capsys.readouterr().out.split())
    assert "run.forgetting" in printed and "the run is offline; doctor findings are in doctor.json" in printed
    assert sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*")) == folders  # no new offline segment
    assert len(offline_runs(run_dir)) == 1


def test_doctor_probe_terms_adds_the_probe_finding_to_a_run(tmp_path, monkeypatch):
    from dapt.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("{}")
    probed: list[tuple[Path, int]] = []

    def probe_term_accuracy(path: Path, *, max_documents: int = 100) -> Finding:
        probed.append((path, max_documents))
        return Finding("run.term_accuracy", "warning", "domain terms not learned", scope="run")

    monkeypatch.setitem(sys.modules, "dapt.reporting.diagnosis", types.SimpleNamespace(
        diagnose_path=lambda p: {"kind": "run", "path": str(p), "runs": [str(p)], "findings": [Finding("run.ok", "ok", "fine")]},
        probe_term_accuracy=probe_term_accuracy))
    assert main(["doctor", str(run_dir), "--no-wandb"]) == 0
    assert probed == [] and [f["check"] for f in json.loads((run_dir / "doctor.json").read_text())["findings"]] == ["run.ok"]
    assert main(["doctor", str(run_dir), "--no-wandb", "--probe-terms", "--probe-documents", "7"]) == 0
    assert probed == [(run_dir.resolve(), 7)]
    doc = json.loads((run_dir / "doctor.json").read_text())
    assert [f["check"] for f in doc["findings"]] == ["run.term_accuracy", "run.ok"] and doc["counts"]["warning"] == 1


def test_doctor_cli_on_the_real_biomedical_corpus(capsys, data_dir):
    from dapt.cli import main

    assert main(["doctor", "--max-documents", "200", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["domain"]["documents"] == 200 and report["general"]["documents"] == 200
    assert report["domain_term_fragmentation"] > report["general_word_fragmentation"]
    assert 0 < report["vocabulary_overlap_top10k"] < 1
    assert report["corpus_size"]["corpus_tokens_estimated"] and report["contamination"]["ncbi_disease"]["test"]["checked"] > 0


def test_doctor_on_a_sweep_dir_leaves_offline_job_runs_alone(tmp_path, monkeypatch, capsys):
    import wandb

    from dapt.cli import main
    from dapt.tracking.wandb_offline import offline_runs

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
    assert [len(offline_runs(j)) for j in jobs] == [1, 1]  # no offline segment written to any job
    assert "the run is offline" in capsys.readouterr().out


def test_sweep_wandb_update_matches_job_scopes_relative_to_the_sweep(tmp_path, monkeypatch):
    """diagnose_sweep scopes a job's findings by its folder relative to the sweep (``a/0``), not its name."""
    from dapt.commands import doctor

    sweep = tmp_path / "sweep"
    jobs = [sweep / "a" / "0", sweep / "b" / "0"]
    for job in jobs:
        job.mkdir(parents=True)
    calls: list[tuple[Path, list[str]]] = []
    monkeypatch.setattr(doctor, "update_wandb", lambda run_dir, doc: calls.append((run_dir, [f["title"] for f in doc["findings"]])) or "ok")
    doc = {"path": str(sweep), "runs": [str(j) for j in jobs],
           "findings": [Finding("run.x", "error", "only b/0", scope="b/0").as_dict(), Finding("sweep.effect", "info", "s", scope="sweep").as_dict()]}
    assert doctor.update_sweep_wandb(doc) == ["ok"]
    assert calls == [(jobs[1], ["only b/0"])]


def test_terminal_report_shows_overrides_with_brackets_intact():
    """Overrides such as remedy=[replay,l2sp] are printed as written (rich would eat [replay,l2sp] as markup)."""
    import io

    from rich.console import Console

    from dapt.diagnostics.findings import Finding
    from dapt.diagnostics.report import document, print_report

    doc = document("run", [Finding(check="run.forgetting_vs_control", severity="warning", title="forgetting [dev]",
                                   overrides=["remedy=[replay,l2sp]"], scope="[job 0]")], {"path": "/x", "runs": []})
    out = io.StringIO()
    print_report(doc, Console(file=out, width=200))
    text = out.getvalue()
    assert "remedy=[replay,l2sp]" in text and "forgetting [dev]" in text and "[job 0]" in text
