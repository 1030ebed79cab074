"""``dapt doctor``: a ranked diagnosis of a DAPT setup (before training) or of a finished run or sweep.

``dapt doctor [overrides...]`` samples the configured domain corpus (and general text) and checks it:
size and planned epochs, exact and near-duplicates, noise, undecodable bytes, vocabulary overlap,
tokenizer fragmentation, and contamination of the configured tasks' dev/test text. ``--json`` prints
doctor.json to stdout, ``--out DIR`` writes doctor.json + doctor.md there.

``dapt doctor <run or sweep dir>`` diagnoses finished runs (``dapt.reporting.diagnosis``), writes
doctor.json + doctor.md into that directory and, for a run logged to W&B, adds the finding counts and
the top finding to the W&B run's summary. doctor.json's schema: ``dapt.diagnostics.report``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STREAM_COUNT_BYTES = 64 * 2**20  # stream the whole corpus to count its text when its files are at most this big


def _compose(overrides: list[str]) -> Any:
    from dapt.config import compose_config

    return compose_config([*overrides, "paths.output_dir=."])


def _task_texts(cfg: Any, data_dir: str) -> tuple[dict[str, dict[str, list[str]]], list[Any]]:
    """Each configured task's dev and test texts (NER sentences joined by spaces); unreadable tasks
    become ``info`` findings (preflight refuses them before training anyway)."""
    from dapt.diagnostics.findings import Finding
    from dapt.errors import DaptError
    from dapt.evaluation.tasks import load_task, resolve_task

    texts: dict[str, dict[str, list[str]]] = {}
    notes: list[Any] = []
    for spec in list(cfg.get("tasks") or []):
        try:
            task = resolve_task(spec)
            data = load_task(task, data_dir)
        except DaptError as exc:
            name = spec if isinstance(spec, str) else str(spec.get("name", "?"))
            notes.append(Finding("corpus.contamination", "info", f"task {name}: not read, contamination not checked ({exc})",
                                 {}, {}, "", [], f"task {name}"))
            continue

        def text(ex: Any) -> str:
            return " ".join(ex.tokens) if task.type == "ner" else ex.text

        texts[task.name] = {"dev": [text(e) for e in data.dev], "test": [text(e) for e in data.test]}
    return texts, notes


def _sample(sources: list[Any], data_dir: str, n: int) -> list[str]:
    """Up to ``n`` documents, taken round-robin from the sources (each source is represented, not only
    the first: biomed's OHSUMED alone fills a 2,000-document sample read in order)."""
    from dapt.data.sources import iter_documents

    streams = [iter_documents(s, data_dir) for s in sources]
    out: list[str] = []
    while streams and len(out) < n:
        for stream in list(streams):
            doc = next(stream, None)
            if doc is None:
                streams.remove(stream)
            elif len(out) < n:
                out.append(doc)
    return out


def _corpus_tokens(sources: list[Any], data_dir: str, sample: Any) -> tuple[float, bool, str]:
    """(tokens, estimated?, method) of the whole domain corpus, from the sample's tokens per byte."""
    from dapt.data.sources import iter_documents, source_size

    if not sample.capped:
        return float(sample.tokens), False, "the sample is the whole corpus (tokenized)"
    per_byte = sample.tokens / max(sample.bytes, 1)
    sizes = [source_size(s, data_dir) for s in sources]
    if any(size is None for size in sizes):
        return float(sample.tokens), True, ("at least the sample's tokens: a hub (hf) source has no cheap size, so "
                                            "planned epochs are an upper bound")
    file_bytes = float(sum(sizes))  # type: ignore[arg-type]
    if file_bytes <= STREAM_COUNT_BYTES:
        text_bytes = sum(len(doc.encode("utf-8", "replace")) for doc in iter_documents(sources, data_dir))
        return text_bytes * per_byte, True, (f"estimate: the whole corpus's {text_bytes:,} text bytes (streamed) x the sample's "
                                             f"{per_byte:.3f} tokens per byte")
    return file_bytes * per_byte, True, (f"estimate: {file_bytes:,.0f} file bytes x the sample's {per_byte:.3f} tokens per byte "
                                         "(file bytes include markup and metadata: planned epochs are a lower bound)")


def diagnose(overrides: list[str], max_documents: int = 2000, *, near_duplicate_threshold: float = 0.8) -> dict[str, Any]:
    """Diagnose the configured domain corpus against general text and the configured tasks; return
    the ``doctor.json`` object (``kind: "corpus"``)."""
    from dapt.data.sources import as_source, iter_documents
    from dapt.diagnostics.contamination import contamination_finding, corpus_ngrams, split_overlap
    from dapt.diagnostics.corpus import check_sample, domain_terms, fragmentation, planned_tokens, profile, profile_findings, size_findings, vocabulary_overlap
    from dapt.diagnostics.near_duplicates import near_duplicate_finding, near_duplicates
    from dapt.diagnostics.report import document
    from dapt.modeling.loading import load_tokenizer
    from dapt.pipeline.run_config import general_sources

    cfg = _compose(overrides)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.source)
    data_dir = str(cfg.paths.data_dir)
    domain_sources = [as_source(s) for s in cfg.data.train]
    # One bounded sample of domain documents (one more than max_documents: tells a capped sample apart)
    # feeds every check, so they all describe the same documents.
    sample = _sample(domain_sources, data_dir, max_documents + 1)
    domain = profile(sample, tokenizer, max_documents=max_documents)
    sample = sample[:max_documents]
    check_sample(domain, what="domain", key="data.train", where=", ".join(str(s.path) for s in domain_sources))
    general = profile(iter_documents(general_sources(cfg), data_dir), tokenizer, max_documents=max_documents)
    check_sample(general, what="general", key="base_prep.data", where=", ".join(str(s.path) for s in general_sources(cfg)))

    terms = domain_terms(domain, general)
    overlap = vocabulary_overlap(domain, general)
    domain_frag, general_frag = fragmentation(terms, tokenizer), fragmentation(general.top_words[:200], tokenizer)
    findings = profile_findings(domain, overlap=overlap, domain_fragmentation=domain_frag, general_fragmentation=general_frag)

    plan = planned_tokens(cfg)
    corpus_tokens, estimated, method = _corpus_tokens(domain_sources, data_dir, domain)
    size = size_findings(domain, plan, corpus_tokens=corpus_tokens, estimated=estimated, method=method)
    findings += size

    dups = near_duplicates(sample, threshold=near_duplicate_threshold)
    findings.append(near_duplicate_finding(dups))

    task_texts, notes = _task_texts(cfg, data_dir)
    findings += notes
    contamination: dict[str, dict[str, Any]] = {}
    if task_texts:
        grams = corpus_ngrams(sample)
        for task, splits in task_texts.items():
            for split, texts in splits.items():
                result = split_overlap(grams, texts)
                contamination.setdefault(task, {})[split] = result.as_dict()
                findings.append(contamination_finding(task, split, result))

    extra = {
        "config": {"overrides": list(overrides), "max_documents": max_documents, "data": str(cfg.data.get("name", "")),
                   "tasks": list(task_texts)},
        "domain": domain.as_dict(),
        "general": general.as_dict(),
        "vocabulary_overlap_top10k": overlap,
        "domain_term_fragmentation": domain_frag,
        "general_word_fragmentation": general_frag,
        "example_domain_terms": terms[:15],
        "planned_train_tokens": plan["planned_tokens"],
        "sampled_tokens_per_document": domain.tokens / max(domain.documents, 1),
        "corpus_size": size[0].measured,
        "near_duplicates": dups.as_dict(),
        "contamination": contamination,
    }
    return document("corpus", findings, extra)


