"""``dapt masking-stats``: compute and cache the PMI n-gram vocabulary and the salient-term list.

A run with ``masking=pmi`` or ``masking=salient`` computes these lazily at start-up; running this
first (e.g. before a sweep) does the work once and shows what the strategies will mask. By default
it composes the same Hydra config as ``dapt train`` with the same overrides, so the documents, the
tokenizer, the parameters and the cache folder are exactly those of the run, and the run then finds
the statistics in its cache:

    dapt masking-stats                               # default data (biomed), both kinds
    dapt masking-stats data=cs masking=pmi masking.min_count=5
    dapt masking-stats --domain my_corpus.jsonl --general wiki.jsonl --out stats/   # any files

``--out DIR`` also writes the files there, for ``masking.stats_path=DIR/<kind>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from dapt.errors import DaptError

KINDS = ("pmi", "salient")


@dataclass
class _Setup:
    tokenizer_source: str
    masking: dict[str, Any]
    domain: Callable[[], Iterable[str]]
    general: Callable[[], Iterable[str]] | None
    cache_dir: str | None
    described: str


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dapt masking-stats",
        description="Compute and cache the PMI n-gram vocabulary and the salient-term list for masking=pmi / masking=salient.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as for `dapt train` (data=cs, masking=pmi, masking.min_count=5, ...)")
    parser.add_argument("--kind", choices=(*KINDS, "all"), default=None,
                        help="which statistics (default: the kind named by a masking= override, else all)")
    parser.add_argument("--domain", nargs="+", metavar="PATH", help="domain corpus files/folders (.jsonl 'text' field, .txt files, .parquet 'text' column) instead of the config's data.train")
    parser.add_argument("--general", nargs="+", metavar="PATH", help="general corpus (for salient) instead of the config's base data")
    parser.add_argument("--tokenizer", help="tokenizer source (hub id, path or package:NAME) instead of the config's model")
    parser.add_argument("--cache-dir", help="masking cache folder (default: <paths.cache_dir>/masking, as dapt train)")
    parser.add_argument("--out", metavar="DIR", help="also copy the statistics to DIR/<kind>.json (for masking.stats_path)")
    parser.add_argument("--top", type=int, default=15, help="entries to print per list")
    return parser


def _compose(overrides: list[str]) -> Any:
    from dapt.config import compose_config

    return compose_config(overrides)


def path_sources(paths: list[str]) -> list[Any]:
    """``SourceConfig``s for files/folders named on the command line, read by the data layer's reader.

    ``.jsonl`` (``text`` field), ``.txt`` (one document per file) and ``.parquet`` (``text`` column)
    files; a folder becomes one source per such kind of file it holds. Paths are taken relative to
    the working directory, not ``paths.data_dir``.
    """
    from dapt.data.sources import SourceConfig
    from dapt.errors import ConfigError, DataError

    kinds = {".jsonl": {"type": "jsonl"}, ".txt": {"type": "text", "split_by": "file"}, ".parquet": {"type": "parquet"}}
    sources = []
    for raw in paths:
        path = Path(raw).expanduser().absolute()
        if path.is_dir():
            found = [suffix for suffix in kinds if any(p.is_file() for p in path.rglob(f"*{suffix}"))]
            if not found:
                raise DataError(f"corpus folder has no {' / '.join(kinds)} files: {path}")
            sources += [SourceConfig(path=str(path), glob=f"*{suffix}", **kinds[suffix]) for suffix in found]
        elif path.suffix in kinds:
            sources.append(SourceConfig(path=str(path), **kinds[path.suffix]))
        elif not path.exists():
            raise DataError(f"corpus path does not exist: {path}")
        else:
            raise ConfigError(f"{path}: not a {' / '.join(kinds)} file or a folder of them")
    return sources


def _setup(args: argparse.Namespace, kind: str) -> _Setup:
    from omegaconf import OmegaConf

    from dapt.data.sources import as_source, iter_documents

    overrides = [o for o in args.overrides if not o.startswith(("masking=", "+masking="))] + [f"masking={kind}"]
    try:
        cfg = _compose(overrides)
    except DaptError:
        raise
    except Exception as exc:  # Hydra's own errors (unknown group option, bad key) as one line
        from dapt.errors import ConfigError

        raise ConfigError(f"masking-stats: {str(exc).splitlines()[0]}") from exc
    masking = OmegaConf.to_container(cfg.masking, resolve=True)
    data_dir = str(cfg.paths.data_dir)
    described = []
    # Every corpus is read by dapt.data.sources (the reader and quality filters of training), so the
    # statistics see exactly the documents a run's MaskingContext would pass.
    if args.domain:
        sources = path_sources(list(args.domain))
        described.append(f"domain: {' '.join(args.domain)}")
    else:
        sources = [as_source(s) for s in cfg.data.train if s]
        described.append(f"domain: data={cfg.data.name} ({', '.join(s.path for s in sources)})")
    domain = lambda: iter_documents(sources, data_dir)  # noqa: E731
    general = None
    if kind == "salient":
        if args.general:
            gsources = path_sources(list(args.general))
            described.append(f"general: {' '.join(args.general)}")
        else:
            from dapt.pipeline.run_config import general_sources

            gsources = general_sources(cfg)
            described.append(f"general: {', '.join(s.path for s in gsources)}")
        general = lambda: iter_documents(gsources, data_dir)  # noqa: E731
    cache_dir = args.cache_dir or str(Path(str(cfg.paths.cache_dir)).expanduser() / "masking")
    tokenizer_source = args.tokenizer or cfg.model.get("tokenizer") or cfg.model.source
    return _Setup(tokenizer_source=str(tokenizer_source), masking=masking, domain=domain, general=general,
                  cache_dir=cache_dir, described="; ".join(described))


def _kinds(args: argparse.Namespace) -> list[str]:
    if args.kind and args.kind != "all":
        return [args.kind]
    if args.kind is None:
        named = [o.split("=", 1)[1] for o in args.overrides if o.startswith(("masking=", "+masking="))]
        if named:
            if named[-1] not in KINDS:
                from dapt.errors import ConfigError

                raise ConfigError(f"masking={named[-1]} has no corpus statistics; masking-stats is for {' / '.join(KINDS)}")
            return [named[-1]]
    return list(KINDS)


def _run_kind(args: argparse.Namespace, kind: str, out: Any) -> None:
    from dapt.config import to_dataclass
    from dapt.masking.base import MaskingContext, strategy_class
    from dapt.modeling.loading import load_tokenizer

    setup = _setup(args, kind)
    tokenizer = load_tokenizer(setup.tokenizer_source)
    config = to_dataclass(strategy_class(kind).config_class, setup.masking, prefix="masking")
    context = MaskingContext(tokenizer=tokenizer, domain_documents=setup.domain,
                             general_documents=setup.general, cache_dir=setup.cache_dir)
    started = time.perf_counter()
    if kind == "pmi":
        from dapt.masking.pmi import compute_ngram_vocabulary

        data, path = compute_ngram_vocabulary(config, context)
    else:
        from dapt.masking.salient import compute_salient_terms

        data, path = compute_salient_terms(config, context)
    seconds = time.perf_counter() - started
    print(f"== {kind}: {len(data['entries'])} entries in {seconds:.1f}s (tokenizer {setup.tokenizer_source}; {setup.described})", file=out)
    print(f"   params {json.dumps(data['params'], sort_keys=True)}; documents {data['n_documents']}", file=out)
    print(f"   cache  {path}", file=out)
    _print_entries(kind, data, args.top, out)
    if args.out:
        target = Path(args.out).expanduser()
        target.mkdir(parents=True, exist_ok=True)
        dest = target / f"{kind}.json"
        shutil.copyfile(path, dest)
        print(f"   copy   {dest}   (use: masking={kind} masking.stats_path={dest})", file=out)


def _print_entries(kind: str, data: dict[str, Any], top: int, out: Any) -> None:
    entries = data["entries"]
    if kind == "pmi":
        by_n: dict[int, list[dict[str, Any]]] = {}
        for e in entries:
            by_n.setdefault(e["n"], []).append(e)
        for n in sorted(by_n):
            shown = ", ".join(f"{e['text']} ({e['count']})" for e in by_n[n][:top])
            print(f"   {n}-grams [{len(by_n[n])}]: {shown}", file=out)
    else:
        shown = ", ".join(f"{e['text']} ({e['domain_count']}/{e['general_count']})" for e in entries[:top])
        print(f"   top terms (domain/general count): {shown}", file=out)
        frequent = sorted(entries, key=lambda e: -e["domain_count"])[:top]
        print(f"   most frequent terms: {', '.join(e['text'] for e in frequent)}", file=out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dapt masking-stats``; returns the exit status (errors print one line)."""
    args = _parser().parse_args(argv)
    try:
        for kind in _kinds(args):
            _run_kind(args, kind, sys.stdout)
    except DaptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
