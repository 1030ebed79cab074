"""`dapt study`: study files, the resumable runner, the generated table, and the regression guard.

The guard runs a seconds-scale study (tests/studies/mini.yaml) end to end through the real CLI: it is
interrupted with SIGTERM during its first arm, re-run to completion (the interrupted arm continues
from its checkpoint), and its generated table must hold every arm and show DAPT lowering domain dev
perplexity against the equal-steps control beyond the CI. The report's numbers are checked on
hand-made results where the right answer is known (seed pairing, missing arms).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dapt.config import REPO_ROOT
from dapt.errors import ConfigError
from dapt.study import report as study_report
from dapt.study import runner
from dapt.study import spec as study_spec
from tests.helpers import fail_message, minilm_tokenizer, needs_shared_data
from tests.test_finetune import save_tiny

MINI = Path(__file__).parent / "studies" / "mini.yaml"
REFERENCES = REPO_ROOT.parent / "shared" / "REFERENCES.md"


# ---------------------------------------------------------------- study files


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("title: t\nquestion: q\narms: [{name: a}]\nbogus: 1\n", "unknown key 'bogus'"),
    ("title: t\nquestion: q\narms: [{name: a, overides: []}]\n", "arms[0]: unknown key 'overides'"),
    ("title: t\nquestion: q\narms: [{name: A-1}]\n", "arm name 'A-1'"),
    ("title: t\nquestion: q\narms: [{name: a}, {name: a}]\n", "duplicate arm name 'a'"),
    ("title: t\nquestion: q\narms: [{name: a, start: b}, {name: b}]\n", "start 'b' names no earlier arm"),
    ("title: t\narms: [{name: a}]\n", "missing 'question'"),
    ("title: t\nquestion: q\narms: [{name: a, overrides: lr=1}]\n", "expected a list of strings"),
    ("title: t\nquestion: q\narms: [{name: a, paper: {chemprot: high}}]\n", "expected task: number pairs"),
])
def test_a_bad_study_file_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        study_spec.load(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_unknown_study_lists_the_studies():
    with pytest.raises(ConfigError, match="unknown study 'nope'.*dont_stop_pretraining"):
        study_spec.load("nope")


def test_the_ablation_studies_name_their_reference_arm_and_help_says_so():
    from dapt.commands.study import _epilog

    expected = {"masking_strategy": "random", "masking_rate": "r15_801010", "forgetting": "plain", "vocabulary": "plain"}
    assert {name: study_spec.load(name).reference for name in expected} == expected
    assert study_spec.load("dont_stop_pretraining").reference is None
    assert "(each compared with random)" in _epilog()
    rate = study_spec.load("masking_rate")  # within a scheme, a rate against 0.15 of the same scheme
    assert {a.name: rate.reference_of(a) for a in rate.arms if "mask_only" in a.name} == {
        "r15_mask_only": "r15_801010", "r30_mask_only": "r15_mask_only", "r40_mask_only": "r15_mask_only", "r60_mask_only": "r15_mask_only"}
    assert "(r30_mask_only, r40_mask_only, r60_mask_only compared with r15_mask_only; the others with r15_801010)" in _epilog()


def test_the_issue_studies_ship_with_5_seeds_and_a_budget():
    studies = study_spec.available()
    assert {"dont_stop_pretraining", "masking_rate", "masking_strategy", "forgetting", "vocabulary"} <= set(studies)
    for name in studies:
        s = study_spec.load(name)
        assert "downstream.seeds=[0,1,2,3,4]" in s.common, name
        assert s.wall_time and s.paper_scale and s.gpu_hours, name
        assert s.readme == f"experiments/{name}/README.md" and (REPO_ROOT / s.readme).is_file(), name  # each study its folder


def test_dont_stop_pretraining_has_every_arm_of_the_issue():
    s = study_spec.load("dont_stop_pretraining")
    tasks = ("ncbi_disease", "chemprot", "scierc_relation", "acl_arc")  # SciERC as in the paper: relations, not NER
    expected = {"dapt_biomed", "dapt_cs", *(f"tapt_{t}" for t in tasks), *(f"dapt_tapt_{t}" for t in tasks)}
    assert {a.name for a in s.arms} == expected
    for task in tasks:  # DAPT+TAPT continues the DAPT model of the task's domain
        assert s.arm(f"dapt_tapt_{task}").start == ("dapt_biomed" if task in ("ncbi_disease", "chemprot") else "dapt_cs")


def _dsp_reference_table() -> dict[str, dict[str, float]]:
    """The Don't Stop Pretraining table of shared/REFERENCES.md: task -> column -> F1."""
    text = REFERENCES.read_text()
    section = text.split("Don't Stop Pretraining", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0]]
    return {r[0].strip(): {header[i]: float(c) for i, c in enumerate(r) if i and re.match(r"^\s*[0-9.]+\s*$", c)} for r in rows[2:]}


