"""Capping, tokenizing and caching for the corpus statistics PMI and salient masking use.

Documents come from the caller (``MaskingContext.domain_documents`` / ``general_documents``: ``dapt
train`` and ``dapt masking-stats`` read them with ``dapt.data.sources.iter_documents``, the one reader
and its quality filters); masking never reads files itself.

Statistics are computed once per (tokenizer, corpus sample, parameters) and cached as JSON in the
masking cache folder (``MaskingContext.cache_dir``; ``dapt train`` passes ``<paths.cache_dir>/masking``,
which ``dapt masking-stats`` uses too). The cache key hashes the *text* of the capped document sample rather than
a path, so editing or re-filtering a corpus can never silently reuse stale statistics; reading the
capped sample to hash it costs well under a second, tokenizing and counting it a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from dapt.errors import ConfigError, DataError
from dapt.io import atomic_write_json
from dapt.masking.base import MaskingInput
from dapt.masking.units import HASH_VERSION, WordTable, encode_word_starts, plain_backend, word_hashes

log = logging.getLogger(__name__)

STATS_FORMAT_VERSION = 1


@dataclass
class CorpusStatsConfig:
    """Caps on the corpus sample that statistics are computed from (mixed into PMI/salient configs).

    Attributes:
        stats_path: a statistics file written by ``dapt masking-stats --out``; null computes them from
            the run's corpus (cached under ``paths.cache_dir``).
        stats_max_documents: read at most this many documents per corpus.
        stats_max_words: ... and at most this many whitespace-separated words per corpus; bounds the
            start-up cost (the statistics are cached after the first computation).
    """

    stats_path: str | None = None
    stats_max_documents: int = 50_000
    stats_max_words: int = 2_000_000

    def _check_caps(self) -> None:
        for key in ("stats_max_documents", "stats_max_words"):
            if getattr(self, key) < 1:
                raise ConfigError(f"masking.{key}={getattr(self, key)} must be >= 1")


@dataclass
class CorpusSample:
    """The capped, in-memory document sample a statistic is computed from, with its content hash."""

    documents: list[str]
    sha: str
    n_words: int


def take_documents(documents: Callable[[], Iterable[str]] | Iterable[str], max_documents: int, max_words: int) -> CorpusSample:
    """Stream documents until either cap is reached, hashing their text for the cache key."""
    stream = documents() if callable(documents) else documents
    digest = hashlib.sha256()
    kept: list[str] = []
    n_words = 0
    for doc in stream:
        if not isinstance(doc, str):
            raise DataError(f"corpus statistics expect document strings, got {type(doc).__name__}")
        if not doc.strip():
            continue
        kept.append(doc)
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
        n_words += len(doc.split())
        if len(kept) >= max_documents or n_words >= max_words:
            break
    if not kept:
        raise DataError("corpus statistics: the corpus yielded no non-empty document")
    return CorpusSample(documents=kept, sha=digest.hexdigest(), n_words=n_words)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run corpus-sized torch ops on one thread, then restore the setting.

    Sorting and hashing a few million int64 is cheap on one core, while intra-op threads on a busy
    machine (a sweep, a DataLoader, another run) contend with each other: one thread is fast enough
    and predictable.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the full tokenizer definition (vocab, normaliser, pre-tokenizer): word hashes are
    built from token ids, so statistics are only valid for the exact tokenizer that made them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} is not a fast tokenizer; masking statistics need word ids")
    spec = json.loads(backend.to_str())
    # Truncation / padding are call-time state (transformers sets them on first use), not identity.
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:16]


@dataclass
class TokenizedCorpus:
    """A document sample as one long row: documents separated by a non-maskable token.

    Laid out exactly like a packed training block, so ``WordTable`` / ``word_hashes`` /
    ``ngram_hashes`` give the same hashes here as at training time and no n-gram crosses documents.
    """

    input_ids: torch.Tensor  # [1, T]
    table: WordTable
    word_hash: torch.Tensor  # [1, T]

    @property
    def n_words(self) -> int:
        return int(self.table.valid.sum())

    def word_token_ids(self, word: int) -> list[int]:
        """Token ids of corpus word ``word`` (for decoding the few words that get displayed)."""
        start = int(self.table.first_pos[0, word])
        return self.input_ids[0, start: start + int(self.table.length[0, word])].tolist()


def tokenize_corpus(documents: list[str], tokenizer: Any, batch_size: int = 1000) -> TokenizedCorpus:
    """Tokenize with the fast tokenizer (batched); word starts from ``encode_word_starts``, the rule
    the block packer uses, so corpus words are exactly the words of training blocks."""
    backend = plain_backend(tokenizer)
    sep = np.full(1, -1, dtype=np.int64)  # any non-maskable filler; its id never enters a hash
    no_start = np.zeros(1, dtype=bool)
    ids: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    for lo in range(0, len(documents), batch_size):
        for doc_ids, doc_starts in encode_word_starts(backend, documents[lo: lo + batch_size]):
            ids += [doc_ids, sep]
            starts += [doc_starts, no_start]
    input_ids = torch.from_numpy(np.concatenate(ids or [np.zeros(0, dtype=np.int64)]))[None]
    maskable = input_ids != int(sep[0])
    word_starts = torch.from_numpy(np.concatenate(starts or [np.zeros(0, dtype=bool)]))[None]
    batch = MaskingInput.from_word_starts(input_ids, word_starts, maskable)
    table = WordTable.build(batch.word_ids)
    return TokenizedCorpus(input_ids=input_ids, table=table, word_hash=word_hashes(input_ids, table))


def stats_cache_key(kind: str, tokenizer_fp: str, corpus_shas: list[str], params: dict[str, Any]) -> str:
    """The key of one corpus statistic's cache file: its kind, the statistics format and hash
    versions, the tokenizer, the content of each corpus sample and the strategy's parameters."""
    payload = json.dumps(
        {"kind": kind, "format": STATS_FORMAT_VERSION, "hash": HASH_VERSION, "tokenizer": tokenizer_fp,
         "corpora": corpus_shas, "params": params},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:20]


