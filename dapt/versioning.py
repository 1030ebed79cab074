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
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
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


def files_digest(paths: list[Path]) -> str:
    """SHA-256 over the names and full contents of ``paths`` (weights, data files): content, not size."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return files_digest([Path(path)])


def file_digest(path: str | Path) -> str:
    """SHA-256 of one file's contents, memoised per process on (path, size, mtime)."""
    stat = Path(path).stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _dir_digest(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    return files_digest([Path(path) / name for name, _, _ in stamp])


def directory_digest(path: str | Path) -> str:
    """Content hash of a checkpoint directory's files (hidden files skipped).

    Memoised per process on (name, size, mtime) stamps, so hashing ~100 MB happens once per run.
    """
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _dir_digest(str(path), stamp)


def source_fingerprint(*objects: Any) -> str:
    """A short hash of the source code of ``objects`` (functions, classes, modules)."""
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(inspect.getsource(obj).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