@pytest.mark.skipif(not REFERENCES.is_file(), reason="shared/REFERENCES.md not found")
def test_paper_numbers_in_the_studies_are_those_of_references_md():
    table = _dsp_reference_table()
    names = {"chemprot": "ChemProt", "acl_arc": "ACL-ARC", "scierc_relation": "SciERC"}
    s = study_spec.load("dont_stop_pretraining")
    assert s.base_paper == {t: table[names[t]]["RoBERTa"] for t in s.base_paper}
    checked = 0
    for arm in s.arms:
        for task, value in arm.paper.items():
            assert value == table[names[task]][arm.label], (arm.name, task)
            checked += 1
    assert checked == 9  # 3 tasks x DAPT, TAPT, DAPT+TAPT
    # the MNLI numbers the masking_rate note quotes, per corruption scheme, are Wettig et al.'s table's
    section = REFERENCES.read_text().split("Should You Mask 15%", 1)[1].split("\n## ", 1)[0]
    wettig = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.match(r"^0\.\d\d", cells[0]):
            scheme = "80/10/10" if "80/10/10" in cells[0] else "mask-only"
            wettig[(scheme, cells[0].split(",")[0])] = cells[1]
    note = next(n for n in study_spec.load("masking_rate").notes if "Wettig" in n)
    mask_only, rest = note.split("mask-only", 1)[1].split("80/10/10", 1)
    quoted = [("mask-only", r, v) for r, v in re.findall(r"(0\.\d\d) (\d\d\.\d)", mask_only)]
    quoted += [("80/10/10", r, v) for r, v in re.findall(r"(0\.\d\d) (\d\d\.\d)", rest.split(". ", 1)[0])]
    assert len(quoted) == 7
    for scheme, rate, value in quoted:
        assert wettig[(scheme, rate)] == value, (scheme, rate, value)


@pytest.mark.parametrize("name", ["dont_stop_pretraining", "masking_rate", "masking_strategy", "forgetting", "vocabulary"])
def test_every_arm_of_every_study_composes(name, tmp_path):
    """Each arm's overrides name real options and keys (what --dry-run checks before running)."""
    s = study_spec.load(name)
    for arm in s.arms:
        runner.check_arm(s, arm, runner.arm_overrides(s, arm, tmp_path, []))


def test_an_unknown_extra_override_names_the_arm(tmp_path):
    s = study_spec.load("vocabulary")
    with pytest.raises(ConfigError, match=r"study vocabulary, arm plain: unknown config key 'optimizer.lrr'"):
        runner.run_study(s, tmp_path, ["optimizer.lrr=1"], echo=lambda line: None)


# ---------------------------------------------------------------- the report on known numbers


def _results(after: dict[int, float], before: dict[int, float] | None, *, ppl: float = 10.0, dev_change: tuple[float, float, float] = (-0.1, -0.2, -0.05)) -> dict[str, Any]:
    def arm(scores: dict[int, float]) -> dict[str, Any]:
        values = list(scores.values())
        mean = sum(values) / len(values)
        return {"seeds": list(scores), "test_score": {"mean": mean, "std": 0.0, "values": values, "n": len(values)}}

    downstream = {"metric": "f1", "after": arm(after), "control": arm({s: 0.5 for s in after}),
                  "vs_control": {"delta": 0.01, "delta_ci": [-0.02, 0.04], "verdict": "inconclusive (CI -0.02..+0.04): +0.01, p=0.3; 3 seeds detect only effects >= 0.050 with 80% power"}}
    if before is not None:
        downstream["before"] = arm(before)
    value, low, high = dev_change
    return {"steps": 10, "domain_ppl_before": 2 * ppl, "domain_ppl_before_ci": [19.0, 21.0], "domain_ppl_after": ppl,
            "domain_ppl_after_ci": [ppl - 1, ppl + 1], "changes": {"domain_dev_ppl_change_vs_control": value, "domain_dev_ppl_change_vs_control_ci": [low, high]},
            "downstream": {"t": downstream}, "provenance": {"git_commit": "abc1234", "code_digest": "d"}, "precision": {"value": "bf16-mixed"}}


def _fake_study(tmp_path: Path, arms: dict[str, dict[str, Any] | None]) -> tuple[study_spec.StudySpec, Path]:
    lines = ["title: fake", "question: q?", "base_paper: {t: 50.0}", "arms:"]
    lines += [f"  - {{name: {name}, label: {name.upper()}, paper: {{t: 55.0}}}}" for name in arms]
    s = study_spec.load(_write(tmp_path, "\n".join(lines) + "\n", "fake.yaml"))
    out = tmp_path / "out"
    for name, results in arms.items():
        if results is not None:
            (out / name / "run").mkdir(parents=True)
            (out / name / "run" / "results.json").write_text(json.dumps(results))
    return s, out


def test_delta_vs_base_pairs_scores_by_seed_not_by_position(tmp_path):
    # seeds in another order than the base's: the mean difference is the same under any pairing, but
    # position-wise pairing gives differences -0.19, -0.09, +0.23 (a CI of about ±0.5), by seed +0.01/+0.02/+0.03
    before = {0: 0.60, 1: 0.70, 2: 0.80}
    after = {2: 0.83, 0: 0.61, 1: 0.72}  # gains by seed: +0.01, +0.02, +0.03
    s, out = _fake_study(tmp_path, {"a": _results(after, before), "b": None})
    report = study_report.build(s, out, "cmd")
    base = next(r for r in report.downstream if r["arm"] == "base")
    row = next(r for r in report.downstream if r["arm"] == "a")
    assert base["mean"] == pytest.approx(0.70) and base["paper"] == 50.0
    assert row["vs_base"] == pytest.approx(0.02)
    assert row["vs_base_ci_low"] < 0.02 < row["vs_base_ci_high"] and row["vs_base_ci_high"] - row["vs_base_ci_low"] < 0.05
    assert row["paper"] == 55.0 and row["paper_vs_base"] == pytest.approx(5.0)
    assert report.missing == ["b"] and "Not finished (no complete results.json): b." in report.markdown
    assert "| A | t (f1) | 72.0 ± 0.0 (n=3) | 50.0 ± 0.0 | +1.0 [-2.0, +4.0] | inconclusive (MDE 5.0) | +2.0 [" in report.markdown


def _heldout_config() -> dict[str, Any]:
    """The config keys that decide whether two runs' held-out scores pair up (report._not_alike)."""
    return {"masking": {"eval_strategy": "random", "eval_rate": 0.15, "eval_seed": 1, "mask_fraction": 0.8, "random_fraction": 0.1},
            "data": {"max_seq_length": 64, "eval_sample_seed": 0, "eval_max_doc_tokens": None}, "vocabulary": {"name": "none"}}