def diagnose_directory(path: Path) -> dict[str, Any]:
    """The ``doctor.json`` object of a finished run or sweep directory (``dapt.reporting.diagnosis``)."""
    from dapt.diagnostics.findings import Finding
    from dapt.diagnostics.report import document
    from dapt.reporting.diagnosis import diagnose_path

    result = diagnose_path(path)
    findings = [f if isinstance(f, Finding) else Finding(**f) for f in result["findings"]]
    return document(result["kind"], findings, {"path": str(result.get("path", path)), "runs": result.get("runs", [])})


def wandb_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """The keys ``dapt doctor`` adds to a run's W&B summary: counts per severity and the top finding."""
    top = doc["findings"][0] if doc["findings"] else None
    out: dict[str, Any] = {f"doctor/{severity}": n for severity, n in doc["counts"].items()}
    out["doctor/schema_version"] = doc["schema_version"]
    out["doctor/top_check"] = top["check"] if top else ""
    out["doctor/top_severity"] = top["severity"] if top else ""
    out["doctor/top_title"] = top["title"] if top else ""
    return out


def update_wandb(run_dir: Path, doc: dict[str, Any]) -> str:
    """Add ``wandb_summary(doc)`` to the run's W&B summary; return what was done (one line, also logged).

    An offline run is resumed offline under the run directory (``wandb.init(id=..., dir=run_dir,
    mode="offline", resume="allow")``): a second ``wandb/offline-run-*-<id>`` folder holding only the
    summary update, uploaded into the same W&B run by ``wandb sync``. An online run is resumed online
    only when ``WANDB_API_KEY`` is set; without it nothing is sent and the note says so.
    """
    import os

    from dapt.pipeline.resume import WANDB_ID_FILE
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    offline = offline_runs(run_dir)
    id_file = run_dir / WANDB_ID_FILE
    online = sorted(run_dir.glob("wandb/run-*"))
    if not offline and not online:
        return note(f"W&B: no W&B run under {run_dir}; summary not updated")
    project, entity, run_id, mode = "dapt", None, "", "offline"
    if offline:
        try:
            first = read_offline_run(offline[0])
            run_id, project, entity = first.run_id, first.project or project, first.entity or None
        except Exception as exc:  # noqa: BLE001 - a torn file: fall back to the id file
            log.debug("could not read %s: %s", offline[0], exc)
    else:
        mode = "online"
    if not run_id and id_file.is_file():
        run_id = id_file.read_text().strip()
    if not run_id:
        return note(f"W&B: no run id found under {run_dir}; summary not updated")
    if mode == "online" and not os.environ.get("WANDB_API_KEY"):
        return note(f"W&B: run {run_id} was logged online and WANDB_API_KEY is not set; summary not updated "
                    "(doctor.json has the findings)")
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(id=run_id, project=project, entity=entity, dir=str(run_dir), mode=mode, resume="allow",
                         reinit="finish_previous")
        run.summary.update(wandb_summary(doc))
        run.finish()
    except Exception as exc:  # noqa: BLE001 - W&B must never fail a diagnosis that is already written
        return note(f"W&B: could not update run {run_id} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "doctor.json has the findings")
    return note(f"W&B: added doctor/* to the summary of {mode} run {run_id}"
                + (" (upload with wandb sync)" if mode == "offline" else ""))


def update_sweep_wandb(doc: dict[str, Any]) -> list[str]:
    """Each sweep job's W&B summary gets the findings scoped to that job (``scope`` = its folder's name,
    as ``dapt.reporting.diagnosis`` scopes run checks); sweep-level findings stay in doctor.json."""
    from dapt.diagnostics.report import document

    notes = []
    for run in doc.get("runs") or []:
        run_dir = Path(run["path"] if isinstance(run, dict) else run)
        own = [f for f in doc["findings"] if f.get("scope") == run_dir.name]
        if not own or not run_dir.is_dir():
            continue
        from dapt.diagnostics.findings import Finding

        notes.append(update_wandb(run_dir, document("run", [Finding(**f) for f in own], {"path": str(run_dir), "runs": [str(run_dir)]})))
    return notes or ["W&B: no sweep job has findings of its own; summaries not updated"]


def note(message: str) -> str:
    log.info(message)
    return message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dapt doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides, as for dapt train (e.g. data=cs); or one finished run / sweep directory")
    parser.add_argument("--max-documents", type=int, default=2000, help="documents sampled per corpus")
    parser.add_argument("--near-duplicate-threshold", type=float, default=0.8, help="MinHash Jaccard threshold (default 0.8)")
    parser.add_argument("--json", action="store_true", help="print doctor.json to stdout instead of the table")
    parser.add_argument("--out", type=Path, default=None, help="write doctor.json and doctor.md into this directory (corpus mode)")
    parser.add_argument("--no-wandb", action="store_true", help="run/sweep mode: do not touch the W&B run")
    args = parser.parse_args(argv)
    from rich.console import Console

    from dapt.diagnostics.report import print_report, write_report
    from dapt.errors import ConfigError

    dirs = [p for p in args.overrides if Path(p).is_dir()]
    notes: list[str] = []
    if dirs:
        if len(args.overrides) != 1:
            raise ConfigError(f"dapt doctor {' '.join(args.overrides)}: pass one run or sweep directory alone, "
                              "or Hydra overrides without a directory")
        path = Path(dirs[0]).resolve()
        doc = diagnose_directory(path)
        json_path, md_path = write_report(doc, path)
        notes.append(f"wrote {json_path} and {md_path}")
        if doc["kind"] == "run" and not args.no_wandb:
            notes.append(update_wandb(path, doc))
        elif doc["kind"] == "sweep" and not args.no_wandb:
            notes += update_sweep_wandb(doc)
    else:
        doc = diagnose(args.overrides, args.max_documents, near_duplicate_threshold=args.near_duplicate_threshold)
        if args.out is not None:
            json_path, md_path = write_report(doc, args.out)
            notes.append(f"wrote {json_path} and {md_path}")
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    console = Console()
    print_report(doc, console)
    for line in notes:
        console.print(f"[dim]{line}[/dim]")
    return 0
