"""Read W&B offline run files (``wandb/offline-run-*/run-<id>.wandb``) without uploading them.

wandb 0.17 and later (tests/test_wandb_offline.py reads a run of the installed one) keep an offline
run only in this binary log, meant for ``wandb sync``; there is no ``wandb-summary.json`` and the
package has no public reader. The file is a LevelDB-style
log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB blocks of chunks, each with a
7-byte header (crc32, length, type: full/first/middle/last); the chunks of one record hold one
``wandb.proto.wandb_internal_pb2.Record``. ``read_offline_run`` decodes the run record (project,
group, job type, tags, name), config, history rows and the final summary, which is enough for tests
and for ``dapt compare`` when a run has no CSV log.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline W&B run recorded."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    group: str = ""
    job_type: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def iter_records(path: str | Path) -> Iterator[bytes]:
    """The serialized ``Record`` messages of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size or data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size
        chunk = data[pos:pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            continue


def _value(item: Any) -> tuple[str, Any]:
    key = item.key or "/".join(item.nested_key)
    try:
        value = json.loads(item.value_json)
    except (ValueError, TypeError):
        value = item.value_json
    return key, value


def read_offline_run(path: str | Path) -> OfflineRun:
    """Decode one ``run-*.wandb`` file (or the ``offline-run-*`` folder holding it)."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("run-*.wandb"))
        if not files:
            raise ValueError(f"{path}: no run-*.wandb file")
        path = files[0]
    run = OfflineRun(path=path)
    for raw in iter_records(path):
        record = pb.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a torn last record of a killed run
            continue
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.group, run.job_type, run.name = r.run_group, r.job_type, r.display_name
            run.tags = list(r.tags)
            run.config.update(dict(_value(i) for i in r.config.update))
        elif kind == "config":
            run.config.update(dict(_value(i) for i in record.config.update))
        elif kind == "history":
            run.history.append(dict(_value(i) for i in record.history.item))
        elif kind == "summary":
            run.summary.update(dict(_value(i) for i in record.summary.update))
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(run_dir: str | Path) -> list[Path]:
    """The ``run-*.wandb`` files under ``<run_dir>/wandb/``."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