def test_a_chained_arm_is_compared_with_the_base_over_the_same_documents(tmp_path):
    """DAPT+TAPT's cumulative change: its adapted model's per-document sums against the base's start
    scores on the same set, taken from an arm that started from the same cached base and scored alike;
    never from an arm from another model (listed first here), another precision, eval masking or set
    digest, or an extended vocabulary; '—' with the reason otherwise."""
    spec_text = ("title: c\nquestion: q\narms: [{name: other}, {name: dapt}, {name: tapt}, "
                 "{name: both, label: DAPT+TAPT, start: dapt}]\n")
    s = study_spec.load(_write(tmp_path, spec_text, "c.yaml"))
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 40, size=30).astype(float)

    def table(scale: float, ids: list[int] | None = None) -> dict[str, Any]:
        return {"ids": ids or list(range(30)), "sums": list(counts * scale * rng.uniform(0.9, 1.1, 30)), "counts": list(counts)}

    def sets(domain: str) -> dict[str, Any]:
        return {"test": {"general": {"documents": 30, "tokens": 999, "masked_tokens": int(counts.sum()), "digest": "g" * 16},
                         "domain": {"documents": 30, "tokens": 999, "masked_tokens": int(counts.sum()), "digest": domain * 16}}}

    general_base, tapt_base, both_general, both_domain = table(3.0), table(5.0), table(3.4), table(2.0)
    config = _heldout_config()
    arms = {  # name: (base cache key, start scores, domain set digest); dapt scored the base on the biomed text, tapt on the task's
        "other": ("b2", {"general_ppl": table(9.0), "domain_ppl": table(9.0)}, "t"),
        "dapt": ("b1", {"general_ppl": general_base, "domain_ppl": table(4.0, list(range(100, 130)))}, "d"),
        "tapt": ("b1", {"general_ppl": general_base, "domain_ppl": tapt_base}, "t"),
        "both": (None, {"general_ppl": table(3.2), "domain_ppl": table(3.0)}, "t"),
    }

    def write(name: str, **changes: Any) -> None:
        base_key, before, domain = arms[name]
        folder = out / name / "run"
        folder.mkdir(parents=True, exist_ok=True)
        after = {"general_ppl": both_general, "domain_ppl": both_domain} if name == "both" else before
        results = {**_results({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.5}), "base": {"cache_key": base_key}, "heldout_sets": sets(domain),
                   "config": config, "provenance": {"finished_at": "t0"}} | changes
        (folder / "results.json").write_text(json.dumps(results))
        (folder / "heldout_documents.json").write_text(json.dumps({"before": before, "after": after, "control": None}))

    for name in arms:
        write(name)
    (out / "both" / "arm.json").write_text(json.dumps({"start": {"arm": "dapt", "finished_at": "t0"}}))

    def both_row() -> dict[str, Any]:
        return next(r for r in study_report.build(s, out, "cmd").perplexity if r["arm"] == "both")

    def expected(after: dict[str, Any], base: dict[str, Any]) -> float:
        return math.exp((sum(after["sums"]) - sum(base["sums"])) / sum(counts)) - 1

    row = both_row()
    assert row["forgetting_vs_base"] == pytest.approx(expected(both_general, general_base))
    assert row["domain_ppl_change_vs_base"] == pytest.approx(expected(both_domain, tapt_base))
    low, high = row["domain_ppl_change_vs_base_ci_low"], row["domain_ppl_change_vs_base_ci_high"]
    assert low < row["domain_ppl_change_vs_base"] < high and high - low < 0.2
    assert (row["forgetting_vs_base_base_scored_by"], row["domain_ppl_change_vs_base_base_scored_by"]) == ("dapt", "tapt")
    assert not any("forgetting_vs_base" in r for r in study_report.build(s, out, "cmd").perplexity if r["arm"] != "both")

    # tapt scored alike in all but one respect: its start scores are not used (other, from another base, never)
    refused = {"precision": {"value": "32-true"}, "config": config | {"masking": config["masking"] | {"mask_fraction": 1.0}},
               "heldout_sets": sets("x"), "vocabulary_config": config | {"vocabulary": {"name": "extend"}}}
    for what, change in refused.items():
        write("tapt", **{("config" if what == "vocabulary_config" else what): change})
        row = both_row()
        assert row["domain_ppl_change_vs_base"] is None and row["domain_ppl_change_vs_base_missing"].startswith("no arm scored"), what
        assert row["forgetting_vs_base"] is not None, what  # dapt still scored the base on the general set
    report = study_report.build(s, out, "cmd")
    assert re.search(r"^\| DAPT\+TAPT \(from dapt\) \| — \(no arm scored the base on this set alike\) \| [+-]\d+\.\d% \[.*\(dapt\) \|$",
                     report.markdown, re.M), report.markdown
    # the DAPT arm was run again after DAPT+TAPT continued it: nothing is paired with a base it did not come from
    write("tapt")
    write("dapt", provenance={"finished_at": "t1"})
    row = both_row()
    assert row["forgetting_vs_base"] is None and row["forgetting_vs_base_missing"] == "dapt was run again after this arm"



