"""``dapt doctor``'s outputs: the ranked findings in the terminal, in Markdown and in ``doctor.json``.

``doctor.json`` (schema version ``dapt.diagnostics.findings.SCHEMA_VERSION``, currently 1) is one
JSON object. Top-level keys, every kind:

- ``schema_version`` (int): bumped whenever a key below or a Finding field changes meaning.
- ``kind``: ``"corpus"`` (before training: ``dapt doctor [overrides]``), ``"run"`` (a finished run
  directory, one with ``results.json``) or ``"sweep"`` (a directory of numbered sweep jobs).
- ``findings``: list, most serious first (``findings.ranked``), each a Finding as a dict:
  ``check`` (stable id, e.g. ``corpus.near_duplicates``, ``corpus.contamination``), ``severity``
  (``"error"`` > ``"warning"`` > ``"info"`` > ``"ok"``: ``ok`` means the check ran and passed),
  ``title`` (one line), ``measured`` (what was computed), ``threshold`` (the trigger values),
  ``why`` (the source or reasoning behind the threshold), ``overrides`` (``dapt train`` overrides to
  try, possibly empty), ``scope`` (what was checked: ``data.train``, ``task ncbi_disease test``, a run).
- ``counts``: ``{"error": n, "warning": n, "info": n, "ok": n}``.

``kind: "corpus"`` adds (``CORPUS_KEYS``): ``config`` (``{"overrides": [...], "max_documents": n,
"contamination_documents": n or null, "data": name, "tasks": [...]}``), ``domain`` / ``general`` (sample profiles: documents, words, tokens,
tokens_per_word, duplicate_documents, short_documents, replacement_chars, non_alpha_share, bytes,
capped), ``vocabulary_overlap_top10k``, ``domain_term_fragmentation``, ``general_word_fragmentation``,
``example_domain_terms``, ``planned_train_tokens``, ``sampled_tokens_per_document``, ``corpus_size``
(planned tokens, corpus tokens and how they were counted, epochs), ``near_duplicates`` (share,
parameters, example pairs: positions in the sample, which takes documents round-robin from the
``data.train`` sources; a lower bound when the sample is capped) and ``contamination`` (``{task: {split:
overlap}}`` against the whole streamed ``data.train`` corpus, with ``documents_checked`` and ``capped``;
the selected corpus, when ``selection`` is configured and built, appears as findings scoped
``task <name> <split> (selection)``).

``kind: "run"`` / ``"sweep"`` adds (``RUN_KEYS``): ``path`` (the directory diagnosed) and ``runs``
(the finished run folders ``dapt.reporting.diagnosis.diagnose_path`` read: the run itself, or each
finished job of the sweep). Run findings of a sweep are scoped by their job folder's path relative to
the sweep folder.

Readers should check ``schema_version`` and ignore keys they do not know.

W&B: for a run logged online (a ``wandb/run-*`` folder, ``WANDB_API_KEY`` set), ``dapt doctor <run dir>``
(and, per job, ``<sweep dir>``) resumes the run and adds to its W&B summary ``doctor/error``,
``doctor/warning``, ``doctor/info``, ``doctor/ok`` (counts), ``doctor/schema_version``,
``doctor/top_check``, ``doctor/top_severity`` and ``doctor/top_title`` (the most serious finding). An
offline run is left untouched (wandb cannot resume offline runs): its findings are in doctor.json only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from dapt.diagnostics.findings import SCHEMA_VERSION, SEVERITIES, Finding, ranked

COMMON_KEYS = ("schema_version", "kind", "findings", "counts")
CORPUS_KEYS = ("config", "domain", "general", "vocabulary_overlap_top10k", "domain_term_fragmentation",
               "general_word_fragmentation", "example_domain_terms", "planned_train_tokens", "sampled_tokens_per_document",
               "corpus_size", "near_duplicates", "contamination")
RUN_KEYS = ("path", "runs")
KINDS = ("corpus", "run", "sweep")
COLOURS = {"error": "bold red", "warning": "yellow", "info": "cyan", "ok": "green"}


def counts(findings: Iterable[Finding]) -> dict[str, int]:
    """Findings per severity, every severity present (zeros included)."""
    out = dict.fromkeys(SEVERITIES, 0)
    for f in findings:
        out[f.severity] += 1
    return out


def document(kind: str, findings: list[Finding], extra: dict[str, Any]) -> dict[str, Any]:
    """The ``doctor.json`` object: the common keys, then ``extra`` (exactly ``CORPUS_KEYS`` or ``RUN_KEYS``)."""
    if kind not in KINDS:
        raise ValueError(f"doctor.json kind={kind!r}: one of {', '.join(KINDS)}")
    expected = set(CORPUS_KEYS if kind == "corpus" else RUN_KEYS)
    if set(extra) != expected:
        raise ValueError(f"doctor.json ({kind}): keys {sorted(extra)} differ from the schema's {sorted(expected)}")
    order = ranked(list(findings))
    return {"schema_version": SCHEMA_VERSION, "kind": kind, "findings": [f.as_dict() for f in order],
            "counts": counts(order), **extra}


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def measured_vs_threshold(finding: dict[str, Any]) -> str:
    """``key measured (threshold t)`` for the keys a finding has a threshold for; else its first scalars."""
    measured, threshold = finding.get("measured") or {}, finding.get("threshold") or {}
    parts = [f"{k} {_scalar(measured[k])} (threshold {_scalar(v)})" for k, v in threshold.items()
             if k in measured and not isinstance(measured[k], (dict, list))]
    if not parts:
        parts = [f"{k} {_scalar(v)}" for k, v in measured.items() if not isinstance(v, (dict, list))][:3]
    return "; ".join(parts)


def _title(doc: dict[str, Any], width: int = 100) -> str:
    where = doc.get("path") or " ".join((doc.get("config") or {}).get("overrides") or []) or "default config"
    if len(where) > width:
        where = where[:width - 3] + "..."
    return f"dapt doctor ({doc['kind']}): {where}"


def print_report(doc: dict[str, Any], console: Any = None, *, show_ok: bool = False) -> None:
    """The ranked findings as a coloured table (severity, check, finding, measured vs threshold, overrides);
    passed checks (``ok``) are listed on one line unless ``show_ok``."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    table = Table(title=escape(_title(doc)), show_lines=False)
    for name in ("severity", "check", "finding", "measured vs threshold", "try"):
        table.add_column(name, overflow="fold")
    for f in doc["findings"]:
        if f["severity"] == "ok" and not show_ok:
            continue
        colour = COLOURS[f["severity"]]
        # findings carry overrides like remedy=[replay,l2sp]: escaped, or rich would read [replay,l2sp] as markup
        scope = f" [dim]({escape(f['scope'])})[/dim]" if f.get("scope") else ""
        table.add_row(f"[{colour}]{f['severity']}[/{colour}]", escape(f["check"]), f"{escape(f['title'])}{scope}",
                      escape(measured_vs_threshold(f)), escape("\n".join(f.get("overrides") or [])))
    if any(f["severity"] != "ok" or show_ok for f in doc["findings"]):
        console.print(table)
    passed = [f"{f['check']} ({f['scope']})" if f.get("scope") else f["check"] for f in doc["findings"] if f["severity"] == "ok"]
    if passed and not show_ok:
        console.print(f"[{COLOURS['ok']}]passed:[/{COLOURS['ok']}] " + escape(", ".join(passed)))
    c = doc["counts"]
    console.print(", ".join(f"[{COLOURS[s]}]{c[s]} {s}[/{COLOURS[s]}]" for s in SEVERITIES))


