"""Corpus sources: stream documents (strings) from JSONL, text files, Parquet or HF ``datasets``.

A corpus is an iterator of documents, never a list: files are read line by line or in Parquet record
batches, HF datasets with ``streaming=True``. Every source can be sharded (document ``i`` belongs to
shard ``i % count``) so DDP ranks × dataloader workers read disjoint documents, and can hold out
every N-th document for evaluation when a corpus has no separate test split.

Directory and glob sources skip license/readme/notice files (``SourceConfig.exclude``): corpus
directories ship them (CRAFT's ``LICENSE.txt`` matches ``*.txt``) and they are not domain text.
``iter_documents`` reads sources in their canonical order (held-out sets, statistics);
``iter_pass_documents`` reads one source in a given file order for one training pass (the mixer in
``dapt.data.mixing`` permutes the files of each pass).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from dapt.data import wikitext
from dapt.data.quality import QualityPolicy, ReadStats, check_text_file
from dapt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SOURCE_TYPES = ("jsonl", "text", "parquet", "hf")
PARTS = ("all", "train", "dev", "test")
SPLIT_BY = ("file", "line", "blank_line", "wikitext", "conll")
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")
# File names (case-insensitive globs) that are never corpus text in a directory/glob source.
DEFAULT_EXCLUDE = ("LICENSE*", "LICENCE*", "README*", "COPYING*", "NOTICE*")


@dataclass
class SourceConfig:
    """One corpus source.

    Attributes:
        type: ``jsonl`` | ``text`` | ``parquet`` | ``hf``.
        path: file, directory or glob, relative to ``paths.data_dir`` unless absolute; for ``hf``
            the dataset name (hub id or local builder/dir).
        text_field: JSON key / Parquet column / dataset column holding the text.
        glob: file pattern when ``path`` is a directory.
        split_by: for ``text``: ``file`` (one document per file), ``line`` (one per non-empty line),
            ``blank_line`` (paragraph blocks) or ``wikitext`` (one per WikiText article: a
            `` = Title = `` line starts each; articles, not paragraphs, are the independent units a
            perplexity confidence interval resamples; the tokenized release's markup, ``<unk>``,
            `` @-@ `` and heading ``=``, is removed by ``dapt.data.wikitext.plain_text``) or ``conll`` (the unlabeled text of a CoNLL
            token-per-line file, for task-adaptive pretraining on an NER task: each sentence is its
            first column joined by spaces; a file that marks documents with ``-DOCSTART-`` lines
            yields one record per document, its sentences one per line, since sentences of one
            abstract are not independent units for a CI; a file without them yields one per sentence).
        hf_config / hf_split / hf_data_files / streaming: ``datasets.load_dataset`` arguments (a
            directory written by ``Dataset.save_to_disk`` is opened with ``load_from_disk``,
            memory-mapped, and iterated without loading it).
        max_documents: stop after this many documents (per pass, before sharding).
        holdout_every / part: a deterministic three-way split for corpora without separate files:
            with ``holdout_every=N`` document ``i`` belongs to ``dev`` when ``i % N == 0``, to
            ``test`` when ``i % N == 1`` and to ``train`` otherwise (N=2: dev and test halves, no
            train). ``part`` picks which documents the source yields (``train``, ``dev``, ``test``,
            or ``all``); dev, test and train never share a document, so dev can select and test
            report without leaking.
        weight: this source's share of training blocks relative to the other sources of the same
            list (normalised to probabilities). Unset everywhere = proportional to the source's size
            in bytes; set it on every source of a list or on none (``hf`` sources have no size, so
            a list mixing them with other sources needs explicit weights).
        exclude: case-insensitive file-name globs skipped in directory/glob sources (license,
            readme, notice files by default); a single file named explicitly is always read.
    """

    type: str = "jsonl"
    path: str = ""
    text_field: str = "text"
    glob: str = "*.txt"
    split_by: str = "file"
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: str | None = None
    streaming: bool = True
    max_documents: int | None = None
    holdout_every: int | None = None
    part: str = "all"
    weight: float | None = None
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))

    def __post_init__(self) -> None:
        if self.weight is not None and not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"source.weight={self.weight} must be a positive number (or unset)")
        if self.type not in SOURCE_TYPES:
            raise ConfigError(f"source type {self.type!r} unknown; choose one of {', '.join(SOURCE_TYPES)}")
        if not self.path:
            raise ConfigError(f"a {self.type} source needs a path")
        if self.split_by not in SPLIT_BY:
            raise ConfigError(f"source.split_by={self.split_by!r}: choose one of {', '.join(SPLIT_BY)}")
        if self.holdout_every is not None and self.holdout_every < 2:
            raise ConfigError(f"source.holdout_every={self.holdout_every} must be >= 2")
        if self.part not in PARTS:
            raise ConfigError(f"source.part={self.part!r}: choose one of {', '.join(PARTS)}")
        if self.part != "all" and self.holdout_every is None:
            raise ConfigError(f"source.part={self.part!r} needs source.holdout_every (the split rule)")
        if self.part == "train" and self.holdout_every == 2:
            raise ConfigError("source.holdout_every=2 splits into dev and test halves only: no train part")

    def keeps(self, index: int) -> bool:
        """Whether document ``index`` (its position in the raw source) belongs to ``part``."""
        if self.part == "all" or self.holdout_every is None:
            return True
        r = index % self.holdout_every
        return {"dev": r == 0, "test": r == 1, "train": r > 1}[self.part]


def as_source(cfg: Any, prefix: str = "source") -> SourceConfig:
    if isinstance(cfg, SourceConfig):
        return cfg
    from dapt.config import to_dataclass

    return to_dataclass(SourceConfig, cfg, prefix=prefix)


def resolve_path(path: str, data_dir: str | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and data_dir:
        p = Path(data_dir) / p
    return p


def is_excluded(path: Path, patterns: Iterable[str]) -> bool:
    """Whether ``path``'s file name matches one of ``patterns`` (case-insensitive)."""
    name = path.name.lower()
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in patterns)