def test_arms_are_compared_with_the_reference_arm_paired_by_seed_and_document_with_holm_over_the_arms(tmp_path):
    """An ablation's question (does whole-word masking beat random?) is answered by the paired
    difference to its reference arm, not by two CIs against the control: by seed downstream (Holm over
    the table's arms on that task), by document for perplexity; an arm from another base, with other
    fine-tuning settings or other eval masking is not paired, and says why."""
    from scipy.stats import ttest_rel

    spec_text = ("title: r\nquestion: q\nreference: ref\narms: [{name: ref, label: random}, {name: a, label: A}, "
                 "{name: b, label: B}, {name: far, label: FAR}]\n")
    s = study_spec.load(_write(tmp_path, spec_text, "r.yaml"))
    out = tmp_path / "out"
    rng = np.random.default_rng(1)
    counts = rng.integers(5, 40, size=25).astype(float)
    ref_scores = {0: 0.60, 1: 0.70, 2: 0.80, 3: 0.65}
    gains = {"a": {0: 0.010, 1: 0.030, 2: 0.020, 3: 0.025}, "b": {0: -0.05, 1: 0.04, 2: -0.02, 3: 0.01}, "far": {0: 0.1, 1: 0.1, 2: 0.1, 3: 0.2}}
    config = _heldout_config() | {"downstream": {"lr": 2e-4, "seeds": [0, 1, 2, 3], "progress_bar": False}}
    sets = {"test": {name: {"documents": 25, "tokens": 999, "masked_tokens": int(counts.sum()), "digest": name[0] * 16}
                     for name in ("general", "domain")}}
    losses = {name: {key: {"ids": list(range(25)), "sums": list(counts * scale * rng.uniform(0.9, 1.1, 25)), "counts": list(counts)}
                     for key in ("general_ppl", "domain_ppl")} for name, scale in (("ref", 3.0), ("a", 2.5), ("b", 3.3), ("far", 2.0))}

    def write(name: str, start: dict[int, float] | None = None, **changes: Any) -> None:
        order = (0, 1, 2, 3) if name == "ref" else (2, 0, 3, 1)  # the arms list their seeds in another order
        after = {seed: ref_scores[seed] + gains.get(name, {}).get(seed, 0.0) for seed in order}
        results = {**_results(after, start or {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}), "base": {"cache_key": "far" if name == "far" else "b1"},
                   "heldout_sets": sets, "config": config} | changes
        folder = out / name / "run"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(results))
        (folder / "heldout_documents.json").write_text(json.dumps({"before": {}, "after": losses[name], "control": None}))

    for name in ("ref", "a", "b", "far"):
        write(name)
    report = study_report.build(s, out, "cmd")
    rows = {r["arm"]: r for r in report.reference}
    assert set(rows) == {"a", "b", "far"}
    p_values = [ttest_rel([ref_scores[k] + gains[n][k] for k in range(4)], [ref_scores[k] for k in range(4)]).pvalue for n in ("a", "b")]
    assert rows["a"]["vs_reference"] == pytest.approx(0.02125) and rows["b"]["vs_reference"] == pytest.approx(-0.005)
    assert rows["a"]["vs_reference_holm_m"] == 2 and rows["a"]["vs_reference_p_holm"] == pytest.approx(min(1.0, 2 * min(p_values)))
    assert rows["a"]["vs_reference_ci_low"] > 0 and "significant gain" in rows["a"]["vs_reference_verdict"]
    assert rows["far"]["vs_reference"] is None and rows["far"]["vs_reference_missing"] == "another start model"
    assert rows["far"]["domain_ppl_change_vs_reference"] is None and rows["far"]["general_ppl_change_vs_reference_missing"] == "another start model"
    expected = math.exp((sum(losses["a"]["domain_ppl"]["sums"]) - sum(losses["ref"]["domain_ppl"]["sums"])) / counts.sum()) - 1
    assert rows["a"]["domain_ppl_change_vs_reference"] == pytest.approx(expected) and expected < 0
    low, high = rows["a"]["domain_ppl_change_vs_reference_ci_low"], rows["a"]["domain_ppl_change_vs_reference_ci_high"]
    assert low < expected < high < 0
    assert re.search(r"^\| A \| t \(f1\) \| 70\.9 \| 68\.\d \| \+2\.1 \[\+\d\.\d, \+\d\.\d\] \| significant gain \(p_Holm=0\.0\d+, m=2\) \| -\d+\.\d% \[.*\] lower \|",
                     report.markdown, re.M), report.markdown
    assert (out / "vs_reference.csv").exists() is False and "vs_reference.csv" in {p.name for p in study_report.write(s, out, "cmd")[1]}
    fig = study_report.figure(s, report)  # a third panel: each arm against the reference, with its CI
    assert len(fig.axes) == 3 and [t.get_text() for t in fig.axes[2].get_yticklabels()] == ["A · t", "B · t"]
    assert [round(p.get_width(), 3) for p in fig.axes[2].patches] == [round(100 * rows["a"]["vs_reference"], 3), round(100 * rows["b"]["vs_reference"], 3)]

    # B scored with other eval masks, fine-tuned another way (its start model's fine-tunes score otherwise
    # on one seed): neither is paired; nor is a general set with another digest (other text or masks)
    write("b", start={0: 0.5, 1: 0.5, 2: 0.51, 3: 0.5}, config=config | {"masking": config["masking"] | {"mask_fraction": 1.0}},
          heldout_sets={"test": sets["test"] | {"general": sets["test"]["general"] | {"digest": "x" * 16}}})
    rows = {r["arm"]: r for r in study_report.build(s, out, "cmd").reference}
    assert rows["b"]["vs_reference"] is None and rows["b"]["vs_reference_missing"].startswith("another fine-tuning set-up")
    assert rows["b"]["domain_ppl_change_vs_reference"] is None
    assert rows["b"]["domain_ppl_change_vs_reference_missing"] == "other masking settings for held-out sets"
    assert rows["a"]["vs_reference_holm_m"] == 1  # the family is what was compared
    write("b", heldout_sets={"test": sets["test"] | {"general": sets["test"]["general"] | {"digest": "x" * 16}}})
    rows = {r["arm"]: r for r in study_report.build(s, out, "cmd").reference}
    assert rows["b"]["general_ppl_change_vs_reference_missing"] == "another held-out set" and rows["b"]["domain_ppl_change_vs_reference"] is not None
    assert rows["b"]["vs_reference"] is not None and rows["b"]["vs_reference_p"] is not None

    # one Holm family over tasks x arms, as a run's own verdicts: a second task doubles it
    for name in ("ref", "a", "b"):
        results = json.loads((out / name / "run" / "results.json").read_text())
        results["downstream"]["u"] = results["downstream"]["t"]
        (out / name / "run" / "results.json").write_text(json.dumps(results))
    rows = [r for r in study_report.build(s, out, "cmd").reference if r["vs_reference"] is not None]
    assert len(rows) == 4 and {r["vs_reference_holm_m"] for r in rows} == {4}


