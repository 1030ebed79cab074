"""Cells of results tables generated from finished run folders (never typed), shared by the studies
(``dapt.study``) and the experiments' table scripts.

A job is one finished run folder (``results.json`` + ``heldout_documents.json``). Runs of a sweep or
study are scored on the same held-out documents with the same fixed masks, so two jobs compare with a
*paired* document-bootstrap CI from their per-document loss sums. Every table ends with the code and
precision that made its cells, and warns when cells were made by different code or in different precisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dapt.data.heldout import same_heldout_set
from dapt.modeling.perplexity import paired_change_ci


def read_job(folder: Path) -> dict[str, Any] | None:
    """``{"folder", "results", "docs"}`` of a finished job (``docs``: the adapted model's per-document
    sums); None when the job has no results.json (unfinished or failed)."""
    path = folder / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    docs = json.loads((folder / "heldout_documents.json").read_text())["after"]
    return {"folder": folder, "results": results, "docs": docs}


def pct(change: tuple[float, float, float] | None) -> str:
    """A relative change with its CI as ``+1.2% [+0.5, +2.0]``; a dash when unknown."""
    if change is None:
        return "—"
    value, low, high = change
    if low is None or high is None or np.isnan(low) or np.isnan(high):
        return f"{100 * value:+.1f}% [CI unknown]"
    return f"{100 * value:+.1f}% [{100 * low:+.1f}, {100 * high:+.1f}]"


def ppl_cell(results: dict[str, Any], key: str) -> str:
    """A perplexity with its 95% bootstrap CI from results.json (``<key>`` and ``<key>_ci``)."""
    low, high = results.get(f"{key}_ci") or (None, None)
    value = results.get(key)
    return f"{value:.1f} [{low:.1f}, {high:.1f}]" if value is not None and low is not None else f"{value}"


# what builds a held-out set besides its text: two runs' per-document losses pair up only if these agree
_EVAL_MASKING_KEYS = ("eval_strategy", "eval_rate", "eval_seed", "mask_fraction", "random_fraction")
_EVAL_DATA_KEYS = ("max_seq_length", "eval_sample_seed", "eval_max_doc_tokens")


def not_pairable(a: dict[str, Any], b: dict[str, Any], split: str, name: str) -> str | None:
    """Why two runs' scores on held-out set ``name`` (``split``) cannot be paired, or None when they can:
    the same set (``same_heldout_set``: the digest of its tokens and masks where both recorded one,
    else its counts, backed by the same eval masking, block size and sampling), the same precision,
    and neither run scored with an extended vocabulary."""
    ca, cb = a.get("config") or {}, b.get("config") or {}
    if any(((c.get("vocabulary") or {}).get("name") or "none") != "none" for c in (ca, cb)):
        return "an extended vocabulary"
    if (a.get("precision") or {}).get("value") != (b.get("precision") or {}).get("value"):
        return "another precision"
    data_keys = _EVAL_DATA_KEYS if name == "domain" else tuple(k for k in _EVAL_DATA_KEYS if k != "eval_max_doc_tokens")
    # general sets: not truncated since fc8ac23; older truncated ones are told apart by same_heldout_set below (digest, else counts)
    for group, keys in (("masking", _EVAL_MASKING_KEYS), ("data", data_keys)):
        if any((ca.get(group) or {}).get(k) != (cb.get(group) or {}).get(k) for k in keys):
            return f"other {group} settings for held-out sets"
    sets_a, sets_b = ((r.get("heldout_sets") or {}).get(split) or {} for r in (a, b))
    if not same_heldout_set(sets_a.get(name), sets_b.get(name)):
        return "another held-out set"
    return None


def paired_ppl(job: dict[str, Any], ref: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    """``ppl_job / ppl_ref - 1`` on held-out test set ``key`` (e.g. ``domain_ppl``) with a paired CI; None
    when the two jobs were not scored on the same documents and masked tokens, or, where both carry
    their ``results``, when those say the sets were built or scored otherwise (``not_pairable``: equal
    per-document counts do not show equal masks or equal input corruption)."""
    if "results" in job and "results" in ref and not_pairable(job["results"], ref["results"], "test", key.removesuffix("_ppl")):
        return None
    a, b = job["docs"].get(key), ref["docs"].get(key)
    if not a or not b or a["ids"] != b["ids"] or a["counts"] != b["counts"]:
        return None
    return paired_change_ci(np.asarray(a["sums"]), np.asarray(b["sums"]), np.asarray(a["counts"]))


def provenance_lines(jobs: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> str:
    """Which code made the cells (results.json ``provenance``), and a warning when it differs: cells
    computed by different code are not comparable unless the change between them altered no number."""
    codes: dict[str, list[str]] = {}
    for job in jobs:
        prov = job["results"].get("provenance") or {}
        text = (f"commit {str(prov.get('git_commit'))[:7]}{' (uncommitted changes)' if prov.get('git_dirty') else ''}, "
                f"code digest {prov.get('code_digest')}") if prov else "code not recorded (results.json without provenance)"
        codes.setdefault(text, []).append(label(job))
    if not codes:
        return "No finished job."
    lines = [f"All cells: {next(iter(codes))}." if len(codes) == 1 else
             "WARNING: cells made by different code: " + "; ".join(f"{text}: {', '.join(cells)}" for text, cells in codes.items())]
    precisions: dict[str, list[str]] = {}
    for job in jobs:  # results.json without "precision" predate trainer.precision=auto: the CPU config was 32-true then
        value = (job["results"].get("precision") or {}).get("value") or "32-true (before precision was recorded)"
        precisions.setdefault(value, []).append(label(job))
    if len(precisions) > 1:
        lines.append("WARNING: cells computed in different precisions: "
                     + "; ".join(f"{value}: {', '.join(cells)}" for value, cells in precisions.items()))
    else:
        lines.append(f"Precision: {next(iter(precisions))}.")
    if warning := general_sets_warning(jobs, label):
        lines.append(warning)
    return "\n".join(lines)


def general_sets_warning(jobs: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> str | None:
    """A warning when jobs scored their general perplexities on different general held-out sets
    (``dapt compare`` prints it too); None when they all share one, or did not record it."""
    general = _general_sets(jobs, label)
    if len(general) <= 1:
        return None
    return ("WARNING: general perplexities scored on different general held-out sets (e.g. another eval corruption, "
            "masking.mask_fraction or random_fraction; before and after WikiText's markup was removed; or truncated by "
            "data.eval_max_doc_tokens before commit fc8ac23), so not comparable across them: " + "; ".join(f"{text}: {', '.join(cells)}" for text, cells in general.items()))


def _set_text(general: dict[str, Any]) -> str:
    return ", ".join(f"{split} {g.get('documents')} documents / {g.get('tokens')} tokens / {g.get('masked_tokens')} masked"
                     + (f" / text+masks {g['digest'][:8]}" if g.get("digest") else "")
                     for split, g in general.items() if g)


def _general_sets(jobs: list[dict[str, Any]], label: Callable[[dict[str, Any]], str]) -> dict[str, list[str]]:
    """Jobs grouped by their general held-out sets (results.json ``heldout_sets``, dev and test).

    Jobs that recorded the sets' digests (tokens and masks) are grouped by them. A job from before the
    digest joins the one digest group whose documents, tokens and masked tokens it matches
    (``dapt.data.heldout.same_heldout_set``); matching none or several, it is grouped with such jobs by
    those counts alone. The grouping does not depend on the jobs' order. Arms of one study share the
    general sets while their domain sets may differ (TAPT scores each task's text), so only the
    general sets are compared; jobs that did not record them are left out."""
    digested: dict[tuple[Any, ...], tuple[dict[str, Any], list[str]]] = {}
    older: list[tuple[dict[str, Any], str]] = []
    for job in jobs:
        sets = job["results"].get("heldout_sets") or {}
        general = {split: (sets.get(split) or {}).get("general") for split in ("dev", "test")}
        if not any(general.values()):
            continue
        if all(g.get("digest") for g in general.values() if g):
            key = tuple((split, (g or {}).get("digest")) for split, g in general.items())
            digested.setdefault(key, (general, []))[1].append(label(job))
        else:
            older.append((general, label(job)))

    def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        return all(same_heldout_set(a[split], b[split]) if a[split] or b[split] else True for split in a)

    groups = {_set_text(general): labels for general, labels in digested.values()}
    by_counts: list[tuple[dict[str, Any], list[str]]] = []
    for general, name in older:
        matches = [labels for first, labels in digested.values() if same(general, first)]
        if len(matches) == 1:
            matches[0].append(name)
            continue
        for first, labels in by_counts:
            if same(general, first):
                labels.append(name)
                break
        else:
            by_counts.append((general, [name]))
    groups.update({_set_text(general): labels for general, labels in by_counts})
    return groups


def missing_line(missing: list[Path]) -> str:
    """The line that lists a table's unfinished jobs (never filled in)."""
    return "Not finished (no results.json): " + ", ".join(str(m) for m in missing)
