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


def code_digest() -> str:
    """SHA-256 (16 hex) of every ``dapt/**/*.py`` file: which code computed a result (a run is
    resumed or reused only by the same code)."""
    import dapt

    return files_digest(sorted(Path(dapt.__file__).parent.rglob("*.py")))[:16]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


def git_state(path: Path | None = None) -> dict[str, Any]:
    """``{"commit": <HEAD>, "dirty": <uncommitted changes under dapt/ or conf/>}`` of the checkout
    that holds dapt (None values outside a git checkout, e.g. an installed wheel)."""
    import subprocess

    import dapt

    root = path or Path(dapt.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--", "dapt", "conf")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def provenance() -> dict[str, Any]:
    """Where and with what a result was computed, written into results.json so that a table built
    from several runs can say (and check) that its cells come from the same code: the git commit
    (and whether dapt/ or conf/ had uncommitted changes), the digest of dapt's source, library
    versions, the CPU/GPU, the host and the time."""
    import platform
    import socket
    import time

    import torch

    return {
        **{f"git_{k}": v for k, v in git_state().items()},
        "code_digest": code_digest(),
        "libraries": library_versions(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "host": socket.gethostname(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