@pytest.mark.parametrize("reference, message", [("nope", "reference 'nope' names no arm"), ("c", "reference 'c' names no arm")])
def test_a_reference_must_be_an_arm_from_the_base(tmp_path, reference, message):
    text = f"title: t\nquestion: q\nreference: {reference}\narms: [{{name: a}}, {{name: c, start: a}}]\n"
    with pytest.raises(ConfigError, match=message):
        study_spec.load(_write(tmp_path, text))


def test_an_arm_may_name_its_own_reference_and_the_block_says_which(tmp_path):
    """masking_rate asks two questions: does a rate beat 0.15 within its corruption scheme (Wettig et
    al.'s comparison), and does mask-only beat 80/10/10 at 0.15. One study-wide reference cannot pair
    0.30 mask-only with 0.15 mask-only, so an arm may name its own; the rows say which reference each
    used, perplexities pair within the scheme, and the Holm family is still the whole block."""
    spec_text = ("title: r\nquestion: q\nreference: ref\narms: [{name: ref, label: R}, {name: m15, label: M15}, "
                 "{name: m30, label: M30, reference: m15}]\n")
    s = study_spec.load(_write(tmp_path, spec_text, "r.yaml"))
    assert [s.reference_of(a) for a in s.arms] == [None, "ref", "m15"] and s.references() == ["ref", "m15"]
    out = tmp_path / "out"
    rng = np.random.default_rng(2)
    counts = rng.integers(5, 40, size=20).astype(float)
    scores = {"ref": {0: 0.60, 1: 0.70, 2: 0.80}, "m15": {0: 0.62, 1: 0.73, 2: 0.81}, "m30": {0: 0.63, 1: 0.75, 2: 0.80}}
    mask_only = _heldout_config()["masking"] | {"mask_fraction": 1.0, "random_fraction": 0.0}
    losses = {name: {key: {"ids": list(range(20)), "sums": list(counts * scale * rng.uniform(0.9, 1.1, 20)), "counts": list(counts)}
                     for key in ("general_ppl", "domain_ppl")} for name, scale in (("ref", 3.0), ("m15", 2.5), ("m30", 2.2))}
    for name, after in scores.items():
        config = _heldout_config() | ({} if name == "ref" else {"masking": mask_only})
        sets = {"test": {k: {"documents": 20, "tokens": 9, "masked_tokens": int(counts.sum()), "digest": (k[0] if name == "ref" else "m") * 16}
                         for k in ("general", "domain")}}
        results = {**_results(after, {0: 0.5, 1: 0.5, 2: 0.5}), "base": {"cache_key": "b1"}, "heldout_sets": sets, "config": config}
        folder = out / name / "run"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results))
        (folder / "heldout_documents.json").write_text(json.dumps({"before": {}, "after": losses[name], "control": None}))
    report = study_report.build(s, out, "cmd")
    rows = {r["arm"]: r for r in report.reference}
    assert {a: r["reference"] for a, r in rows.items()} == {"m15": "ref", "m30": "m15"}
    assert rows["m30"]["vs_reference"] == pytest.approx((0.01 + 0.02 - 0.01) / 3)
    assert rows["m15"]["vs_reference"] == pytest.approx((0.02 + 0.03 + 0.01) / 3)
    assert {r["vs_reference_holm_m"] for r in rows.values()} == {2}
    assert rows["m15"]["domain_ppl_change_vs_reference_missing"] == "other masking settings for held-out sets"  # mask-only vs 80/10/10
    expected = math.exp((sum(losses["m30"]["domain_ppl"]["sums"]) - sum(losses["m15"]["domain_ppl"]["sums"])) / counts.sum()) - 1
    assert rows["m30"]["domain_ppl_change_vs_reference"] == pytest.approx(expected)
    assert "| arm | task | score | reference | reference's score | Δ vs reference [CI] |" in report.markdown
    assert re.search(r"^\| M30 \| t \(f1\) \| 72\.7 \| M15 \| 72\.0 \| \+0\.7 \[", report.markdown, re.M), report.markdown
    assert "Each arm against its reference arm (the row's 'reference'" in report.markdown
    fig = study_report.figure(s, report)
    assert [t.get_text() for t in fig.axes[2].get_yticklabels()] == ["M15 − R · t", "M30 − M15 · t"]
    assert "vs_reference.csv" in {p.name for p in study_report.write(s, out, "cmd")[1]}
    for name in ("m30", "m15"):  # what the block says while arms or references are missing
        (out / name / "run" / "results.json").unlink()
    assert not study_report.build(s, out, "cmd").reference and "M15 has not finished." in study_report.build(s, out, "cmd").markdown
    (out / "m15" / "run" / "results.json").write_text(json.dumps(_results(scores["m15"], {0: 0.5, 1: 0.5, 2: 0.5})))
    (out / "ref" / "run" / "results.json").unlink()  # an arm whose reference is missing is listed, with why
    report = study_report.build(s, out, "cmd")
    assert [(r["arm"], r["vs_reference_missing"], r["general_ppl_change_vs_reference_missing"]) for r in report.reference] == [
        ("m15", "R has not finished", "R has not finished")]
    assert "| M15 | t | — | R | — | — (R has not finished) | — |" in report.markdown


