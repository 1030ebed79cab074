"""The experiments' tables report what the jobs' files say: the forgetting table (one row per remedy set, the plain
DAPT row as the reference, paired changes from the per-document sums) and the vocabulary table
(fertility from results.json, the F1 difference paired over fine-tuning seeds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import needs_shared_data


def _job(folder: Path, active: list[str], sums: list[float], counts: list[int], control_key: str = "c1") -> None:
    folder.mkdir(parents=True)
    ppl = math.exp(sum(sums) / sum(counts))
    docs = {"domain_ppl": {"ids": list(range(len(sums))), "sums": sums, "counts": counts},
            "general_ppl": {"ids": list(range(len(sums))), "sums": [s * 0.9 for s in sums], "counts": counts}}
    results = {"domain_ppl_after": ppl, "domain_ppl_after_ci": [ppl * 0.9, ppl * 1.1], "general_ppl_after": ppl, "general_ppl_after_ci": [ppl * 0.9, ppl * 1.1],
               "domain_ppl_before": 50.0, "domain_ppl_before_ci": [45.0, 55.0], "general_ppl_before": 40.0, "general_ppl_before_ci": [36.0, 44.0],
               "changes": {"domain_ppl_change": -0.2, "domain_ppl_change_ci": [-0.25, -0.15], "forgetting": 0.05, "forgetting_ci": [0.01, 0.09]},
               "remedies": {"active": active, "trainable_parameters": 50, "parameters": 100}, "control": {"cache_key": control_key},
               "steps": 200, "provenance": {"git_commit": "abcdef0123", "git_dirty": False, "code_digest": "d1"},
               "precision": {"value": "bf16-mixed"},
               "heldout_sets": {"test": {name: {"documents": len(sums), "tokens": 999, "masked_tokens": sum(counts), "digest": name[0] * 16}
                                         for name in ("domain", "general")}},
               "config": {"masking": {"eval_strategy": "random", "eval_rate": 0.15, "eval_seed": 1, "mask_fraction": 0.8, "random_fraction": 0.1}}}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "heldout_documents.json").write_text(json.dumps({"after": docs}))


def test_rows_reference_and_paired_changes(tmp_path):
    from experiments.forgetting.table import table

    rng = np.random.default_rng(0)
    counts = [int(c) for c in rng.integers(20, 60, size=30)]
    plain = [float(c * 3.0 + rng.normal()) for c in counts]
    l2sp = [s * 1.05 for s in plain]
    _job(tmp_path / "s" / "0", [], plain, counts)
    _job(tmp_path / "s" / "1", ["l2sp"], l2sp, counts)
    (tmp_path / "s" / "2").mkdir()  # unfinished
    text = table([tmp_path / "s"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")}
    assert rows["plain"][8] == "reference" and rows["l2sp"][1] == "50.0%"
    expected = 100 * (math.exp(sum(l2sp) / sum(counts)) / math.exp(sum(plain) / sum(counts)) - 1)
    assert rows["l2sp"][8].startswith(f"{expected:+.1f}% [")
    assert rows["l2sp"][5] == "+5.0% [+1.0, +9.0]"
    assert "one, shared by every job" in text and "Not finished" in text and "All cells: commit abcdef0" in text
    _job(tmp_path / "s" / "3", ["llrd"], plain, counts, control_key="c2")
    text = table([tmp_path / "s"])
    assert "2 different (rows marked 'own control'" in text
    llrd = next(line for line in text.splitlines() if line.startswith("| llrd"))
    assert llrd.count("(own control)") == 2 and "own control" not in next(line for line in text.splitlines() if line.startswith("| l2sp"))

    # same documents and masked-token counts, but scored with mask-only corruption: not paired with plain
    path = tmp_path / "s" / "1" / "results.json"
    results = json.loads(path.read_text())
    results["config"]["masking"]["mask_fraction"], results["config"]["masking"]["random_fraction"] = 1.0, 0.0
    path.write_text(json.dumps(results))
    l2sp_row = next(line for line in table([tmp_path / "s"]).splitlines() if line.startswith("| l2sp"))
    assert [c.strip() for c in l2sp_row.split("|")[1:-1]][8:] == ["—", "—"]


def test_vocabulary_table_reads_fertility_and_pairs_f1_over_seeds(tmp_path):
    from experiments.vocabulary.table import table

    counts = [30] * 10
    _job(tmp_path / "plain", [], [90.0] * 10, counts)
    _job(tmp_path / "extend", [], [80.0] * 10, counts)
    for name, after in (("plain", [0.60, 0.62, 0.61]), ("extend", [0.63, 0.66, 0.64])):
        path = tmp_path / name / "results.json"
        results = json.loads(path.read_text())
        results["downstream"] = {"ncbi_disease": {"before": {"test_f1": {"mean": 0.5, "std": 0.01, "values": [0.49, 0.5, 0.51]}},
                                                  "after": {"test_f1": {"mean": float(np.mean(after)), "std": 0.01, "values": after}},
                                                  "delta": 0.1, "delta_ci": [0.05, 0.15], "p_value": 0.01, "p_holm": 0.02, "holm_m": 2}}
        if name == "extend":
            results["vocabulary"] = {"added": 1000, "fertility": {"domain": {"before": 1.257, "after": 1.143},
                                                                  "general": {"before": 1.112, "after": 1.110}}}
        path.write_text(json.dumps(results))
    text = table(tmp_path / "plain", tmp_path / "extend")
    extend = next(line for line in text.splitlines() if line.startswith("| extend"))
    assert "| 1000 | 1.257 → 1.143 | 1.112 → 1.110 |" in extend
    # the paired delta is the mean of the per-seed differences (0.03, 0.04, 0.03)
    assert "extend − plain (paired over 3 fine-tuning seeds): +0.033 [" in text
    assert "| plain | 0 | — | — |" in text and "| +0.100 [+0.050, +0.150], p = 0.020 (Holm, 2 comparisons) |" in text


def test_the_readme_tables_are_the_tables_generated_from_the_kept_results():
    """The numbers in experiments/forgetting and experiments/vocabulary READMEs come from the kept run files."""
    from dapt.config import REPO_ROOT
    from experiments.forgetting.table import table as forgetting_table
    from experiments.vocabulary.table import table as vocabulary_table

    root = REPO_ROOT / "experiments"
    vocab = root / "vocabulary" / "results" / "2026-12-03_4071bb5"
    for readme, generated in (
        (root / "forgetting" / "README.md", forgetting_table([root / "forgetting" / "results" / "sweep_2026-12-03_394141f"])),
        # a dapt study folder (<arm>/run) tabulates like a sweep: all 8 arms, each against plain DAPT
        (root / "forgetting" / "README.md", forgetting_table([root / "forgetting" / "results" / "study_2026-12-04_8a08c8e"])),
        (root / "vocabulary" / "README.md", vocabulary_table(vocab / "plain", vocab / "extend")),
    ):
        text = readme.read_text()
        rows = [line for line in generated.splitlines() if line.startswith("| ") or "paired over" in line]
        assert len(rows) >= 4
        for line in rows:
            assert line in text, f"{readme.name}: {line[:80]}... is not the generated row"


def test_rescore_requires_unchanged_sets_to_score_as_recorded():
    """experiments.heldout_rescore: a held-out set built exactly as the run built it must give the
    recorded perplexity (the kept TAPT-ChemProt re-scoring: domain sets unchanged and equal, general
    sets rebuilt without WikiText's markup and so not compared); a changed number is a mismatch."""
    from dapt.config import REPO_ROOT
    from experiments.heldout_rescore import _unchanged_but_different

    kept = REPO_ROOT / "experiments" / "dont_stop_pretraining" / "results" / "study_2026-12-04_21245eb" / "tapt_chemprot"
    rescore = json.loads((kept / "heldout_rescore_2ae98f8.json").read_text())
    assert rescore["heldout_sets"]["test"]["domain"] == rescore["recorded_heldout_sets"]["test"]["domain"]
    assert rescore["heldout_sets"]["test"]["general"] != rescore["recorded_heldout_sets"]["test"]["general"]
    assert _unchanged_but_different(rescore["rows"], rescore["heldout_sets"], rescore["recorded_heldout_sets"]) == []
    rows = [dict(row) for row in rescore["rows"]]
    for row in rows:
        row["ppl"] *= 1.001
    flagged = _unchanged_but_different(rows, rescore["heldout_sets"], rescore["recorded_heldout_sets"])
    assert len(flagged) == 6 and all(line.startswith("domain") for line in flagged)  # 2 domain sets x 3 models


@needs_shared_data
def test_rescoring_an_unchanged_run_reproduces_every_recorded_number(tmp_path):
    """experiments.heldout_rescore end to end: a finished tiny run (saved start, control, adapted model)
    re-scored by the current code on sets built exactly as the run built them gives every recorded
    perplexity and paired change again, and exits 0 (no MISMATCH); its JSON records the same sets."""
    import subprocess
    import sys

    from tests.conftest import TINY_OVERRIDES
    from tests.helpers import minilm_tokenizer
    from tests.test_finetune import save_tiny

    start = save_tiny(tmp_path / "start", minilm_tokenizer(), seed=0)
    run_dir = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"model.source={start}", "model.random_init=false", f"hydra.run.dir={run_dir}"]
    train = subprocess.run([sys.executable, "-m", "dapt.cli", "train", *overrides], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "rescore.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.heldout_rescore", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rescore, results = json.loads(out.read_text()), json.loads((run_dir / "results.json").read_text())
    assert rescore["mismatch"] == [] and rescore["heldout_sets"] == results["heldout_sets"]
    scored = [row for row in rescore["rows"] if row["ppl"] is not None]
    assert len(scored) == 12  # 4 sets x start, control, adapted
    for row in scored:
        assert row["ppl"] == pytest.approx(row["recorded_ppl"], rel=1e-6), row
    for key, value in results["changes"].items():
        if not key.endswith("_ci"):
            assert rescore["changes"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
