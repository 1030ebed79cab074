"""Start-up checks of a train run that cost seconds, so that hours of compute are not spent first.

``validate`` checks the config's shape (keys, types, ranges); ``preflight`` checks the config against
the world it will run in: the model's position table, the accelerator, the output folder and its
free disk. Each problem is a one-line ``DaptError`` naming the key or path and the numbers involved,
raised before any weight is loaded (the model is built on the ``meta`` device, which allocates
nothing, to count its parameters). Downstream task files are parsed at start-up by
``dapt.evaluation.downstream.check_downstream`` (called from ``validate``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dapt.errors import ConfigError

log = logging.getLogger(__name__)

# Architectures whose position ids start after the padding index (RoBERTa's ``create_position_ids``):
# of ``max_position_embeddings`` rows only ``max_position_embeddings - (pad_token_id + 1)`` are usable.
PADDING_OFFSET_MODELS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
                         "roberta-prelayernorm", "xmod", "luke", "mpnet")
# Bytes per parameter on disk, times copies written at the end of a run: the saved model, a
# checkpoint, and the temporary copy an atomic save holds until it replaces the old one.
BYTES_PER_PARAMETER = 4
COPIES_ON_DISK = 3


def preflight(run: Any, run_dir: Path) -> None:
    """Every start-up check of ``dapt train`` (``run`` is the ``RunConfig`` that ``validate`` returned)."""
    check_accelerator(run.trainer)
    config = model_config(run.model)
    if config is not None:
        check_sequence_length(config, run.data.max_seq_length, "data.max_seq_length")
        if run.base_prep.mode != "never":
            check_sequence_length(config, run.base_prep.max_seq_length, "base_prep.max_seq_length")
    check_writable(run_dir)
    raw = run.raw
    writes_weights = bool(raw.get("save_model", True)) or bool((raw.get("checkpoint") or {}).get("enabled", False))
    if config is not None and writes_weights:
        check_free_disk(run_dir, parameter_count(config) * BYTES_PER_PARAMETER * COPIES_ON_DISK)


def check_accelerator(trainer: dict[str, Any]) -> None:
    """``trainer.accelerator`` gpu/cuda/mps on a machine without one is an error now, not a traceback later."""
    import torch

    accelerator = str(trainer.get("accelerator", "cpu")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA GPU is available here; use trainer=cpu")
    if accelerator == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("trainer.accelerator=mps but MPS is not available here; use trainer=cpu")


def model_config(model: Any) -> Any | None:
    """The model's ``AutoConfig`` with ``model.config_overrides`` (None for a hub id that cannot be
    reached now: loading the model reports that, with the hub's own message)."""
    from transformers import AutoConfig

    from dapt.modeling.loading import resolve_model_path

    path = resolve_model_path(model.source)  # a missing package or path is a one-line error already
    try:
        return AutoConfig.from_pretrained(path, **dict(model.config_overrides or {}))
    except (OSError, ValueError) as exc:
        log.debug("preflight: no config for %s (%s); position and disk checks skipped", model.source, exc)
        return None


def usable_positions(config: Any) -> int | None:
    """How many tokens one sequence may hold: ``max_position_embeddings`` less RoBERTa's padding offset."""
    total = getattr(config, "max_position_embeddings", None)
    if not isinstance(total, int) or total <= 0:
        return None
    if getattr(config, "model_type", "") in PADDING_OFFSET_MODELS:
        return total - (int(getattr(config, "pad_token_id", 0) or 0) + 1)
    return total


def check_sequence_length(config: Any, length: int, key: str) -> None:
    usable = usable_positions(config)
    if usable is not None and length > usable:
        total = config.max_position_embeddings
        detail = f"{usable} usable of max_position_embeddings={total}" if usable != total else f"max_position_embeddings={total}"
        raise ConfigError(f"{key}={length} exceeds the model's {usable} positions ({detail}); set {key}<={usable}")


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a probe file into it (permissions bits alone lie to root)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".dapt_write_probe."):
            pass
    except OSError as exc:
        raise ConfigError(f"output directory {directory} is not writable ({exc.strerror or type(exc).__name__}); "
                          "set paths.output_dir to a writable folder") from None


def parameter_count(config: Any) -> int:
    """Parameters of the masked-LM built from ``config``, counted on the ``meta`` device (no memory)."""
    import torch
    from transformers import AutoModelForMaskedLM

    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_free_disk(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConfigError(f"not enough free disk in {directory}: the model needs about {needed:,} bytes "
                          f"(parameters x {BYTES_PER_PARAMETER} bytes x {COPIES_ON_DISK} copies), {free:,} free")
