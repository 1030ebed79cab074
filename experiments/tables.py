"""Sweep-folder helpers of the experiments' table scripts; the cells themselves live in
``dapt.reporting.cells`` (one copy, shared with ``dapt study``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from dapt.reporting.cells import missing_line, paired_ppl, pct, ppl_cell, provenance_lines, read_job

__all__ = ["missing_line", "paired_ppl", "pct", "ppl_cell", "provenance_lines", "read_job", "sweep_jobs", "sweep_table_main"]


def _job_folders(sweep: Path) -> list[Path]:
    """A Hydra sweep's numbered job dirs in job order, or a ``dapt study`` folder's arm runs
    (``<arm>/run``, arms by name), so that a study's arms can be tabulated like a sweep's jobs."""
    if not sweep.is_dir():
        raise SystemExit(f"{sweep}: not a folder")
    numbered = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    found = numbered or sorted(p / "run" for p in sweep.iterdir() if (p / "arm.json").is_file())
    if not found:
        raise SystemExit(f"{sweep}: neither a sweep folder (numbered job dirs) nor a dapt study folder (<arm>/arm.json)")
    return found


def sweep_jobs(sweeps: list[Path]) -> tuple[list[dict[str, Any]], list[Path]]:
    """The finished jobs of Hydra sweep folders (numbered job dirs, in job order) or study folders
    (arm runs), and the unfinished ones."""
    jobs, missing = [], []
    for sweep in sweeps:
        for folder in _job_folders(sweep):
            job = read_job(folder)
            (jobs.append(job) if job else missing.append(folder))
    return jobs, missing


def sweep_table_main(table: Callable[[list[Path]], str], usage: str, argv: list[str] | None = None) -> int:
    """``python -m experiments.<study>.table <sweep dir> [more]``: print ``table`` of the sweep folders,
    or ``usage`` (the module docstring) without arguments."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(usage)
        return 2
    print(table([Path(a) for a in args]))
    return 0
