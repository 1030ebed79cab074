"""On-disk cache of per-seed fine-tuning results for fixed checkpoints (the base model).

In a sweep every run compares against the same base model, so its downstream scores are computed
once and reused. A result is keyed by everything that changes it: the model (a content hash of a local
checkpoint's files, so a re-saved or edited directory misses; the id for hub models), the task
definition and a hash of its data files, the seed, the hyperparameters, the recipe version
``CACHE_VERSION`` and the versions of the libraries that compute the scores (torch, transformers,
Lightning, tokenizers, dapt, torchmetrics, seqeval). ``CACHE_VERSION`` is bumped by hand when the
fine-tuning or scoring code changes; ``tests/test_cache.py`` pins ``recipe_fingerprint()`` (a hash
of that code) next to it, so an edit without a bump fails the suite instead of serving stale scores.
One JSON file per key, written atomically (``dapt.io.atomic_write_json``), so concurrent sweep workers
never read half a file; a corrupt entry is a miss, not an error, and the recomputed result replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dapt.evaluation.tasks import TaskConfig
from dapt.io import atomic_write_json  # noqa: F401  (re-exported for downstream.py and finetune.py)
from dapt.versioning import LIBRARIES, directory_digest, files_digest, library_versions, source_fingerprint

log = logging.getLogger(__name__)

# The recipe version: bump when fine-tuning or scoring changes in a way that makes old cached scores
# incomparable, and update the fingerprint pinned in tests/test_cache.py.
# 1: initial. 2: fine-tuning moved to AdamW with linear warmup/decay and bucketed batches, NER
#    tokenizers of byte-level BPE models get add_prefix_space, and library versions join the key.
CACHE_VERSION = 2
# Besides the libraries every cached number depends on, the NER and classification metrics.
SCORE_LIBRARIES = (*LIBRARIES, "torchmetrics", "seqeval")


def model_fingerprint(source: str) -> str:
    """Content hash of a local checkpoint directory's files, or the hub id itself.

    ``package:`` sources resolve to their bundled directory, so an upgraded package is a new model.
    Hashing ~100 MB takes a fraction of a second; (name, size, mtime) stamps memoise it per process.
    """
    from dapt.modeling.loading import resolve_model_path

    path = Path(resolve_model_path(source))
    if not path.is_dir():
        return f"hub:{source}"
    return directory_digest(path)


def task_fingerprint(task: TaskConfig, data_dir: str | Path) -> dict[str, Any]:
    """The task's definition (minus prose) plus a hash of its local data files."""
    spec = asdict(task)
    spec.pop("description", None)
    if task.reader.format == "hub":
        return {"spec": spec, "data": None}
    files = []
    for location in (task.train, task.dev, task.test):
        if location is None:
            continue
        p = Path(location).expanduser()
        files.append(p if p.is_absolute() else Path(data_dir).expanduser() / p)
    return {"spec": spec, "data": files_digest([f for f in files if f.is_file()])}


def recipe_sources() -> tuple[Any, ...]:
    """The code that turns (model, task data, seed, hyperparameters) into a cached per-seed result:
    reading and subsetting the task, tokenizing (including how tokenizers are loaded for words),
    the fine-tuning loop and modules, and the metrics."""
    from dapt import labels
    from dapt.evaluation import encoding, finetuning, metrics, modules, readers, tasks
    from dapt.modeling import loading, optim

    return (labels, optim, readers, tasks, encoding, finetuning, modules, metrics, loading.load_tokenizer, loading._byte_level_nodes,
            loading.needs_prefix_space, loading.words_encode_like_text, loading._prefix_space_for_words)


def recipe_fingerprint() -> str:
    """``source_fingerprint`` of ``recipe_sources()``; stored in each entry's meta, pinned by a test."""
    return source_fingerprint(*recipe_sources())


def score_cache_key(*, model_fp: str, task_fp: dict[str, Any], seed: int, hyperparameters: dict[str, Any]) -> str:
    """Keyed on the model's files, not its name: ``package:X`` and its directory are the same model.

    Also on ``CACHE_VERSION`` and ``library_versions()``: a recipe change or a torch / transformers
    upgrade makes new scores, which must not be paired with (or stand in for) old ones.
    """
    payload = {
        "version": CACHE_VERSION,
        "libraries": library_versions(SCORE_LIBRARIES),
        "model_fingerprint": model_fp,
        "task": task_fp,
        "seed": seed,
        "hyperparameters": hyperparameters,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


class ResultCache:
    """``<cache_dir>/downstream/<key>.json`` holding one per-seed result."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir).expanduser() / "downstream"

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with path.open(encoding="utf-8") as handle:
                entry = json.load(handle)
            return dict(entry["result"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable downstream cache entry %s (%s)", path, exc)
            return None

    def put(self, key: str, result: dict[str, Any], *, meta: dict[str, Any]) -> None:
        from dapt.io import non_finite_keys

        if non_finite_keys(result):  # JSON would bring NaN back as null: recompute such a result instead
            log.warning("not caching downstream result %s: non-finite values at %s", key, ", ".join(non_finite_keys(result)))
            return
        try:
            atomic_write_json(self.path(key), {"meta": meta, "result": result})
        except OSError as exc:  # a read-only cache must not cost the scores just computed
            log.warning("could not write downstream cache %s (%s)", self.path(key), exc)
