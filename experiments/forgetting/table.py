"""The forgetting-remedies table, from the finished jobs of one or more sweep folders.

    python -m experiments.forgetting.table multirun/forgetting_remedies/<time> [more sweep folders]

One row per job, labelled by its remedies (results.json ``remedies.active``; ``plain`` = none). Test
perplexities with 95% CIs, then each job's relative perplexity change against three references, each
with a *paired* document-bootstrap CI over the same held-out documents and masks:
the start model (domain gain, forgetting), the control arm (the same steps on general text, shared by
every job: does the gain come from the domain, is general text worse than with more general MLM?) and
plain DAPT (what the remedy changes). Jobs without results.json are listed as missing, never filled in.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from experiments.tables import missing_line, paired_ppl, pct, ppl_cell, provenance_lines, sweep_jobs, sweep_table_main

PLAIN = "plain"


def label(job: dict[str, Any]) -> str:
    active = (job["results"].get("remedies") or {}).get("active") or []
    return "+".join(active) if active else PLAIN


def _change(results: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    changes = results.get("changes") or {}
    if changes.get(key) is None:
        return None
    low, high = changes.get(f"{key}_ci") or (None, None)
    return changes[key], low, high


def table(sweeps: list[Path]) -> str:
    jobs, missing = sweep_jobs(sweeps)
    plain = next((job for job in jobs if label(job) == PLAIN), None)
    lines = [
        "| remedies | trainable params | domain test ppl [95% CI] | general test ppl [95% CI] | domain ppl vs start | general ppl vs start "
        "(forgetting) | domain ppl vs control | general ppl vs control | domain ppl vs plain DAPT | general ppl vs plain DAPT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    shared = (plain["results"].get("control") or {}).get("cache_key") if plain else None
    for job in sorted(jobs, key=lambda j: (label(j) != PLAIN, label(j))):
        r = job["results"]
        own_control = shared is not None and (r.get("control") or {}).get("cache_key") != shared
        remedies = r.get("remedies") or {}
        share = (f"{100 * remedies['trainable_parameters'] / remedies['parameters']:.1f}%"
                 if remedies.get("parameters") else "—")
        if job is plain:
            vs_plain = ["reference", "reference"]
        elif plain is None:
            vs_plain = ["—", "—"]
        else:
            vs_plain = [pct(paired_ppl(job, plain, "domain_ppl")), pct(paired_ppl(job, plain, "general_ppl"))]
        cells = [label(job), share, ppl_cell(r, "domain_ppl_after"), ppl_cell(r, "general_ppl_after"),
                 pct(_change(r, "domain_ppl_change")), pct(_change(r, "forgetting")),
                 pct(_change(r, "domain_ppl_change_vs_control")) + (" (own control)" if own_control else ""),
                 pct(_change(r, "forgetting_vs_control")) + (" (own control)" if own_control else ""), *vs_plain]
        lines.append("| " + " | ".join(cells) + " |")
    controls = {(job["results"].get("control") or {}).get("cache_key") for job in jobs}
    lines += ["", provenance_lines(jobs, label)]
    if jobs:
        r = jobs[0]["results"]
        lines.append(f"Steps: {r.get('steps')}; start (before) domain test ppl {ppl_cell(r, 'domain_ppl_before')}, "
                     f"general {ppl_cell(r, 'general_ppl_before')}; control arm: "
                     + ("one, shared by every job" if len(controls) == 1 and None not in controls
                        else f"{len(controls)} different (rows marked 'own control' read against their own)")
                     + (f", domain test ppl {ppl_cell(r['control'], 'domain_ppl_after')}, general {ppl_cell(r['control'], 'general_ppl_after')}."
                        if r.get("control") else "."))
    if missing:
        lines.append(missing_line(missing))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return sweep_table_main(table, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