def source_files(source: SourceConfig, data_dir: str | None) -> list[Path]:
    """The files a file-based source reads, in a stable order; errors name the missing path."""
    return _files(source, data_dir)


def _files(source: SourceConfig, data_dir: str | None) -> list[Path]:
    path = resolve_path(source.path, data_dir)
    if any(ch in str(path) for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(str(path), recursive=True))
        files = [f for f in files if f.is_file() and not is_excluded(f, source.exclude)]
        if not files:
            raise DataError(f"corpus glob matched no files: {path}")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob(source.glob) if p.is_file() and not is_excluded(p, source.exclude))
        if not files:
            raise DataError(f"corpus directory has no files matching '{source.glob}': {path}")
        return files
    if not path.exists():
        raise DataError(f"corpus path does not exist: {path}")
    return [path]


def _raw_documents(
    source: SourceConfig, data_dir: str | None, files: Sequence[Path] | None = None, stats: ReadStats | None = None
) -> Iterator[str]:
    """Every document of the source in order (before holdout, sharding and limits).

    ``files`` overrides the source's canonical file list (a permutation of it, for a training pass).
    ``stats`` counts the records read and skipped (a fresh default-policy one when None, so that a
    mostly-broken source fails in every reader, not only in the training stream).
    """
    if stats is None:
        stats = ReadStats(str(resolve_path(source.path, data_dir)))

    def keep(text: Any, where: str, decoded: bool = True) -> bool:
        """Count the record's outcome (one per record) and whether it yields a document."""
        if text is None:
            stats.skip("no_text", where, f"'{source.text_field}' is null")
        elif not isinstance(text, str):
            stats.skip("not_string", where, f"'{source.text_field}' is a {type(text).__name__}, not a string")
        elif not text.strip():
            stats.skip("empty", where, "empty or whitespace-only text")
        else:
            stats.document()
            if not decoded:
                stats.kept_undecodable(where)
            return True
        return False

    if source.type == "hf":
        for i, record in enumerate(_hf_records(source)):
            stats.record()
            if keep(record[source.text_field], f"dataset '{source.path}' row {i}"):
                yield record[source.text_field]
        stats.finish()
        return
    for path in files if files is not None else _files(source, data_dir):
        if source.type == "parquet":
            for i, text in enumerate(_parquet_texts(path, source.text_field)):
                stats.record()
                if keep(text, f"{path} row {i}"):
                    yield text
            continue
        check_text_file(path)
        if source.type == "jsonl":
            with path.open("rb") as fh:
                for lineno, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    stats.record()
                    where = f"{path}:{lineno}"
                    line, decoded = stats.decode(raw)
                    try:
                        record = json.loads(line)
                    except ValueError as exc:  # JSONDecodeError, or e.g. an integer over Python's digit limit
                        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).splitlines()[0]
                        stats.skip("malformed_json", where, f"malformed JSON ({detail})")
                        continue
                    except RecursionError:  # json's recursion limit on absurdly nested arrays
                        stats.skip("malformed_json", where, "malformed JSON (nested too deeply)")
                        continue
                    if not isinstance(record, dict):
                        stats.skip("malformed_json", where, f"a JSON {type(record).__name__}, not an object")
                    elif source.text_field not in record:
                        stats.skip("no_text", where, f"no field '{source.text_field}' (set text_field)")
                    elif keep(record[source.text_field], where, decoded):
                        yield record[source.text_field]
        elif source.split_by == "file":
            stats.record()
            text, decoded = stats.decode(path.read_bytes())
            if keep(text, str(path), decoded):
                yield text
        elif source.split_by == "conll":
            yield from _conll_units(path, stats, keep)
        else:
            yield from _text_units(path, source.split_by, stats, keep)
    stats.finish()


