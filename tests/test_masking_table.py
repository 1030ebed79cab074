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
