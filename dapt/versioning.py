"""What a cached result depends on besides its inputs: the code that made it and the libraries.

Caches (the general-MLM base, the control arm, base-model downstream scores) key on content hashes
of weights and data, on a hand-bumped recipe version, and on the versions of the libraries that
compute the numbers. ``source_fingerprint`` hashes the source text of the functions that make up a
recipe; a test pins each fingerprint next to its recipe version, so editing the recipe's code without
bumping the version fails the suite instead of silently serving stale cached numbers.
"""

from __future__ import annotations

import hashlib
import inspect
from importlib import metadata
from typing import Any

LIBRARIES = ("torch", "transformers", "pytorch-lightning", "tokenizers", "dapt")


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed versions of the libraries that compute a cached number (None when absent)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def source_fingerprint(*objects: Any) -> str:
    """A short hash of the source code of ``objects`` (functions, classes, modules)."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(inspect.getsource(obj).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