def default_masking_cache_dir() -> Path:
    """``<DAPT_CACHE_DIR or ~/.cache/dapt>/masking``: what ``dapt train`` passes as ``MaskingContext.cache_dir``."""
    from dapt.config import default_cache_dir

    return Path(default_cache_dir()).expanduser() / "masking"


def cache_file(cache_dir: str | Path | None, kind: str, key: str) -> Path:
    """``<cache_dir>/<kind>-<key>.json``; ``cache_dir`` is the masking cache folder itself."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_masking_cache_dir()
    return folder / f"{kind}-{key}.json"


def read_json(path: str | Path, kind: str) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"masking.stats_path={path} does not exist (write it with: dapt masking-stats --out ...)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not a masking statistics file ({exc.msg})") from exc
    if data.get("kind") != kind:
        raise ConfigError(f"masking.stats_path={path} holds '{data.get('kind')}' statistics, not '{kind}'")
    if data.get("hash_version") != HASH_VERSION:
        raise ConfigError(f"masking.stats_path={path} was made by another dapt version; recompute it with dapt masking-stats")
    return data


def check_tokenizer(data: dict[str, Any], tokenizer: Any, path: str | Path) -> None:
    """Refuse statistics made with another tokenizer: their hashes would silently match nothing."""
    if tokenizer is None:
        return
    fp = tokenizer_fingerprint(tokenizer)
    if data.get("tokenizer") != fp:
        raise ConfigError(
            f"masking.stats_path={path} was computed with another tokenizer ({data.get('tokenizer')} != {fp}); "
            "recompute it with dapt masking-stats --tokenizer <the model's tokenizer>"
        )


def load_or_compute_stats(
    kind: str,
    config: CorpusStatsConfig,
    tokenizer: Any,
    cache_dir: str | Path | None,
    corpora: Sequence[Callable[[], Iterable[str]] | Iterable[str]],
    build: Callable[[list[TokenizedCorpus]], Any],
) -> tuple[dict[str, Any], str]:
    """The one load-or-compute path of every corpus statistic (PMI n-grams, salient terms).

    ``config.stats_path`` wins (a file from ``dapt masking-stats --out``, checked against the
    tokenizer); otherwise each corpus is capped (``take_documents``), the sample texts and
    ``config.stats_params()`` make the cache key, and ``build(tokenized corpora)`` runs only on a
    miss. ``build`` returns an object with ``meta`` (dict, incl. ``seconds``) and ``entries`` (list).
    Returns ``(data, path)``.
    """
    if config.stats_path:
        data = read_json(config.stats_path, kind)
        check_tokenizer(data, tokenizer, config.stats_path)
        return data, config.stats_path
    samples = [take_documents(c, config.stats_max_documents, config.stats_max_words) for c in corpora]
    fp = tokenizer_fingerprint(tokenizer)
    params = config.stats_params()  # type: ignore[attr-defined]  # each strategy's config defines it
    path = cache_file(cache_dir, kind, stats_cache_key(kind, fp, [s.sha for s in samples], params))
    if path.exists():
        log.info("%s: cached %s", kind, path)
        return read_json(path, kind), str(path)
    with single_threaded():
        result = build([tokenize_corpus(s.documents, tokenizer) for s in samples])
    data = {"kind": kind, "hash_version": HASH_VERSION, "tokenizer": fp, "corpus_sha": [s.sha for s in samples],
            "n_documents": [len(s.documents) for s in samples], "params": params, **result.meta,
            "entries": result.entries}
    atomic_write_json(path, data)  # temp file + rename: parallel sweep runs never read half a file
    log.info("%s: %d entries from %s documents in %.1fs -> %s", kind, len(result.entries),
             "+".join(str(len(s.documents)) for s in samples), result.meta["seconds"], path)
    return data, str(path)


def is_wordlike(text: str) -> bool:
    """A word with at least one letter or digit (not punctuation)."""
    return any(ch.isalnum() for ch in text)


def decode_word(tokenizer: Any, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids).strip()
