"""``dapt doctor``: diagnose a DAPT setup before training (corpus, tokenizer, domain shift)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _compose(overrides: list[str]) -> Any:
    from dapt.config import compose_config

    return compose_config([*overrides, "paths.output_dir=."])


def diagnose(overrides: list[str], max_documents: int = 2000) -> dict[str, Any]:
    """Profile the configured domain corpus against general text; return findings + warnings."""
    from dapt.data.sources import as_source, iter_documents
    from dapt.diagnostics.corpus import domain_terms, fragmentation, profile, vocabulary_overlap
    from dapt.modeling.loading import load_tokenizer
    from dapt.pipeline.run_config import general_sources

    cfg = _compose(overrides)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.source)
    data_dir = str(cfg.paths.data_dir)
    domain_sources = [as_source(s) for s in cfg.data.train]
    domain = profile(iter_documents(domain_sources, data_dir), tokenizer, max_documents=max_documents)
    general = profile(iter_documents(general_sources(cfg), data_dir), tokenizer, max_documents=max_documents)
    # An empty sample overlaps nothing: without this check it reads as "a real domain shift".
    for what, key, sample, sources in (("domain", "data.train", domain, domain_sources), ("general", "base_prep.data", general, general_sources(cfg))):
        if sample.documents == 0 or sample.tokens == 0:
            from dapt.errors import DataError

            raise DataError(f"{key}: the {what} corpus is empty (no text in {', '.join(str(s.path) for s in sources) or 'no source'}); nothing to diagnose")
    terms = domain_terms(domain, general)
    report: dict[str, Any] = {
        "domain": domain.as_dict(),
        "general": general.as_dict(),
        "vocabulary_overlap_top10k": vocabulary_overlap(domain, general),
        "domain_term_fragmentation": fragmentation(terms, tokenizer),
        "general_word_fragmentation": fragmentation(general.top_words[:200], tokenizer),
        "example_domain_terms": terms[:15],
    }
    steps = int(cfg.trainer.max_steps)
    tokens_per_step = int(cfg.data.batch_size) * int(cfg.data.max_seq_length)
    per_doc = domain.tokens / max(domain.documents, 1)
    report["planned_train_tokens"] = steps * tokens_per_step
    report["sampled_tokens_per_document"] = per_doc
    warnings: list[str] = []
    if domain.duplicate_documents > 0.05:
        warnings.append(f"{domain.duplicate_documents:.0%} of sampled domain documents are exact duplicates: deduplicate")
    if domain.non_alpha_share > 0.3:
        warnings.append(f"{domain.non_alpha_share:.0%} of characters are not letters/spaces: PDF or table debris?")
    if domain.replacement_chars:
        warnings.append(f"{domain.replacement_chars} undecodable characters replaced in the sample: check encodings")
    if report["vocabulary_overlap_top10k"] > 0.8:
        warnings.append("domain vocabulary overlaps general text by >80%: expect small DAPT gains")
    if report["domain_term_fragmentation"] > 2.5:
        warnings.append(
            f"domain terms split into {report['domain_term_fragmentation']:.1f} sub-tokens on average: consider "
            "vocabulary extension or a domain-vocabulary model (e.g. model=pubmedbert)"
        )
    report["warnings"] = warnings
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dapt doctor", description=__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for dapt train (e.g. data=cs)")
    parser.add_argument("--max-documents", type=int, default=2000, help="documents sampled per corpus")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = diagnose(args.overrides, args.max_documents)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dapt doctor: domain vs general corpus (sampled)")
    table.add_column("statistic")
    table.add_column("domain", justify="right")
    table.add_column("general", justify="right")
    for key, spec in (("documents", ",d"), ("words", ",d"), ("tokens", ",d"), ("tokens_per_word", ".2f"),
                      ("duplicate_documents", ".1%"), ("short_documents", ".1%"), ("non_alpha_share", ".1%")):
        table.add_row(key.replace("_", " "), format(report["domain"][key], spec), format(report["general"][key], spec))
    console = Console()
    console.print(table)
    console.print(f"top-10K vocabulary overlap: {report['vocabulary_overlap_top10k']:.1%} (low overlap = a real domain shift)")
    console.print(
        f"sub-tokens per word: domain terms {report['domain_term_fragmentation']:.2f} vs common general words "
        f"{report['general_word_fragmentation']:.2f} (e.g. {', '.join(report['example_domain_terms'][:8])})"
    )
    console.print(f"planned training tokens: {report['planned_train_tokens']:,}")
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if not report["warnings"]:
        console.print("no warnings")
    return 0
