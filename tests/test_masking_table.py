"""experiments/masking/table.py reports what the kept results say: the reference row, paired changes
computed from the per-document sums, and F1 differences from the per-seed scores."""

from __future__ import annotations

import json
import math

from dapt.config import REPO_ROOT

RESULTS = REPO_ROOT / "experiments" / "masking" / "results" / "sweep_2026-12-03_73d0b93"


def test_table_rows_match_the_kept_results():
    from experiments.masking.table import table

    text = table([RESULTS])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| random") or line.startswith("| whole_word")}
    ref, ww = (json.loads((RESULTS / i / "results.json").read_text()) for i in ("0", "1"))
    assert rows["random"][4] == "reference" and rows["random"][2].startswith(f"{ref['domain_ppl_after']:.1f} [")
    # the paired domain change is ppl_whole_word / ppl_random - 1 (same documents and masks)
    expected = 100 * (ww["domain_ppl_after"] / ref["domain_ppl_after"] - 1)
    assert rows["whole_word"][4].startswith(f"{expected:+.1f}% [")
    # the F1 difference is the mean of the per-seed differences
    a = ref["downstream"]["ncbi_disease"]["after"]["test_f1"]["values"]
    b = ww["downstream"]["ncbi_disease"]["after"]["test_f1"]["values"]
    delta = sum(y - x for x, y in zip(a, b)) / len(a)
    assert rows["whole_word"][7].startswith(f"{delta:+.3f} [") and not math.isnan(delta)


def test_table_says_which_code_made_the_cells_and_warns_when_it_differs(tmp_path):
    import shutil

    from experiments.masking.table import table

    sweep = tmp_path / "sweep"
    shutil.copytree(RESULTS, sweep)
    assert "All cells: code not recorded" in table([sweep])
    for job, digest in (("0", "aaaa"), ("1", "aaaa")):
        path = sweep / job / "results.json"
        results = json.loads(path.read_text())
        results["provenance"] = {"git_commit": "0123456789abcdef", "git_dirty": False, "code_digest": digest}
        path.write_text(json.dumps(results))
    assert "All cells: commit 0123456, code digest aaaa." in table([sweep])
    results = json.loads((sweep / "1" / "results.json").read_text())
    results["provenance"]["code_digest"] = "bbbb"
    (sweep / "1" / "results.json").write_text(json.dumps(results))
    assert "WARNING: cells made by different code" in table([sweep])
    assert "precisions" not in table([sweep])
    results["precision"] = {"value": "bf16-mixed", "reason": "auto: the CPU has AMX"}
    (sweep / "1" / "results.json").write_text(json.dumps(results))
    assert "WARNING: cells computed in different precisions: 32-true (before precision was recorded)" in table([sweep])
    # general perplexities scored on other general text (WikiText with its markup, 304,000 tokens) are flagged
    assert "general held-out sets" not in table([sweep])
    for job, tokens in (("0", 304000), ("1", 229376)):
        path = sweep / job / "results.json"
        results = json.loads(path.read_text())
        results["heldout_sets"] = {"test": {"general": {"documents": 62, "tokens": tokens}, "domain": {"documents": int(job), "tokens": 9}}}
        path.write_text(json.dumps(results))
    assert ("WARNING: general perplexities scored on different general held-out sets (e.g. another eval corruption, masking.mask_fraction "
            "or random_fraction; before and after WikiText's markup was removed; or truncated by data.eval_max_doc_tokens before commit "
            "fc8ac23), so not comparable across them: test 62 documents / 304000 tokens / None masked:") in table([sweep])
    results["heldout_sets"]["test"]["general"]["tokens"] = 304000  # same general set, different domain sets: no warning
    (sweep / "1" / "results.json").write_text(json.dumps(results))
    assert "general held-out sets" not in table([sweep])
