"""Vocabulary adaptation: add frequent, badly-split domain words to a WordPiece vocabulary.

A general-domain WordPiece vocabulary splits domain terms into many pieces (``cardiomyopathy`` →
``card ##iom ##yo ##pathy``): the model spends positions on fragments and must rebuild the word's
meaning from them in every layer. Sachidananda et al. (2021, "Efficient Domain Adaptation of Language
Models via Adaptive Tokenization") add such words as whole tokens and initialise each new embedding
as the mean of its old sub-token embeddings, so the model starts from what it already knew about the
pieces instead of from noise. This module holds the three steps, independent of the pipeline:

- ``mine_domain_words``: which words to add (streamed counts, three documented criteria);
- ``extend_vocabulary``: add them to a tokenizer and a masked LM, mean-of-pieces initialisation of
  the input embedding, the (tied or untied) output embedding and the decoder bias;
- ``fertility``: sub-token pieces per word, the number that vocabulary adaptation lowers.

Words are the units the tokenizer's own normalizer and pre-tokenizer produce (lowercased and
accent-stripped for uncased BERT, split on whitespace and punctuation), i.e. exactly what WordPiece
sees, so a mined word is always something the extended tokenizer can match as one unit. Only
WordPiece tokenizers (the BERT family) are supported: a byte-level BPE pre-token (``Ġword``) is not
the text an added token must match, so extending one this way would silently never fire.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterable, Iterator, Sequence

import torch

from dapt.errors import ConfigError

log = logging.getLogger(__name__)

CRITERIA = ("frequency", "pieces_x_frequency", "domain_ratio")
MIN_WORD_LENGTH = 3
_ENCODE_BATCH = 256


@dataclass(frozen=True)
class CandidateWord:
    """A mined word: its (normalized) text, domain count, WordPiece pieces and criterion score."""

    word: str
    count: int
    pieces: int
    score: float


def _check_wordpiece(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend, after checking it is a WordPiece model (see module docstring)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"vocabulary.extend needs a fast tokenizer; {type(tokenizer).__name__} is not one")
    model_type = type(backend.model).__name__
    if model_type != "WordPiece":
        raise ConfigError(f"vocabulary.extend supports WordPiece tokenizers (BERT family); this tokenizer's model is {model_type}")
    return backend


def _words(text: str, backend: Any) -> list[str]:
    """The words of ``text`` as WordPiece sees them: the backend's normalizer, then its pre-tokenizer."""
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    if normalizer is not None:
        text = normalizer.normalize_str(text)
    if pre_tokenizer is None:
        return text.split()
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]


def _is_wordlike(word: str) -> bool:
    return len(word) >= MIN_WORD_LENGTH and any(c.isalpha() for c in word)


def word_counts(documents: Iterable[str], tokenizer: Any) -> Counter[str]:
    """How often each word (``_words``) occurs in ``documents``, streamed (one document in memory)."""
    backend = _check_wordpiece(tokenizer)
    counts: Counter[str] = Counter()
    for text in documents:
        counts.update(_words(text, backend))
    return counts


def _pieces(word: str, backend: Any) -> int:
    """Sub-tokens WordPiece makes of one pre-tokenized word (the model alone: no truncation, no specials)."""
    return len(backend.model.tokenize(word))


