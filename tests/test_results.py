"""results.json has one owner: ``dapt.pipeline.results.RunResults``.

Every field it declares reaches the file (or is documented as omitted when empty), the derived blocks
(``metrics``, ``non_finite``) are computed from the same object, and the README documents each
top-level key a user will meet.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

from dapt.pipeline.results import RunResults, flat_metrics

README = Path(__file__).resolve().parents[1] / "README.md"


def _record(**overrides):
    heldout = {"domain_ppl": 120.0, "domain_ppl_ci": [110.0, 130.0], "general_ppl": 90.0, "domain_dev_ppl": 118.0, "documents": {"x": 1}}
    values = dict(
        experiment="e", before=heldout, before_cached=True, after={**heldout, "domain_ppl": 100.0, "general_ppl": math.nan},
        control={"steps": 3, "domain_ppl_after": 110.0}, changes={"domain_ppl_change": -0.16, "domain_ppl_change_ci": [-0.2, -0.1]},
        tokens_per_s=1000.0, mfu=0.3, train_tokens=4096, train_sources={"a.jsonl": 4096}, data_quality={}, steps=3,
        resumed_from_step=None, train_seconds=1.5, attempts=1, precision={"value": "32-true", "reason": "test"}, cpu_threads={"setting": "all", "threads": 2},
        provenance={}, heldout_sets={}, base={"source": "s", "cache_key": None}, remedies={"active": []}, model_dir="m", data={"name": "d"}, config={},
    )
    values.update(overrides)
    return RunResults(**values)


def test_every_field_reaches_results_json():
    out = _record(downstream={"t": {"metric": "f1"}}, error={"stage": "downstream", "type": "X", "message": "m"},
                  vocabulary={"added": 3}, selection={"documents": 5}).to_json()
    stage_fields = {"before", "after"}  # spread into <set>_<stat>_<stage> keys
    for f in fields(RunResults):
        if f.name not in stage_fields:
            assert f.name in out, f.name
    assert out["domain_ppl_before"] == 120.0 and out["domain_ppl_after"] == 100.0 and out["domain_ppl_before_ci"] == [110.0, 130.0]
    assert "documents_before" not in out and "documents" not in out  # per-document tables go to heldout_documents.json


def test_derived_blocks_come_from_the_same_object():
    out = _record().to_json()
    expected = flat_metrics({k: v for k, v in out.items() if k not in ("metrics", "non_finite")})
    assert out["metrics"].keys() == expected.keys()
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(out["metrics"].values(), expected.values()))
    assert out["metrics"]["domain_ppl_change"] == -0.16 and out["metrics"]["control/domain_ppl_after"] == 110.0
    assert set(out["non_finite"]) == {"general_ppl_after", "metrics.general_ppl_after", "metrics.forgetting"}
    empty = _record(control=None).to_json()
    assert "control" not in empty and "downstream" not in empty and "error" not in empty
    assert "vocabulary" not in empty and "selection" not in empty


def test_readme_documents_every_top_level_key():
    text = README.read_text()
    start = text.index("## Outputs of a run")
    section = text[start:text.index("\n## ", start + 1)]
    documented = set(re.findall(r"`([a-z_]+)`", section))
    for f in fields(RunResults):
        if f.name not in ("experiment", "config", "precision", "data", "mfu"):  # documented elsewhere in the README
            assert f.name in documented, f"README does not document results.json '{f.name}'"