@pytest.mark.parametrize("arms, message", [
    ("[{name: a}, {name: b, reference: nope}]", "arms[1]: reference 'nope' names no arm"),
    ("[{name: a}, {name: b, reference: b}]", "arms[1]: reference 'b' is the arm itself"),
    ("[{name: a}, {name: c, start: a}, {name: b, reference: c}]", "arms[2]: reference 'c' names no arm"),
    ("[{name: a}, {name: c, start: a, reference: a}]", "arms[1]: an arm that continues another (start: a) has no reference"),
    ("[{name: a, reference: b}, {name: b, reference: a}]", "arms 'b' and 'a' are each other's reference"),
    ("[{name: a, reference: b}, {name: b}]\nreference: a", "arms 'b' and 'a' are each other's reference"),
])
def test_an_arms_reference_must_be_another_arm_from_the_base(tmp_path, arms, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        study_spec.load(_write(tmp_path, f"title: t\nquestion: q\narms: {arms}\n"))

def test_an_arm_whose_results_record_an_error_is_not_finished(tmp_path):
    failed = {**_results({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.5}), "error": {"stage": "downstream", "message": "boom"}}
    s, out = _fake_study(tmp_path, {"a": failed})
    report = study_report.build(s, out, "cmd")
    assert report.missing == ["a"] and report.downstream == [] and runner.status(out, s.arm("a")).state == "partial"


def test_written_files_and_readme_block_round_trip(tmp_path):
    s, out = _fake_study(tmp_path, {"a": _results({0: 0.6, 1: 0.7}, {0: 0.5, 1: 0.6})})
    report, paths = study_report.write(s, out, "dapt study fake")
    assert {p.name for p in paths} == {"table.md", "downstream.csv", "perplexity.csv", "table.png"}
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "downstream.csv").open()))
    assert [r["arm"] for r in rows] == ["base", "a"] and float(rows[1]["vs_base"]) == pytest.approx(0.1)
    readme = _write(tmp_path, "# Fake\nintro\n" + study_report.README_START.format(name="fake") + "\nold\n" + study_report.README_END + "\nafter\n", "README.md")
    study_report.embed_in_readme(readme, s, report.markdown)
    assert study_report.readme_block(readme, s) == report.markdown
    assert readme.read_text().startswith("# Fake\nintro\n") and readme.read_text().endswith("\nafter\n")
    with pytest.raises(ConfigError, match="no generated-table block"):
        study_report.embed_in_readme(_write(tmp_path, "# no markers\n", "R2.md"), s, report.markdown)


def test_guard_fails_when_the_effect_is_within_the_ci_or_an_arm_is_missing(tmp_path):
    spec_text = "title: g\nquestion: q\narms: [{name: a}, {name: b}]\nguard: {lower_domain_dev_ppl_vs_control: [a]}\n"
    s = study_spec.load(_write(tmp_path, spec_text, "g.yaml"))
    out = tmp_path / "out"
    for name, change in (("a", (-0.1, -0.2, 0.01)), ("b", (-0.1, -0.2, -0.05))):
        (out / name / "run").mkdir(parents=True)
        (out / name / "run" / "results.json").write_text(json.dumps(_results({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.5}, dev_change=change)))
    problems = study_report.check_guard(s, study_report.build(s, out, "cmd"))
    assert len(problems) == 1 and "arm a: domain dev perplexity vs control" in problems[0]
    (out / "b" / "run" / "results.json").unlink()
    assert any("arm b did not finish" in p for p in study_report.check_guard(s, study_report.build(s, out, "cmd")))


# ---------------------------------------------------------------- the runner's safety rules (no training)


class _FakeArmProcess:
    """Stands in for an arm's `dapt train` process: writes a finished results.json into its run folder."""

    launched: list[list[str]] = []

    def __init__(self, argv: list[str], **kwargs: Any) -> None:
        _FakeArmProcess.launched.append(argv)
        run_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps({"provenance": {"finished_at": f"t{len(_FakeArmProcess.launched)}"},
                                                          "model_dir": str(run_dir / "model")}))
        self.stdout = iter(["training\n"])

    def wait(self) -> int:
        return 0

    def poll(self) -> int:
        return 0


@pytest.fixture()
def fake_arms(monkeypatch):
    _FakeArmProcess.launched = []
    monkeypatch.setattr(runner.subprocess, "Popen", _FakeArmProcess)
    return _FakeArmProcess.launched


def _two_arms(tmp_path: Path) -> study_spec.StudySpec:
    return study_spec.load(_write(tmp_path, "title: t\nquestion: q\narms: [{name: a}, {name: b, start: a}]\n", "two.yaml"))


def test_sigterm_between_two_arms_starts_no_other(tmp_path, fake_arms):
    s, out = _two_arms(tmp_path), tmp_path / "out"

    def echo(line: str) -> None:
        if line.endswith("a: done in 0.0 min"):  # the first arm has ended, the second not started
            os.kill(os.getpid(), signal.SIGTERM)

    assert runner.run_study(s, out, [], echo=echo) == 143
    assert len(fake_arms) == 1 and runner.status(out, s.arm("b")).state == "todo"
    assert runner.run_study(s, out, [], echo=lambda line: None) == 0 and len(fake_arms) == 2  # the same command continues