def mine_domain_words(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    min_pieces: int,
    top_n: int,
    min_count: int,
    criterion: str,
    general_documents: Iterable[str] | None = None,
) -> list[CandidateWord]:
    """The ``top_n`` domain words worth adding to the vocabulary, best first.

    A candidate has at least one letter and ``MIN_WORD_LENGTH`` characters (numbers and short
    fragments are not domain terms), is not already one token or an added token, is split into
    ``>= min_pieces`` pieces and occurs ``>= min_count`` times in ``documents`` (rare words would get
    embeddings DAPT barely trains). Scores, higher is better, ties broken by the word so the list is
    deterministic:

    - ``frequency``: the domain count;
    - ``pieces_x_frequency``: count × (pieces − 1), the tokens the word's addition saves on this text
      (the default: it prefers words that are both frequent and badly split);
    - ``domain_ratio``: log of the word's add-one-smoothed relative frequency in the domain over that
      in ``general_documents`` (Sachidananda et al.'s idea: words specific to the domain, not words
      that are merely frequent everywhere and happen to be split).

    Documents are streamed through ``Counter``s; neither iterable is ever held as a list.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"vocabulary.criterion={criterion!r}: choose one of {', '.join(CRITERIA)}")
    if criterion == "domain_ratio" and general_documents is None:
        raise ConfigError("vocabulary.criterion=domain_ratio needs general-text documents to compare the domain against")
    backend = _check_wordpiece(tokenizer)
    added = set(tokenizer.get_added_vocab())
    counts = word_counts(documents, tokenizer)
    candidates: dict[str, tuple[int, int]] = {}
    for word, count in counts.items():
        if count < min_count or not _is_wordlike(word) or word in added:
            continue
        pieces = _pieces(word, backend)
        if pieces >= max(min_pieces, 2):
            candidates[word] = (count, pieces)

    if criterion == "domain_ratio":
        domain_total = sum(counts.values())
        general: Counter[str] = Counter()
        general_total = 0
        for text in general_documents:  # type: ignore[union-attr]
            words = _words(text, backend)
            general_total += len(words)
            general.update(w for w in words if w in candidates)
        vocab = len(counts)  # add-one smoothing over the domain's word types

        def score(word: str, count: int, pieces: int) -> float:
            p_domain = (count + 1) / (domain_total + vocab)
            p_general = (general[word] + 1) / (general_total + vocab)
            return math.log(p_domain / p_general)
    elif criterion == "frequency":
        def score(word: str, count: int, pieces: int) -> float:
            return float(count)
    else:
        def score(word: str, count: int, pieces: int) -> float:
            return float(count * (pieces - 1))

    scored = [CandidateWord(word, count, pieces, score(word, count, pieces)) for word, (count, pieces) in candidates.items()]
    scored.sort(key=lambda c: (-c.score, c.word))
    return scored[:top_n]


def _output_biases(model: Any) -> list[torch.nn.Parameter]:
    """The MLM decoder's bias parameter(s), deduplicated (BERT ties ``decoder.bias`` to ``cls.predictions.bias``)."""
    found: list[torch.nn.Parameter] = []
    out = model.get_output_embeddings()
    candidates = [getattr(out, "bias", None)]
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    candidates.append(getattr(predictions, "bias", None))
    for bias in candidates:
        if isinstance(bias, torch.Tensor) and all(bias is not b for b in found):
            found.append(bias)
    return found


