"""``dapt doctor``: a ranked diagnosis of a DAPT setup (before training) or of a finished run or sweep.

``dapt doctor [overrides...]`` samples the configured domain corpus (and general text) and checks it:
size and planned epochs, exact and near-duplicates, noise, undecodable bytes, vocabulary overlap,
tokenizer fragmentation, and contamination of the configured tasks' dev/test text. ``--json`` prints
doctor.json to stdout, ``--out DIR`` writes doctor.json + doctor.md there.

Contamination streams the whole training corpus (every ``data.train`` source, and the cached selection
when ``selection`` is configured), not the sample; ``--contamination-documents`` caps it (a capped
clean result is ``info``, never ``ok``).

``dapt doctor <run or sweep dir>`` diagnoses finished runs (``dapt.reporting.diagnosis``; ``--probe-terms``
adds the masked-word probe of domain terms), writes doctor.json + doctor.md into that directory and, for
a run logged to W&B online (``WANDB_API_KEY`` set), adds the finding counts and the top finding to the
W&B run's summary. Offline W&B runs are left untouched (wandb cannot resume an offline run): their
findings are in doctor.json. doctor.json's schema: ``dapt.diagnostics.report``.
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


def _estimated_documents(sources: list[Any], data_dir: str, sample: Any) -> int | None:
    """About how many documents ``sources`` hold: their file bytes / the sample's bytes per document
    (None for a hub source, which has no cheap size)."""
    from dapt.data.sources import source_size

    sizes = [source_size(s, data_dir) for s in sources]
    if any(size is None for size in sizes) or not sample.documents:
        return None
    return int(sum(sizes) / max(sample.bytes / sample.documents, 1.0))  # type: ignore[arg-type]


def _selected_corpus(cfg: Any, sources: list[Any], data_dir: str) -> tuple[Any, Any, int | None]:
    """(the cached selection as a source, or None; an ``info`` finding when it cannot be checked, or None;
    its documents, or None when not built).

    With ``selection`` configured the training data is the selection. It is checked only when its
    cache file already exists: ``dapt doctor`` does not build it (minutes with an encoder)."""
    from dapt.config import to_dataclass
    from dapt.data.sources import as_source
    from dapt.diagnostics.findings import Finding
    from dapt.evaluation.tasks import resolve_task
    from dapt.pipeline.selection import SELECTIONS_DIR, SelectionConfig, _cached, selection_cache_key

    sel = cfg.get("selection") or {}
    if str(sel.get("method", "none")) == "none":
        return None, None, None
    scope = "selection"
    try:
        scfg = to_dataclass(SelectionConfig, sel, prefix="selection")
        key = selection_cache_key(scfg, sources, data_dir, resolve_task(scfg.task))
        out_path = Path(str(cfg.paths.cache_dir)).expanduser() / SELECTIONS_DIR / f"{key}.jsonl"
        meta = _cached(out_path.with_suffix(".json"), out_path)
    except Exception as exc:  # noqa: BLE001 - the corpus check above stands; say why this one did not run
        return None, Finding("corpus.contamination", "info",
                             f"selection.method={sel.get('method')}: the selection's cache could not be located ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); the selected corpus was not checked (it is a subset "
                             "of data.train, which was)", {}, {}, "", [], scope), None
    if meta is None:
        return None, Finding("corpus.contamination", "info",
                             f"selection.method={sel.get('method')}: the selection is not built yet (no intact cache at {out_path}), so "
                             "the selected training corpus was not checked separately (it is a subset of data.train, which was)",
                             {"selection_path": str(out_path)}, {}, "", [], scope), None
    return as_source({"type": "jsonl", "path": str(out_path.resolve()), "text_field": "text"}), None, int(meta["documents"])


def diagnose(overrides: list[str], max_documents: int = 2000, *, near_duplicate_threshold: float = 0.8,
             contamination_documents: int | None = None) -> dict[str, Any]:
    """Diagnose the configured domain corpus against general text and the configured tasks; return
    the ``doctor.json`` object (``kind: "corpus"``).

    The sample statistics read ``max_documents`` documents; contamination streams the whole training
    corpus (every ``data.train`` source, and the cached selection when ``selection`` is configured),
    unless ``contamination_documents`` caps it (a capped clean check is ``info``, never ``ok``)."""
    from dapt.data.sources import as_source, iter_documents
    from dapt.diagnostics.contamination import contamination_finding, matched_ngrams, split_overlap, task_ngrams
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
    selected, selection_note, selected_documents = _selected_corpus(cfg, domain_sources, data_dir)
    if str((cfg.get("selection") or {}).get("method", "none")) != "none":
        # The training corpus is the selection, not data.train: passes are over selection.size documents.
        n_selected = selected_documents if selected_documents is not None else int(cfg.selection.size)
        per_doc = domain.tokens / max(domain.documents, 1)
        corpus_tokens, estimated = per_doc * n_selected, True
        method = (f"estimate: the selection's {n_selected:,} documents ("
                  + ("cached selection" if selected_documents is not None else "selection.size; not built yet")
                  + f") x the sample's {per_doc:,.0f} tokens per document: training reads the selection, not data.train")
    else:
        corpus_tokens, estimated, method = _corpus_tokens(domain_sources, data_dir, domain)
    size = size_findings(domain, plan, corpus_tokens=corpus_tokens, estimated=estimated, method=method)
    findings += size

    dups = near_duplicates(sample, threshold=near_duplicate_threshold)
    findings.append(near_duplicate_finding(dups, sample_capped=domain.capped))

    task_texts, notes = _task_texts(cfg, data_dir)
    findings += notes
    contamination: dict[str, dict[str, Any]] = {}
    if task_texts:
        corpora = [("data.train", "the adaptation corpus", "", domain_sources)]
        if selection_note is not None:
            findings.append(selection_note)
        if selected is not None:
            corpora.append(("selection", "the selected training corpus (selection)", " (selection)", [selected]))
        task_side = task_ngrams(t for splits in task_texts.values() for texts in splits.values() for t in texts)
        for key, corpus_name, suffix, sources in corpora:
            scan = matched_ngrams(iter_documents(sources, data_dir), task_side, max_documents=contamination_documents)
            capped = None
            if scan.capped:
                total = _estimated_documents(sources, data_dir, domain)
                capped = f"checked {scan.documents:,} of ~{total:,} documents" if total else f"checked the first {scan.documents:,} documents"
            coverage = {"corpus": key, "documents_checked": scan.documents, "capped": scan.capped}
            for task, splits in task_texts.items():
                for split, texts in splits.items():
                    result = split_overlap(scan.matched, texts)
                    if key == "data.train":
                        contamination.setdefault(task, {})[split] = {**result.as_dict(), **coverage}
                    findings.append(contamination_finding(task, split, result, capped=capped, corpus=corpus_name,
                                                          scope_suffix=suffix, measured_extra=coverage))

    extra = {
        "config": {"overrides": list(overrides), "max_documents": max_documents, "contamination_documents": contamination_documents,
                   "data": str(cfg.data.get("name", "")),
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


def diagnose_directory(path: Path, *, probe_documents: int | None = None) -> dict[str, Any]:
    """The ``doctor.json`` object of a finished run or sweep directory (``dapt.reporting.diagnosis``).

    ``probe_documents`` (``--probe-terms``): for a single run, add ``probe_term_accuracy`` on that many
    dev documents (it loads the start and the adapted model)."""
    from dapt.diagnostics.findings import Finding, ranked
    from dapt.diagnostics.report import document
    from dapt.reporting.diagnosis import diagnose_path

    result = diagnose_path(path)
    findings = [f if isinstance(f, Finding) else Finding(**f) for f in result["findings"]]
    if probe_documents is not None:
        if result["kind"] == "run":
            from dapt.reporting.diagnosis import probe_term_accuracy

            findings = ranked([*findings, probe_term_accuracy(path, max_documents=probe_documents)])
        else:
            log.warning("--probe-terms applies to a single run directory; %s is a sweep, not probed", path)
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


OFFLINE_NOTE = ("W&B: the run is offline; doctor findings are in doctor.json (doctor/* keys not added to the offline run: "
                "wandb cannot resume offline runs)")


def update_wandb(run_dir: Path, doc: dict[str, Any]) -> str:
    """Add ``wandb_summary(doc)`` to the run's W&B summary; return what was done (one line, also logged).

    Only an online run (a ``wandb/run-*`` folder) is updated: it is resumed online (``wandb.init(id=...,
    resume="allow")``) when ``WANDB_API_KEY`` is set; without it nothing is sent and the note says so.
    An offline run is never touched: wandb cannot resume an offline run (0.31 starts a second offline
    run with the same id, and syncing a second folder with the same id can replace the first run's data
    on the server, wandb issues #3841/#5865), so the findings stay in doctor.json and the note says so.
    """
    import os

    from dapt.pipeline.resume import WANDB_ID_FILE
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    online = sorted(run_dir.glob("wandb/run-*"))
    if not online:
        if offline_runs(run_dir):
            return note(OFFLINE_NOTE)
        return note(f"W&B: no W&B run under {run_dir}; summary not updated")
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:  # wandb's folder name: run-<YYYYMMDD_HHMMSS>-<id>
        run_id = online[-1].name.split("-", 2)[-1] if online[-1].name.count("-") >= 2 else ""
    if not run_id:
        return note(f"W&B: no run id found under {run_dir}; summary not updated")
    project, entity = "dapt", None
    for path in sorted(online[-1].glob("run-*.wandb")):  # an online run's local transaction log has its project
        try:
            first = read_offline_run(path)
            project, entity = first.project or project, first.entity or None
        except Exception as exc:  # noqa: BLE001 - a torn file: keep the defaults
            log.debug("could not read %s: %s", path, exc)
    if not os.environ.get("WANDB_API_KEY"):
        return note(f"W&B: run {run_id} was logged online and WANDB_API_KEY is not set; summary not updated "
                    "(doctor.json has the findings)")
    try:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(id=run_id, project=project, entity=entity, dir=str(run_dir), mode="online", resume="allow", reinit="finish_previous")
        run.summary.update(wandb_summary(doc))
        run.finish()
    except Exception as exc:  # noqa: BLE001 - W&B must never fail a diagnosis that is already written
        return note(f"W&B: could not update run {run_id} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "doctor.json has the findings")
    return note(f"W&B: added doctor/* to the summary of online run {run_id}")


def update_sweep_wandb(doc: dict[str, Any]) -> list[str]:
    """Each sweep job's (online) W&B summary gets the findings scoped to that job (``scope`` = its folder
    relative to the sweep folder, as ``dapt.reporting.diagnosis.diagnose_sweep`` scopes run checks);
    sweep-level findings stay in doctor.json."""
    from dapt.diagnostics.report import document

    sweep_dir = Path(doc["path"]) if doc.get("path") else None
    notes = []
    for run in doc.get("runs") or []:
        run_dir = Path(run["path"] if isinstance(run, dict) else run)
        try:
            scope = run_dir.relative_to(sweep_dir).as_posix() if sweep_dir is not None else run_dir.name
        except ValueError:
            scope = run_dir.name
        own = [f for f in doc["findings"] if f.get("scope") in (scope, str(Path(scope)))]
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
    parser.add_argument("--contamination-documents", type=int, default=None,
                        help="stream at most this many training documents for the contamination check (default: all)")
    parser.add_argument("--probe-terms", action="store_true",
                        help="run mode: also probe masked-word accuracy on domain terms, start vs adapted model (loads both)")
    parser.add_argument("--probe-documents", type=int, default=100, help="dev documents the --probe-terms check reads (default 100)")
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
        doc = diagnose_directory(path, probe_documents=args.probe_documents if args.probe_terms else None)
        json_path, md_path = write_report(doc, path)
        notes.append(f"wrote {json_path} and {md_path}")
        if doc["kind"] == "run" and not args.no_wandb:
            notes.append(update_wandb(path, doc))
        elif doc["kind"] == "sweep" and not args.no_wandb:
            notes += update_sweep_wandb(doc)
    else:
        doc = diagnose(args.overrides, args.max_documents, near_duplicate_threshold=args.near_duplicate_threshold,
                       contamination_documents=args.contamination_documents)
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