def test_sigterm_is_forwarded_only_when_the_arm_did_not_get_it_itself(monkeypatch):
    """A scheduler signals every process of the job: forwarding a second SIGTERM would make the arm stop
    at once without its checkpoint. A plain kill of the study process must still reach the arm."""
    monkeypatch.setattr(runner, "GRACE_SECONDS", 0.05)

    class Child:
        def __init__(self) -> None:
            self.signals: list[int] = []

        def poll(self) -> None:
            return None

        def send_signal(self, signum: int) -> None:
            self.signals.append(signum)

    for acknowledged in (True, False):
        child = Child()
        with runner._Forward() as forward:
            forward.attach(child)
            os.kill(os.getpid(), signal.SIGTERM)
            if acknowledged:  # what dapt train logs when it received the signal itself
                forward.seen("[WARNING] - received SIGTERM: stopping after the current step and writing a checkpoint")
            time.sleep(0.3)
        assert forward.stopped and child.signals == ([] if acknowledged else [signal.SIGTERM])


def test_a_signal_just_before_an_arm_starts_still_reaches_it(monkeypatch):
    """SIGINT to the study process alone (no terminal), arriving after the between-arms check but
    before the arm is attached: the arm gets it after the grace period; the study exits 130."""
    monkeypatch.setattr(runner, "GRACE_SECONDS", 0.05)

    class Child:
        signals: list[int] = []

        def poll(self) -> None:
            return None

        def send_signal(self, signum: int) -> None:
            self.signals.append(signum)

    child = Child()
    with runner._Forward() as forward:
        os.kill(os.getpid(), signal.SIGINT)  # handled by the study: no KeyboardInterrupt
        forward.attach(child)
        time.sleep(0.3)
    assert child.signals == [signal.SIGINT] and forward.exit_status(-2) == 130 and forward.exit_status(143) == 143


def test_the_first_signal_is_acknowledged_even_with_no_training_step_running(caplog):
    from dapt.pipeline.stop_signal import RunInterrupted, StopOnSignal

    with pytest.raises(RunInterrupted), caplog.at_level("WARNING"):
        StopOnSignal(None)._handle(signal.SIGTERM, None)  # e.g. during the control arm or an evaluation
    assert runner.ACK.search(caplog.text)


def test_a_crashed_arm_with_no_run_to_reuse_is_run_again_after_a_config_fix(tmp_path, fake_arms):
    s = study_spec.load(_write(tmp_path, "title: t\nquestion: q\narms: [{name: a}]\n", "crash.yaml"))
    out = tmp_path / "out"
    (out / "a" / "run").mkdir(parents=True)  # it crashed before its first checkpoint: only its run_config.json
    (out / "a" / "run" / "run_config.json").write_text(json.dumps({"trainer": {"max_steps": 1}, "code": "x"}))
    assert runner.status(out, s.arm("a")).state == "todo"
    assert runner.run_study(s, out, [], echo=lambda line: None) == 0 and len(fake_arms) == 1


def test_an_arm_built_on_a_start_arm_that_was_run_again_is_refused(tmp_path, fake_arms):
    s, out = _two_arms(tmp_path), tmp_path / "out"
    assert runner.run_study(s, out, [], echo=lambda line: None) == 0
    record = json.loads((out / "b" / "arm.json").read_text())
    assert record["start"] == {"arm": "a", "finished_at": "t1"}
    results = out / "a" / "run" / "results.json"  # arm a deleted and run again: another model at the same path
    results.write_text(json.dumps({**json.loads(results.read_text()), "provenance": {"finished_at": "t9"}}))
    with pytest.raises(ConfigError, match="arm b continued the run of arm a that finished at t1.*run again since"):
        runner.run_study(s, out, [], echo=lambda line: None)


def test_a_finished_arm_with_another_config_is_refused_and_other_code_is_flagged(tmp_path, fake_arms):
    from dapt.config import compose_config, config_dir
    from dapt.pipeline.resume import run_signature

    s = study_spec.load(_write(tmp_path, "title: t\nquestion: q\ncommon: [trainer.max_steps=7]\narms: [{name: a}]\n", "one.yaml"))
    out = tmp_path / "out"
    assert runner.run_study(s, out, [], echo=lambda line: None) == 0
    overrides = runner.arm_overrides(s, s.arm("a"), out, [])
    signature = run_signature(compose_config([o for o in overrides if not o.startswith("hydra.")], "train", directory=config_dir()))
    config = out / "a" / "run" / "run_config.json"
    config.write_text(json.dumps({**signature, "code": "other"}))
    lines: list[str] = []
    assert runner.run_study(s, out, [], echo=lines.append) == 0 and len(fake_arms) == 1  # reused, with a warning
    assert any("made by other dapt code (digest other" in line for line in lines)
    config.write_text(json.dumps({**signature, "trainer": {**signature["trainer"], "max_steps": 5}}))  # e.g. an edited experiment YAML
    with pytest.raises(ConfigError, match=r"made with another config \(trainer.max_steps: 5 then, 7 now\)"):
        runner.run_study(s, out, [], echo=lambda line: None)


