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

import sys
from pathlib import Path
from typing import Any

from dapt.evaluation.stats import apply_holm, paired_comparison
from experiments.tables import missing_line, paired_ppl, pct, ppl_cell, provenance_lines, sweep_jobs, sweep_table_main

REFERENCE = ("random", 0.15)
TASK = "ncbi_disease"


def _key(job: dict[str, Any]) -> tuple[str, float]:
    masking = job["results"]["config"]["masking"]
    return masking["name"], float(masking["rate"])


def table(sweeps: list[Path]) -> str:
    jobs, missing = sweep_jobs(sweeps)
    for job in jobs:
        job["key"] = _key(job)
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
            dom = pct(paired_ppl(job, ref, "domain_ppl")) if ref else "—"
            gen = pct(paired_ppl(job, ref, "general_ppl")) if ref else "—"
            c = job.get("vs_ref")
            cmp_cell = (f"{c['delta']:+.3f} [{c['delta_ci'][0]:+.3f}, {c['delta_ci'][1]:+.3f}], p={c['p_holm']:.2f}, MDE {c['mde']:.3f}"
                        if c and c.get("delta_ci") else "—")
        lines.append(f"| {name} | {rate:.2f} | {ppl_cell(r, 'domain_ppl_after')} | {ppl_cell(r, 'general_ppl_after')} | {dom} | {gen} "
                     f"| {f1_cell} | {cmp_cell} |")
    lines += ["", provenance_lines(jobs, lambda job: f"{job['key'][0]}@{job['key'][1]:.2f}")]
    if missing:
        lines.append("")
        lines.append(missing_line(missing))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return sweep_table_main(table, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
