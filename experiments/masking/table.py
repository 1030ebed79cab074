"""The masking ablation's results table, from the finished jobs of one or more sweep folders.

    python -m experiments.masking.table multirun/masking_ablation/<time> [more sweep folders]

One row per job (masking, rate): test perplexities with their 95% CIs (every job is scored on the
same documents and the same fixed random masks), then each strategy against the reference job
(``random`` at 0.15, BERT's recipe): the relative change in domain and general test perplexity
with a *paired* document-bootstrap CI (``heldout_documents.json``), and the NCBI-disease F1 change
paired over fine-tuning seeds (t CI, p, minimum detectable effect), Holm-adjusted across the table.
Jobs without results.json (unfinished, failed) are listed as missing, never filled in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dapt.evaluation.stats import apply_holm, paired_comparison
from dapt.modeling.perplexity import paired_change_ci

REFERENCE = ("random", 0.15)
TASK = "ncbi_disease"


def _job(folder: Path) -> dict[str, Any] | None:
    path = folder / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    masking = results["config"]["masking"]
    docs = json.loads((folder / "heldout_documents.json").read_text())["after"]
    return {"folder": folder, "results": results, "docs": docs, "key": (masking["name"], float(masking["rate"]))}


def _pct(change: tuple[float, float, float] | None) -> str:
    if change is None:
        return "—"
    value, low, high = change
    return f"{100 * value:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"


def _ppl(results: dict[str, Any], key: str) -> str:
    low, high = results.get(f"{key}_ci") or (None, None)
    value = results.get(key)
    return f"{value:.1f} [{low:.1f}, {high:.1f}]" if value is not None and low is not None else f"{value}"


def _paired_ppl(job: dict[str, Any], ref: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    a, b = job["docs"].get(key), ref["docs"].get(key)
    if not a or not b or a["ids"] != b["ids"] or a["counts"] != b["counts"]:
        return None
    return paired_change_ci(np.asarray(a["sums"]), np.asarray(b["sums"]), np.asarray(a["counts"]))


def table(sweeps: list[Path]) -> str:
    jobs, missing = [], []
    for sweep in sweeps:
        for folder in sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
            job = _job(folder)
            (jobs.append(job) if job else missing.append(folder))
    by_key = {job["key"]: job for job in jobs}
    ref = by_key.get(REFERENCE)
    comparisons = []
    for job in jobs:
        f1 = job["results"].get("downstream", {}).get(TASK, {})
        job["f1"] = f1.get("after", {}).get("test_f1", {})
        if ref is not None and job is not ref:
            ref_f1 = ref["results"]["downstream"][TASK]["after"]["test_f1"]["values"]
            job["vs_ref"] = paired_comparison(ref_f1, job["f1"]["values"])
            comparisons.append(job["vs_ref"])
    apply_holm(comparisons)
    lines = [
        "| masking | rate | domain test ppl [95% CI] | general test ppl [95% CI] | domain ppl vs random@0.15 | general ppl vs random@0.15 "
        "| NCBI F1 after (seeds 0/1/2) | F1 vs random@0.15 [95% CI], Holm p, MDE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for job in sorted(jobs, key=lambda j: (j["key"] != REFERENCE, j["key"])):
        r = job["results"]
        name, rate = job["key"]
        f1 = job["f1"]
        values = " / ".join(f"{v:.3f}" for v in f1.get("values", []))
        f1_cell = f"{f1['mean']:.3f} ± {f1['std']:.3f} ({values})" if f1 else "—"
        if job is ref:
            dom = gen = cmp_cell = "reference"
        else:
            dom = _pct(_paired_ppl(job, ref, "domain_ppl")) if ref else "—"
            gen = _pct(_paired_ppl(job, ref, "general_ppl")) if ref else "—"
            c = job.get("vs_ref")
            cmp_cell = (f"{c['delta']:+.3f} [{c['delta_ci'][0]:+.3f}, {c['delta_ci'][1]:+.3f}], p={c['p_holm']:.2f}, MDE {c['mde']:.3f}"
                        if c and c.get("delta_ci") else "—")
        lines.append(f"| {name} | {rate:.2f} | {_ppl(r, 'domain_ppl_after')} | {_ppl(r, 'general_ppl_after')} | {dom} | {gen} "
                     f"| {f1_cell} | {cmp_cell} |")
    lines += ["", _code_line(jobs)]
    if missing:
        lines.append("")
        lines.append("Not finished (no results.json): " + ", ".join(str(m) for m in missing))
    return "\n".join(lines)


def _code_line(jobs: list[dict[str, Any]]) -> str:
    """Which code made the cells (results.json ``provenance``), and a warning when it differs: cells
    computed by different code are not comparable unless the change between them altered no number."""
    codes = {}
    for job in jobs:
        prov = job["results"].get("provenance") or {}
        label = (f"commit {str(prov.get('git_commit'))[:7]}{' (uncommitted changes)' if prov.get('git_dirty') else ''}, "
                 f"code digest {prov.get('code_digest')}") if prov else "code not recorded (results.json without provenance)"
        codes.setdefault(label, []).append(f"{job['key'][0]}@{job['key'][1]:.2f}")
    lines = [f"All cells: {next(iter(codes))}." if len(codes) == 1 else
             "WARNING: cells made by different code: " + "; ".join(f"{label}: {', '.join(cells)}" for label, cells in codes.items())]
    precisions: dict[str, list[str]] = {}
    for job in jobs:  # results.json without "precision" predate trainer.precision=auto: the CPU config was 32-true then
        value = (job["results"].get("precision") or {}).get("value") or "32-true (before precision was recorded)"
        precisions.setdefault(value, []).append(f"{job['key'][0]}@{job['key'][1]:.2f}")
    if len(precisions) > 1:
        lines.append("WARNING: cells computed in different precisions: "
                     + "; ".join(f"{value}: {', '.join(cells)}" for value, cells in precisions.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    print(table([Path(a) for a in args]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
