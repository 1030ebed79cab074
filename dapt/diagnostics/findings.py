"""A diagnosis is a ranked list of findings; each says what was measured, against which threshold and
why that threshold, how serious it is, and which config overrides to try next.

``dapt doctor`` writes them to the terminal, to Markdown and to ``doctor.json`` (schema below, version
``SCHEMA_VERSION``), for a corpus (before training) and for finished runs and sweeps (after).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1
SEVERITIES = ("error", "warning", "info", "ok")  # most to least serious; "ok": the check ran and passed


@dataclass
class Finding:
    """One check's outcome.

    Attributes:
        check: stable identifier (``corpus.near_duplicates``, ``run.forgetting_vs_control``...).
        severity: one of ``SEVERITIES``.
        title: one line a researcher reads first.
        measured: the numbers the check computed (JSON scalars / small lists).
        threshold: the value that triggers it, and ``why`` that value (source or reasoning).
        overrides: concrete ``dapt train`` overrides to try (``remedy=replay``, ``trainer.max_steps=2000``).
        scope: what was checked (a run dir, a task, a corpus source), for sweep reports.
    """

    check: str
    severity: str
    title: str
    measured: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    overrides: list[str] = field(default_factory=list)
    scope: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding.severity={self.severity!r}: one of {', '.join(SEVERITIES)}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranked(findings: list[Finding]) -> list[Finding]:
    """Most serious first; stable within a severity (checks keep their order)."""
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
