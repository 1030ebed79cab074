"""The cached vocabulary-adaptation step: mine domain words, extend the start model, cache the pair.

With ``vocabulary=extend`` the run's start model and tokenizer are replaced, before anything else
reads them, by copies extended with the domain's most useful badly-split words
(``dapt.modeling.vocabulary``). The DAPT run, its control arm and every held-out set then use the
extended tokenizer, so all arms are compared on the same tokenization. Mining scans at most
``max_documents`` domain documents; the extended model + tokenizer are saved as one
``save_pretrained`` folder under ``<cache_dir>/vocabulary/<key>``, keyed on the content of
everything that determines them (start weights, recipe, corpus, code, library versions), so sweeps
and repeated runs extend once per machine. With ``vocabulary=none`` (the default) the caller never
calls ``prepare_vocabulary`` and the run is exactly what it was without this step.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

from dapt.errors import ConfigError

log = logging.getLogger(__name__)

# Bump when the vocabulary recipe's code changes in a way that changes what it produces.
VOCABULARY_VERSION = 1
MARKER = "dapt_vocabulary.json"
EXAMPLES = 20


@dataclass
class VocabularyConfig:
    """The ``vocabulary`` config group.

    Attributes:
        name: ``none`` (keep the start model's vocabulary) or ``extend`` (add domain words).
        top_n: at most this many words are added.
        min_pieces: a word qualifies only if the tokenizer splits it into at least this many pieces.
        min_count: ... and it occurs at least this often in the scanned domain documents.
        criterion: ``frequency``, ``pieces_x_frequency`` (tokens saved) or ``domain_ratio`` (domain vs
            general relative frequency); see ``dapt.modeling.vocabulary.mine_domain_words``.
        max_documents: domain (and general) documents scanned for mining and fertility; null scans all.
        cache: reuse an extended model with the same key; false rebuilds it.
    """

    name: str = "none"
    top_n: int = 1000
    min_pieces: int = 2
    min_count: int = 20
    criterion: str = "pieces_x_frequency"
    max_documents: int | None = 20000
    cache: bool = True

    def __post_init__(self) -> None:
        from dapt.modeling.vocabulary import CRITERIA

        if self.name not in ("none", "extend"):
            raise ConfigError(f"vocabulary.name={self.name!r}: choose none or extend")
        if self.top_n < 1:
            raise ConfigError(f"vocabulary.top_n={self.top_n} must be >= 1")
        if self.min_pieces < 2:
            raise ConfigError(f"vocabulary.min_pieces={self.min_pieces} must be >= 2 (a word of one piece is already a token)")
        if self.min_count < 1:
            raise ConfigError(f"vocabulary.min_count={self.min_count} must be >= 1")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"vocabulary.criterion={self.criterion!r}: choose one of {', '.join(CRITERIA)}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"vocabulary.max_documents={self.max_documents} must be >= 1 or null (all documents)")


@dataclass
class VocabularyResult:
    """The extended start model and what was done to it (``as_results`` goes into results.json).

    ``model`` and ``tokenizer`` are the extended pair (loaded from the cache on a hit); ``path`` is
    the cached ``save_pretrained`` folder holding both.
    """

    path: str
    cache_key: str
    cached: bool
    added: int
    examples: list[str]
    fertility: dict[str, dict[str, float | None]]
    model: Any = field(default=None, repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def as_results(self) -> dict[str, Any]:
        return {"path": self.path, "cache_key": self.cache_key, "cached": self.cached, "added": self.added,
                "examples": list(self.examples), "fertility": copy.deepcopy(self.fertility)}


def recipe_fingerprint() -> str:
    """The code that mines words and extends the model (belongs in the cache key with the version)."""
    from dapt.modeling import vocabulary as modeling_vocabulary
    from dapt.versioning import source_fingerprint

    return source_fingerprint(modeling_vocabulary, prepare_vocabulary)


def vocabulary_cache_key(cfg: VocabularyConfig, start_fingerprint: Any, domain_description: Any, *, general_description: Any = None,
                         tokenizer: Any = None) -> str:
    """Content key of an extended pair: the start weights, the tokenizer it extends (``model.tokenizer``
    may differ from the weights' source), the domain corpus mined and the general corpus its fertility
    (and ``domain_ratio``) is measured on, the config, code and libraries."""
    from dapt.masking.corpus_stats import tokenizer_fingerprint
    from dapt.pipeline.fit import content_key
    from dapt.versioning import library_versions

    return content_key({
        "version": VOCABULARY_VERSION,
        "start": start_fingerprint,
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "vocabulary": {k: v for k, v in asdict(cfg).items() if k != "cache"},
        "domain": domain_description,
        "general": general_description,
        "code": recipe_fingerprint(),
        "libraries": library_versions(),
    })


def _capped(documents: Callable[[], Iterable[str]], limit: int | None) -> Iterable[str]:
    """A fresh pass over the first ``limit`` documents (all when None), streamed."""
    return islice(documents(), limit)


def _is_global_zero() -> bool:
    """Only global rank 0 writes the cache entry (every rank computes the same extension)."""
    from dapt.distributed import rank_and_world

    rank, world = rank_and_world()
    if world > 1:
        return rank == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def _round(stats: dict[str, Any]) -> float | None:
    value = stats["pieces_per_word"]
    return None if value != value else round(float(value), 6)  # NaN (no words) -> None


def prepare_vocabulary(
    cfg: VocabularyConfig,
    *,
    model: Any,
    tokenizer: Any,
    start_fingerprint: Any,
    domain_documents: Callable[[], Iterable[str]],
    general_documents: Callable[[], Iterable[str]],
    domain_description: Any,
    cache_dir: str,
    general_description: Any = None,
) -> VocabularyResult:
    """Return the start model and tokenizer extended with mined domain words, cached by content.

    Only for ``cfg.name == "extend"`` (with ``none`` the caller keeps its model and never calls this).
    ``model`` and ``tokenizer`` are never modified: a deep copy of each is extended. The document
    callables return a fresh iterable per call (domain text is read twice: mining, then fertility
    before and after in one pass; general text once, or twice with ``domain_ratio``), each capped at
    ``cfg.max_documents``. ``start_fingerprint`` identifies the start weights (e.g.
    ``base_prep.model_fingerprint`` or the base's cache key) and ``domain_description`` the corpus
    (``data.sources.describe``); both enter the key, so a different start or corpus re-mines.
    """
    from dapt.cached_weights import DIGEST_KEY, intact_marker, weights_digest
    from dapt.io import atomic_save_dir, atomic_write_json, cache_build_lock
    from dapt.modeling import vocabulary as vocab

    if cfg.name != "extend":
        raise ConfigError(f"vocabulary.name={cfg.name!r}: prepare_vocabulary is only for vocabulary=extend")
    key = vocabulary_cache_key(cfg, start_fingerprint, domain_description, general_description=general_description, tokenizer=tokenizer)
    target = Path(cache_dir) / "vocabulary" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    with cache_build_lock(target):
        info = intact_marker(target, MARKER, "vocabulary-extended model") if cfg.cache else None
        if info is not None:
            from dapt.modeling.loading import load_mlm_model, load_tokenizer

            log.info("using cached vocabulary-extended model %s (%d words added)", target, len(info["added_words"]))
            attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
            loaded = load_mlm_model(str(target), attn_implementation=attn).model
            return VocabularyResult(path=str(target), cache_key=key, cached=True, added=len(info["added_words"]),
                                    examples=info["added_words"][:EXAMPLES], fertility=info["fertility"],
                                    model=loaded, tokenizer=load_tokenizer(str(target)))

        limit = cfg.max_documents
        general = _capped(general_documents, limit) if cfg.criterion == "domain_ratio" else None
        candidates = vocab.mine_domain_words(_capped(domain_documents, limit), tokenizer, min_pieces=cfg.min_pieces,
                                             top_n=cfg.top_n, min_count=cfg.min_count, criterion=cfg.criterion,
                                             general_documents=general)
        if not candidates:
            scanned = "all" if limit is None else f"the first {limit}"
            raise ConfigError(f"vocabulary.extend: no word in {scanned} domain documents is split into >= {cfg.min_pieces} pieces "
                              f"and occurs >= {cfg.min_count} times; lower vocabulary.min_count")
        new_model = copy.deepcopy(model)
        new_tokenizer = copy.deepcopy(tokenizer)
        added = vocab.extend_vocabulary(new_model, new_tokenizer, [c.word for c in candidates])
        (domain_before, domain_after), (general_before, general_after) = (
            vocab.fertilities(_capped(documents, limit), [tokenizer, new_tokenizer]) for documents in (domain_documents, general_documents))
        before = {"domain": domain_before, "general": general_before}
        after = {"domain": domain_after, "general": general_after}
        fert = {name: {"before": _round(before[name]), "after": _round(after[name])} for name in ("domain", "general")}
        log.info("vocabulary: added %d domain words (e.g. %s); pieces per word on domain text %s -> %s, on general text %s -> %s",
                 len(added), ", ".join(added[:10]), fert["domain"]["before"], fert["domain"]["after"],
                 fert["general"]["before"], fert["general"]["after"])
        by_word = {c.word: c for c in candidates}
        marker = {
            "cache_key": key,
            "version": VOCABULARY_VERSION,
            "recipe": asdict(cfg),
            "added_words": added,
            "candidates": [asdict(by_word[w]) for w in added if w in by_word],
            "fertility": fert,
            "fertility_counts": {"before": before, "after": after},
            "vocab_size": len(new_tokenizer),
        }

        def write(tmp: Path) -> None:
            new_model.save_pretrained(tmp)
            new_tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / MARKER, {**marker, DIGEST_KEY: weights_digest(tmp)})

        if _is_global_zero():
            atomic_save_dir(target, write)
    return VocabularyResult(path=str(target), cache_key=key, cached=False, added=len(added), examples=added[:EXAMPLES],
                            fertility=fert, model=new_model, tokenizer=new_tokenizer)