def markdown(doc: dict[str, Any]) -> str:
    """``doctor.md``: a summary line, then one section per finding, most serious first."""
    c = doc["counts"]
    overrides = (doc.get("config") or {}).get("overrides") or []
    lines = [f"# {_title(doc, 60)}", ""]
    if doc.get("path"):
        lines += [f"Diagnosed: `{doc['path']}`", ""]
    elif overrides:
        lines += ["Overrides: " + " ".join(f"`{o}`" for o in overrides), ""]
    lines += [f"schema_version {doc['schema_version']}: "
             + ", ".join(f"{c[s]} {s}" for s in SEVERITIES), "",
             "| severity | check | finding | measured vs threshold | try |", "|---|---|---|---|---|"]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    for f in doc["findings"]:
        tries = ", ".join(f"`{o}`" for o in f.get("overrides") or [])
        lines.append(f"| {f['severity']} | `{f['check']}` | {esc(f['title'])} | {esc(measured_vs_threshold(f))} | {tries} |")
    lines.append("")
    for f in doc["findings"]:
        if f["severity"] == "ok":
            continue
        lines += [f"## {f['severity']}: {esc(f['title'])}", "", f"- check: `{f['check']}`" + (f", scope: {f['scope']}" if f.get("scope") else ""),
                  f"- measured vs threshold: {esc(measured_vs_threshold(f))}", f"- why: {esc(f.get('why', ''))}"]
        if f.get("overrides"):
            lines.append(f"- try: {' '.join(f'`{o}`' for o in f['overrides'])}")
        lines.append("")
    return "\n".join(lines)


def write_report(doc: dict[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """Write ``doctor.json`` and ``doctor.md`` into ``directory`` atomically; return their paths."""
    from dapt.io import atomic_write_json, atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "doctor.json", directory / "doctor.md"
    atomic_write_json(json_path, doc)
    atomic_write_text(md_path, markdown(doc) + "\n")
    return json_path, md_path
