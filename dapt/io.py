"""Atomic file writes: results and checkpoints are never left half-written.

Everything a run persists goes to a temporary sibling first and is moved into place with
``os.replace`` (atomic on POSIX), so a crash or a kill mid-write leaves the previous file intact.
JSON is written strict: a non-finite float (a diverged run's ``inf`` perplexity) becomes ``null``,
because ``Infinity``/``NaN`` are not JSON and most readers (jq, JavaScript, pandas' strict modes)
reject the whole file; ``non_finite_keys`` lists where that happened so writers can flag it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_by_umask(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Give a file/folder made by ``tempfile`` (always 0600/0700) the permissions the user's umask
    asks for, as ``open``/``mkdir`` would have: results and models must be readable by the group
    when the umask says so."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_file(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` with a temporary sibling of ``path``, then move it onto ``path``.

    The one temp-file + ``os.replace`` in dapt: text, JSON, peak caches and checkpoints
    (``write=lambda tmp: torch.save(obj, tmp)``) all go through here. On any error (or a kill
    mid-write) the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        readable_by_umask(tmp)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) atomically, flushed to disk before it replaces ``path``."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write_file(path, write)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _finite_copy(data: Any, where: str, found: list[str]) -> Any:
    if isinstance(data, dict):
        return {k: _finite_copy(v, f"{where}.{k}" if where else str(k), found) for k, v in data.items()}
    if isinstance(data, (list, tuple, set)):
        return [_finite_copy(v, f"{where}[{i}]", found) for i, v in enumerate(data)]
    if hasattr(data, "item") and hasattr(data, "dtype") and getattr(data, "ndim", 0) == 0:
        data = data.item()  # numpy / torch scalar
    if isinstance(data, float) and not math.isfinite(data):
        found.append(where)
        return None
    return data


def json_safe(data: Any) -> tuple[Any, list[str]]:
    """``data`` with every non-finite float replaced by None, and the paths where that happened
    (``a.b[2].c``; dict keys joined by dots, list indices in brackets)."""
    found: list[str] = []
    return _finite_copy(data, "", found), found


def non_finite_keys(data: Any) -> list[str]:
    """Paths in ``data`` whose value is inf or NaN (what ``atomic_write_json`` will write as null)."""
    return json_safe(data)[1]


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON object dapt wrote (results, arm records): {} when the file is absent or half-written,
    since a run that has not finished yet is not an error; any other JSON value there is not dapt's
    and is the user's to fix, so it raises naming the file."""
    from dapt.errors import DaptError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        raise DaptError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as strict JSON (non-finite floats as ``null``), atomically."""
    safe, _ = json_safe(data)
    return atomic_write_text(path, json.dumps(safe, indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n")


def atomic_save_dir(target: str | os.PathLike[str], write: Any) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``target`` (replacing an older one).

    Used for ``save_pretrained`` directories: readers see the old or the new model, never a mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        readable_by_umask(tmp, directory=True)
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def multi_process() -> bool:
    """True inside a multi-process (DDP) job: every rank has ``WORLD_SIZE`` set before training
    (dapt's DDP launcher, torchrun and SLURM all set it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def cache_build_lock(path: str | os.PathLike[str]) -> Any:
    """Lock held while one process builds a cached model (base, control) so that concurrent sweep
    jobs build it once. Under DDP no lock is taken: all ranks must train the model *together*, and a
    lock held by one rank would leave the others waiting while it waits for them in a collective;
    only global rank 0 writes the result, atomically."""
    import contextlib

    from filelock import FileLock

    return contextlib.nullcontext() if multi_process() else FileLock(str(path) + ".lock")