def extend_vocabulary(model: Any, tokenizer: Any, words: Sequence[str]) -> list[str]:
    """Add ``words`` to ``tokenizer`` and ``model`` in place; returns the words added, in order.

    Each word is normalized with the tokenizer's normalizer (so ``Cardiomyopathy`` is added as
    ``cardiomyopathy`` in an uncased tokenizer; duplicates after normalization are added once) and
    added as ``AddedToken(single_word=True, normalized=True)``: matched on normalized text (any
    capitalisation in an uncased model) and only as a whole word, never inside a longer one
    (``noncardiomyopathy`` keeps its old pieces). Its sub-token ids are taken from the tokenizer
    *before* the addition; after ``resize_token_embeddings`` the new input-embedding row, the new
    output-embedding row (when it is not tied to the input, otherwise it is the same tensor) and the
    decoder bias entry are set to the mean of those sub-tokens' rows/entries (Sachidananda et al.),
    so the new token starts where the model's reading of its pieces is, not at random.
    Raises ``ConfigError`` for an empty word, a word that is not one pre-tokenizer word, or one
    that is already a single token.
    """
    from tokenizers import AddedToken

    backend = _check_wordpiece(tokenizer)
    normalized: list[str] = []
    for raw in words:
        word = backend.normalizer.normalize_str(raw) if backend.normalizer is not None else raw
        if not word.strip():
            raise ConfigError(f"vocabulary.extend: cannot add the empty word {raw!r}")
        if _words(word, backend) != [word]:
            raise ConfigError(f"vocabulary.extend: {raw!r} is not one word for this tokenizer (it splits at spaces or punctuation)")
        if word not in normalized:
            normalized.append(word)
    if not normalized:
        return []
    old_ids = tokenizer(normalized, add_special_tokens=False)["input_ids"]
    for word, ids in zip(normalized, old_ids):
        if len(ids) < 2:
            raise ConfigError(f"vocabulary.extend: {word!r} is already a single token")
    added = tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in normalized])
    if added != len(normalized):
        raise ConfigError(f"vocabulary.extend: the tokenizer added {added} of {len(normalized)} words")
    new_ids = tokenizer.convert_tokens_to_ids(normalized)

    embeddings = model.get_input_embeddings()
    size = max(embeddings.weight.shape[0], len(tokenizer))
    model.resize_token_embeddings(size, mean_resizing=False)
    inp = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    out = getattr(out_layer, "weight", None) if out_layer is not None else None
    untied_out = out is not None and out is not inp and out.shape[0] == inp.shape[0]
    biases = [b for b in _output_biases(model) if b.shape[0] == inp.shape[0]] if out_layer is not None else []
    with torch.no_grad():
        for new_id, ids in zip(new_ids, old_ids):
            index = torch.tensor(ids, dtype=torch.long, device=inp.device)
            inp[new_id] = inp.index_select(0, index).float().mean(0).to(inp.dtype)
            if untied_out:
                out[new_id] = out.index_select(0, index.to(out.device)).float().mean(0).to(out.dtype)
            for bias in biases:
                bias[new_id] = bias.index_select(0, index.to(bias.device)).float().mean().to(bias.dtype)
    log.info("added %d words to the vocabulary (now %d tokens); embeddings initialised as sub-token means (output %s)",
             len(normalized), len(tokenizer), "untied, set too" if untied_out else "tied")
    return normalized


def _plain_backend_copy(tokenizer: Any) -> Any:
    """A copy of the Rust tokenizer with truncation and padding off (tokenizer.json files may enable
    both, which would cut long documents short), leaving the caller's tokenizer untouched."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def _batches(documents: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(documents)
    while batch := list(islice(it, size)):
        yield batch


def fertility(documents: Iterable[str], tokenizer: Any) -> dict[str, Any]:
    """Pieces per word of ``documents``: ``{"words", "pieces", "pieces_per_word"}``.

    Words are pre-tokenizer words (``_words``, punctuation included, the same split for a tokenizer
    before and after extension, since added tokens leave the normalizer and pre-tokenizer alone);
    pieces are the tokens the full tokenizer makes of the documents (added tokens matched, no special
    tokens), so the ratio falls exactly by the pieces the added words save. Streamed in batches.
    """
    return fertilities(documents, [tokenizer])[0]


def fertilities(documents: Iterable[str], tokenizers: Sequence[Any]) -> list[dict[str, Any]]:
    """``fertility`` of the same documents under each tokenizer, reading them once: a corpus streamed
    from disk is read one time for "before" and "after" extension, not once per tokenizer."""
    backends = [(_check_wordpiece(tok), _plain_backend_copy(tok)) for tok in tokenizers]
    counts = [[0, 0] for _ in tokenizers]
    for batch in _batches(documents, _ENCODE_BATCH):
        for count, (backend, plain) in zip(counts, backends):
            count[0] += sum(len(_words(text, backend)) for text in batch)
            count[1] += sum(len(enc.ids) for enc in plain.encode_batch(batch, add_special_tokens=False))
    return [{"words": words, "pieces": pieces, "pieces_per_word": pieces / words if words else float("nan")}
            for words, pieces in counts]
