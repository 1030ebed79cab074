"""The vocabulary-adaptation table, from two finished run folders (without and with ``vocabulary=extend``).

    python -m experiments.vocabulary.table <run without extension> <run with extension> [--task ncbi_disease]

Per run: words added and tokenizer fertility (pieces per word) before/after on domain and general text
(results.json ``vocabulary``), domain and general test perplexity before/after DAPT with 95% CIs (each
run's own tokenizer: comparable within a row, not across rows), and the task's test F1 before/after
(mean ± sd over fine-tuning seeds). Then the extended run's F1 against the plain run's, paired over
the same fine-tuning seeds (both "before" models are the same original start, so their F1 match).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dapt.evaluation.stats import paired_comparison
from experiments.tables import pct, ppl_cell, provenance_lines, read_job

TASK = "ncbi_disease"


def _f1(results: dict[str, Any], task: str, arm: str) -> dict[str, Any]:
    return ((results.get("downstream") or {}).get(task) or {}).get(arm, {}).get("test_f1") or {}


def _f1_cell(f1: dict[str, Any]) -> str:
    if not f1:
        return "—"
    values = " / ".join(f"{v:.3f}" for v in f1.get("values", []))
    return f"{f1['mean']:.3f} ± {f1['std']:.3f} ({values})"


def _delta_cell(results: dict[str, Any], task: str) -> str:
    """The run's own after − before F1 difference, paired over seeds (results.json ``downstream``)."""
    entry = (results.get("downstream") or {}).get(task) or {}
    if entry.get("delta") is None or not entry.get("delta_ci"):
        return "—"
    low, high = entry["delta_ci"]
    p = entry.get("p_holm", entry.get("p_value"))
    return f"{entry['delta']:+.3f} [{low:+.3f}, {high:+.3f}], p = {p:.3f}" + (f" (Holm, {entry['holm_m']} comparisons)" if entry.get("holm_m", 1) > 1 else "")


def _fertility(results: dict[str, Any], corpus: str) -> str:
    vocab = results.get("vocabulary")
    if not vocab:
        return "—"
    fert = vocab["fertility"][corpus]
    return f"{fert['before']:.3f} → {fert['after']:.3f}"


def table(plain_dir: Path, extended_dir: Path, task: str = TASK) -> str:
    jobs = {"plain": read_job(plain_dir), "extend": read_job(extended_dir)}
    missing = [name for name, job in jobs.items() if job is None]
    if missing:
        return f"Not finished (no results.json): {', '.join(missing)}"
    lines = [
        f"| run | words added | pieces/word, domain | pieces/word, general | domain test ppl before → after | general test ppl before → after "
        f"| domain ppl change | {task} test F1 before | {task} test F1 after | F1 after − before [95% CI], p |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, job in jobs.items():
        r = job["results"]
        changes = r.get("changes") or {}
        change = (changes.get("domain_ppl_change"), *(changes.get("domain_ppl_change_ci") or (None, None)))
        added = (r.get("vocabulary") or {}).get("added", 0)
        lines.append(f"| {name} | {added} | {_fertility(r, 'domain')} | {_fertility(r, 'general')} "
                     f"| {ppl_cell(r, 'domain_ppl_before')} → {ppl_cell(r, 'domain_ppl_after')} "
                     f"| {ppl_cell(r, 'general_ppl_before')} → {ppl_cell(r, 'general_ppl_after')} "
                     f"| {pct(change) if change[0] is not None else '—'} | {_f1_cell(_f1(r, task, 'before'))} | {_f1_cell(_f1(r, task, 'after'))} "
                     f"| {_delta_cell(r, task)} |")
    a, b = _f1(jobs["plain"]["results"], task, "after"), _f1(jobs["extend"]["results"], task, "after")
    lines.append("")
    if a.get("values") and b.get("values") and len(a["values"]) == len(b["values"]):
        c = paired_comparison(a["values"], b["values"])
        ci = c.get("delta_ci")
        lines.append(f"{task} test F1, extend − plain (paired over {c['n']} fine-tuning seeds): {c['delta']:+.3f}"
                     + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}], p = {c['p_value']:.2f}, minimum detectable effect {c['mde']:.3f}" if ci else "")
                     + f"; {c['verdict']}.")
    else:
        lines.append(f"{task}: no paired F1 comparison (missing or unequal seeds).")
    lines += ["", provenance_lines(list(jobs.values()), lambda job: "extend" if job is jobs["extend"] else "plain")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.vocabulary.table", description=__doc__.splitlines()[0])
    parser.add_argument("plain", type=Path)
    parser.add_argument("extended", type=Path)
    parser.add_argument("--task", default=TASK)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(table(args.plain, args.extended, args.task))
    return 0


if __name__ == "__main__":
    sys.exit(main())