def _unit(body: str, where: str, decoded: bool, stats: ReadStats, keep: Any) -> Iterator[str]:
    """One multi-line unit of a text file (paragraph, article, CoNLL sentence or document): counted as
    a record when it has text, and yielded when ``keep`` accepts it."""
    if body:
        stats.record()
        if keep(body, where, decoded):
            yield body


def _text_units(path: Path, split_by: str, stats: ReadStats, keep: Any) -> Iterator[str]:
    """The lines, blank-line paragraphs or WikiText articles of one text file (each one record)."""
    with path.open("rb") as fh:
        para: list[str] = []
        para_start = 1
        para_decoded = True  # every line of the current paragraph/article was valid UTF-8

        def emit() -> Iterator[str]:
            body = "\n".join(p for p in para if p.strip())
            yield from _unit(wikitext.plain_text(body) if split_by == "wikitext" else body, f"{path}:{para_start}", para_decoded, stats, keep)

        for lineno, raw in enumerate(fh, start=1):
            line, decoded = stats.decode(raw)
            line = line.rstrip("\n")
            if split_by == "line":
                if line.strip():
                    stats.record()
                    if keep(line, f"{path}:{lineno}", decoded):
                        yield line
                continue
            starts_article = split_by == "wikitext" and _WIKITEXT_TITLE.match(line) and any(p.strip() for p in para)
            ends_paragraph = split_by == "blank_line" and not line.strip()
            if starts_article or ends_paragraph:
                yield from emit()
                para, para_start, para_decoded = [], lineno, True
            if split_by == "wikitext" or line.strip():
                if not para:
                    para_start = lineno
                para.append(line)
                para_decoded = para_decoded and decoded
        yield from emit()


def _conll_units(path: Path, stats: ReadStats, keep: Any) -> Iterator[str]:
    """The documents (``-DOCSTART-`` files) or sentences of a CoNLL file: first column only, labels never read."""
    with path.open("rb") as fh:  # documents when any line marks one (a first pass over the file: CoNLL files are small)
        by_document = any(raw.lstrip(b"\xef\xbb\xbf").startswith(b"-DOCSTART-") for raw in fh)
    with path.open("rb") as fh:
        sentences: list[str] = []
        tokens: list[str] = []
        start, decoded_all = 1, True

        def emit() -> Iterator[str]:
            yield from _unit("\n".join(sentences), f"{path}:{start}", decoded_all, stats, keep)

        for lineno, raw in enumerate(fh, start=1):
            line, decoded = stats.decode(raw)
            line = line.lstrip("\ufeff").strip()
            if line.startswith("-DOCSTART-") or not line:
                if tokens:
                    sentences.append(" ".join(tokens))
                    tokens = []
                if line.startswith("-DOCSTART-") or not by_document:
                    yield from emit()
                    sentences, start, decoded_all = [], lineno + 1, True
                continue
            if not tokens and not sentences:
                start = lineno
            tokens.append(line.split()[0])
            decoded_all = decoded_all and decoded
        if tokens:
            sentences.append(" ".join(tokens))
        yield from emit()


