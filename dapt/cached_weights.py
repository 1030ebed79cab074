"""Cached models that heal: a damaged cache entry is rebuilt, not served or failed on forever.

The general-MLM base and the control arm are cached as ``save_pretrained`` folders with a marker
file; the marker used to be the only sign of a finished entry, so weights cut short afterwards (a full
disk, a copy interrupted, a bad sync) failed every later run until the user deleted a folder nobody
told them about. Writers now record the SHA-256 of each weight file in the marker
(``weights_digest``); readers call ``intact_marker``, which checks the hashes (or, for a marker
written before hashes were recorded, that the weights can be read at all) and says, in one warning
naming the folder, why an entry is rebuilt. What is recorded in a marker never enters a cache key.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
DIGEST_KEY = "weights_sha256"


def weight_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))


def weights_digest(directory: str | Path) -> dict[str, str]:
    """``{file name: sha256}`` of a saved model's weight files (what a marker records)."""
    from dapt.versioning import file_digest

    return {p.name: file_digest(p) for p in weight_files(directory)}


def _unreadable(path: Path) -> str | None:
    """Why a weight file cannot be loaded, or None (markers older than the recorded hashes)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))
        else:
            import torch

            torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the entry must be rebuilt
        return f"{path.name} cannot be read ({type(exc).__name__})"
    return None


def damage(directory: str | Path, recorded: dict[str, str] | None) -> str | None:
    """Why the weights in ``directory`` cannot be trusted (None when they can)."""
    files = weight_files(directory)
    if not files:
        return "no weight file"
    if recorded is None:
        return next((problem for p in files if (problem := _unreadable(p))), None)
    actual = weights_digest(directory)
    changed = sorted(name for name in set(actual) | set(recorded) if actual.get(name) != recorded.get(name))
    return f"{', '.join(changed)} differ from the content hash recorded when it was written" if changed else None


def intact_marker(directory: str | Path, marker: str, what: str) -> dict[str, Any] | None:
    """The marker of a finished, undamaged cache entry, else None (with a warning when damaged).

    None without a warning means there is no entry yet; after a warning the caller builds the entry
    again and its atomic save replaces the damaged folder.
    """
    path = Path(directory) / marker
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        problem: str | None = f"{marker} is unreadable ({type(exc).__name__})"
    else:
        recorded = info.get(DIGEST_KEY)
        problem = damage(directory, recorded if isinstance(recorded, dict) else None)
    if problem is None:
        return info
    log.warning("cached %s %s is damaged (%s): rebuilding it", what, directory, problem)
    return None