def test_conll_text_is_the_token_column_by_document_or_by_sentence(tmp_path):
    from dapt.data.sources import SourceConfig, iter_documents

    marked = tmp_path / "marked.txt"  # a -DOCSTART- right after a sentence (no blank line) still ends the document
    marked.write_bytes(b"-DOCSTART- X O\n\nThe NN B-Disease\ncancer NN I-Disease\n\nIt NN O\n-DOCSTART- X O\nSecond NN O\r\n\r\nLast NN O")
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"A NN O\nb NN B-X\n\n\nC NN O\nd NN O\n")
    read = lambda path: list(iter_documents(SourceConfig(type="text", path=str(path), split_by="conll"), None))  # noqa: E731
    assert read(marked) == ["The cancer\nIt", "Second\nLast"]
    late = tmp_path / "late.txt"  # a byte-order mark, and a first document without its marker: still read by document
    late.write_bytes(b"\xef\xbb\xbfFirst NN O\n\nsentence NN O\n\n-DOCSTART- X O\n\nNext NN O\n")
    assert read(late) == ["First\nsentence", "Next"]
    assert read(plain) == ["A b", "C d"]
    assert not any(tag in doc for doc in read(marked) + read(plain) for tag in ("NN", "B-", "I-", "DOCSTART"))


# ---------------------------------------------------------------- the regression guard, end to end


def _study(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "dapt.cli", "study", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


@needs_shared_data
def test_mini_study_survives_sigterm_and_its_table_holds_the_guard(tmp_path):
    start = save_tiny(tmp_path / "start", minilm_tokenizer(), seed=0)  # a saved model: its "before" scores exist
    out = tmp_path / "study"
    extra = [f"model.source={start}", "model.random_init=false"]
    args = [str(MINI), *extra, "--out", str(out)]
    env = {**os.environ, "WANDB_MODE": "offline", "DAPT_CACHE_DIR": str(tmp_path / "cache")}
    s = study_spec.load(MINI)

    # 1. SIGTERM to the study's process group while its first arm trains, as a scheduler sends it (the
    #    runner and the arm each get one; the runner must not add a second): the arm checkpoints, the study stops (143).
    proc = _study(args, tmp_path, env)
    ckpt = out / "dapt" / "run" / "checkpoints" / "last.ckpt"
    log = out / "dapt" / "log.txt"
    deadline = time.monotonic() + 300
    training = re.compile(r"^dapt [\w ]+: step \d+/60", re.M)  # the DAPT arm's own steps (the control trains first)
    while time.monotonic() < deadline and proc.poll() is None and not (log.is_file() and training.search(log.read_text(errors="replace"))):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, output[-4000:]
    assert "interrupted" in output and "run the same command again to continue" in output
    assert runner.status(out, s.arm("dapt")).state == "partial" and ckpt.is_file(), output[-3000:]
    assert runner.status(out, s.arm("dapt_more")).state == "todo"

    # 2. The same command continues: the interrupted arm resumes from its checkpoint, the second arm runs.
    proc = _study(args, tmp_path, env)
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-6000:]
    dapt = runner.results_of(out, s.arm("dapt"))
    more = runner.results_of(out, s.arm("dapt_more"))
    assert dapt["resumed_from_step"] and 0 < dapt["resumed_from_step"] < 60 and dapt["steps"] == 60
    arm_json = json.loads((out / "dapt" / "arm.json").read_text())
    assert [a["exit"] for a in arm_json["attempts"]] == [143, 0]

    # 3. The table holds every arm; DAPT lowers domain dev perplexity vs its control beyond the CI.
    report = study_report.build(s, out, "cmd")
    assert study_report.check_guard(s, report) == []
    assert {r["arm"] for r in report.downstream} == {"base", "dapt", "dapt_more"}
    assert {r["arm"] for r in report.perplexity} == {"dapt", "dapt_more"}
    for name in ("table.md", "downstream.csv", "perplexity.csv", "table.png"):
        assert (out / name).is_file(), name
    # the chained arm really continued the DAPT arm's model: its start is DAPT's end (same held-out docs and masks)
    assert more["domain_ppl_before"] == pytest.approx(dapt["domain_ppl_after"], rel=1e-4)
    # Δ vs base of an arm that starts from the base is the run's own after - before, paired over the same seeds
    row = next(r for r in report.downstream if r["arm"] == "dapt")
    assert row["vs_base"] == pytest.approx(dapt["downstream"]["ncbi_disease"]["delta"], abs=1e-9)

    # 4. Again: nothing recomputed. With another override: refused, naming the arm's folder.
    stamp = (out / "dapt" / "run" / "results.json").stat().st_mtime
    proc = _study(args, tmp_path, env)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and output.count("done, reusing") == 2, output[-3000:]
    assert (out / "dapt" / "run" / "results.json").stat().st_mtime == stamp
    proc = _study([str(MINI), *extra, "trainer.max_steps=20", "--out", str(out)], tmp_path, env)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "was launched with other overrides" in output and "trainer.max_steps=20" in output, fail_message(proc)


@pytest.mark.parametrize("name", ["dont_stop_pretraining", "masking_rate", "masking_strategy", "forgetting", "vocabulary"])
def test_readme_tables_are_generated_from_their_run_folders(name, tmp_path):
    """Each study README's table block is exactly what --report builds from the folder its 'Made by'
    command names (kept results in the repo), or from no runs at all: never typed, never stale."""
    s = study_spec.load(name)
    block = study_report.readme_block(REPO_ROOT / s.readme, s)
    assert block is not None, f"{s.readme} has no generated block for {name}"
    command = re.search(r"^Made by: `(.+)`$", block, re.M).group(1)
    out = re.search(r"--out (\S+)", command)
    folder = REPO_ROOT / out.group(1) if out else tmp_path / "no_runs"
    assert block == study_report.build(s, folder, command).markdown


@pytest.mark.parametrize("name", ["dont_stop_pretraining", "masking_rate", "masking_strategy", "forgetting", "vocabulary"])
def test_paper_scale_overrides_compose(name, tmp_path):
    """The README's paper-scale command is the study with these overrides only: they must be valid."""
    s = study_spec.load(name)
    arm = s.arms[-1]
    runner.check_arm(s, arm, runner.arm_overrides(s, arm, tmp_path, list(s.paper_scale)))