def _parquet_texts(path: Path, field: str) -> Iterator[Any]:
    """Every value of column ``field`` (None, non-strings and blanks included: the caller counts them)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no column '{field}' (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _hf_records(source: SourceConfig) -> Iterator[dict[str, Any]]:
    """Every record of an HF dataset; a missing text column is a config error, raised at once."""
    import datasets

    try:
        local = Path(source.path).expanduser()
        if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.hf_split]
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(
                source.path, source.hf_config, split=source.hf_split, streaming=source.streaming, data_files=source.hf_data_files
            )
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
        raise DataError(f"could not load dataset '{source.path}' ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    for record in ds:
        if source.text_field not in record:
            raise DataError(f"dataset '{source.path}': no column '{source.text_field}' (columns: {', '.join(record)})")
        yield record


def iter_documents(
    sources: Sequence[SourceConfig] | SourceConfig,
    data_dir: str | None,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    policy: QualityPolicy | None = None,
) -> Iterator[str]:
    """Stream the documents of ``sources`` that belong to shard ``shard_index`` of ``num_shards``.

    Sharding counts documents across all sources, so shards stay balanced whatever the files.
    ``policy`` sets when bad records stop the read (``data.max_bad_fraction``; default thresholds
    when None).
    """
    if isinstance(sources, SourceConfig):
        sources = [sources]
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} of {num_shards}")
    global_index = 0
    for source in sources:
        stats = ReadStats(str(resolve_path(source.path, data_dir)), policy or QualityPolicy())
        for doc in _kept_documents(source, _raw_documents(source, data_dir, stats=stats)):
            if global_index % num_shards == shard_index:
                yield doc
            global_index += 1


def _kept_documents(source: SourceConfig, raw: Iterable[str]) -> Iterator[str]:
    """Apply the holdout part and ``max_documents`` (both count positions in ``raw``)."""
    kept = 0
    for i, doc in enumerate(raw):
        if not source.keeps(i):
            continue
        if source.max_documents is not None and kept >= source.max_documents:
            break
        kept += 1
        yield doc


def permutes_files(source: SourceConfig, data_dir: str | None) -> bool:
    """Whether a training pass may read this source's files in a shuffled order.

    Not for ``hf`` sources (no files), single files, or sources whose holdout split or
    ``max_documents`` counts positions in the canonical order: permuting their files would move
    documents between train and held-out parts, or change which documents are the first N.
    """
    if source.type == "hf" or source.holdout_every is not None or source.max_documents is not None:
        return False
    return len(_files(source, data_dir)) > 1


def iter_pass_documents(
    source: SourceConfig,
    data_dir: str | None,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    file_order: Sequence[int] | None = None,
    stats: ReadStats | None = None,
) -> Iterator[str]:
    """One source's documents for shard ``shard_index`` of ``num_shards``, files in ``file_order``.

    ``file_order`` is a permutation of the indices of ``source_files`` (None: canonical order); every
    shard of a pass must get the same one, so that shards stay a partition of the source's documents.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} of {num_shards}")
    files = None
    if file_order is not None:
        canonical = _files(source, data_dir)
        if sorted(file_order) != list(range(len(canonical))):
            raise ValueError(f"file_order is not a permutation of the {len(canonical)} files of {source.path}")
        files = [canonical[i] for i in file_order]
    for i, doc in enumerate(_kept_documents(source, _raw_documents(source, data_dir, files, stats))):
        if i % num_shards == shard_index:
            yield doc


def source_size(source: SourceConfig, data_dir: str | None) -> float | None:
    """Bytes of text a source contributes (its files' sizes, times its holdout part's share).

    None for ``hf`` sources (no cheap size). A stat per file, no reading: the default mixing weight.
    ``max_documents`` is ignored (the whole files count): set an explicit weight with it.
    """
    if source.type == "hf":
        return None
    size = float(sum(f.stat().st_size for f in _files(source, data_dir)))
    if source.holdout_every is not None and source.part != "all":
        n = source.holdout_every
        size *= (n - 2) / n if source.part == "train" else 1 / n
    return size


def check_nonempty(sources: Iterable[SourceConfig], data_dir: str | None, what: str, policy: QualityPolicy | None = None) -> None:
    """Fail before training when a source is missing or yields no document."""
    for source in sources:
        if next(iter_documents(source, data_dir, policy=policy), None) is None:
            raise DataError(f"{what} corpus is empty (no non-blank documents): {resolve_path(source.path, data_dir)}")


def scan_prefix(source: SourceConfig, data_dir: str | None, policy: QualityPolicy, max_records: int = 5000) -> ReadStats:
    """Read the first ``max_records`` records of ``source`` and return their counts.

    Raises ``DataError`` (binary file, bad-record fraction over ``policy``, no usable record) before
    any model work: a malformed corpus is caught in seconds, not after hours of training. Bounded, so
    it costs the same for a 1 GB corpus as for a 1 MB one; bad records later in the corpus are
    caught by the training stream's own counts.
    """
    stats = ReadStats(str(resolve_path(source.path, data_dir)), policy)
    for _ in _raw_documents(source, data_dir, stats=stats):
        if stats.records >= max_records:
            break
    stats.check()
    return stats


def describe(sources: Iterable[SourceConfig], data_dir: str | None) -> list[dict[str, Any]]:
    """A JSON-able fingerprint of sources for cache keys and provenance: the config, and for files
    their count, size and a SHA-256 of their contents (a same-size edit changes it). Hashing is
    memoised per process on (path, size, mtime)."""
    from dapt.versioning import file_digest, source_fingerprint

    out: list[dict[str, Any]] = []
    for source in sources:
        entry: dict[str, Any] = {k: v for k, v in vars(source).items()}
        if source.type == "text" and source.split_by == "wikitext":
            entry["wikitext_rules"] = source_fingerprint(wikitext)  # the text read changes with that code
        if source.type != "hf":
            files = _files(source, data_dir)
            entry["files"] = len(files)
            entry["bytes"] = sum(f.stat().st_size for f in files)
            entry["sha256"] = hashlib.sha256("".join(file_digest(f) for f in files).encode()).hexdigest()
        out.append(entry)
    return out
