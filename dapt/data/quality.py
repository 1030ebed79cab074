"""Record accounting for corpus readers: what was read, what was skipped and why, and when to stop.

Why this module exists: a reader that silently drops records hides broken data (90% of a corpus with
``text: null`` trained "successfully" on the other 10%), and a reader that raises on the first bad
line throws away hours of compute for one stray line. So every reader counts records, documents and
skipped records by reason in a ``ReadStats``; a few bad records are a warning naming ``file:line``,
and a source whose bad-record fraction exceeds ``QualityPolicy.max_bad_fraction`` (once it has at
least ``min_bad_records`` bad ones) stops with one ``DataError`` naming the source and its first bad
record. ``ReadStats`` also decodes bytes (replacing and counting undecodable ones) and detects binary
files, so all the per-record bookkeeping lives in one place.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Reasons a record yields no document. "undecodable" records are kept (bytes replaced with U+FFFD)
# but count as bad: a corpus full of them is almost certainly in the wrong encoding.
SKIP_REASONS = ("malformed_json", "no_text", "not_string", "empty")
BAD_REASONS = SKIP_REASONS + ("undecodable",)
WARN_FIRST = 3  # bad records per source that get their own warning line
SNIFF_BYTES = 8192

# Magic numbers of binary formats that end up in corpus directories by mistake.
_MAGIC = {
    b"\x1f\x8b": "gzip data",
    b"\x89PNG": "PNG image",
    b"PK\x03\x04": "zip archive",
    b"BZh": "bzip2 data",
    b"\xfd7zXZ\x00": "xz data",
    b"\x28\xb5\x2f\xfd": "zstd data",
    b"%PDF-": "PDF document",
    b"\xff\xd8\xff": "JPEG image",
    b"PAR1": "Parquet file (use type: parquet)",
}


@dataclass(frozen=True)
class QualityPolicy:
    """When bad records stop a run.

    A source fails when ``bad / records > max_bad_fraction`` and ``bad >= min_bad_records``: the
    minimum keeps one bad line in a ten-record corpus (10%) a warning, while 90% of ``text: null``
    fails as soon as ``min_bad_records`` of them have been read.
    """

    max_bad_fraction: float = 0.01
    min_bad_records: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction={self.max_bad_fraction} must be in [0, 1]")
        if self.min_bad_records < 1:
            raise ConfigError(f"data.min_bad_records={self.min_bad_records} must be >= 1")


def sniff_binary(head: bytes) -> str | None:
    """What binary format ``head`` (a file's first bytes) is, or None when it may be text.

    Magic numbers first (gzip, PNG, ...), then NUL bytes: UTF-8 text never contains NUL, binary
    files almost always do within their first few kilobytes (git uses the same rule).
    """
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return what
    if b"\x00" in head:
        return "NUL bytes (binary, or UTF-16/32 text)"
    return None


def check_text_file(path: Path) -> None:
    """Raise ``DataError`` when ``path``, read as a text/JSONL corpus, is a binary file."""
    with path.open("rb") as fh:
        what = sniff_binary(fh.read(SNIFF_BYTES))
    if what is not None:
        raise DataError(f"{path}: binary file ({what}), not a UTF-8 text corpus; decompress/convert it or remove it from the source")


@dataclass
class ReadStats:
    """Counts of one source's reads: records, documents yielded, bad records by reason, passes."""

    name: str
    policy: QualityPolicy = field(default_factory=QualityPolicy)
    records: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in SKIP_REASONS})
    undecodable: int = 0
    passes: int = 0
    first_bad: str | None = None

    @property
    def bad(self) -> int:
        return sum(self.skipped.values()) + self.undecodable

    def record(self) -> None:
        """One more record read (a JSONL line, a text line/paragraph/file, a Parquet/HF row)."""
        self.records += 1

    def document(self) -> None:
        self.documents += 1

    @staticmethod
    def decode(raw: bytes) -> tuple[str, bool]:
        """``raw`` as UTF-8 and whether it was valid; undecodable bytes become U+FFFD."""
        try:
            return raw.decode("utf-8"), True
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), False

    def kept_undecodable(self, where: str) -> None:
        """A record kept with U+FFFD replacements: it counts as bad (a corpus full of them is in
        the wrong encoding) but still yields its document."""
        self._bad("undecodable", where, "undecodable bytes, replaced with U+FFFD")

    def skip(self, reason: str, where: str, detail: str) -> None:
        """A record that yields no document: counted, warned about (the first few), maybe fatal."""
        self._bad(reason, where, detail)

    def _bad(self, reason: str, where: str, detail: str) -> None:
        if reason == "undecodable":
            self.undecodable += 1
        else:
            self.skipped[reason] += 1
        if self.first_bad is None:
            self.first_bad = f"{where}: {detail}"
        if self.bad <= WARN_FIRST:
            log.warning("%s: %s (%s)", where, detail, "record kept" if reason == "undecodable" else "record skipped")
        self.check()

    def check(self) -> None:
        """Raise ``DataError`` when the bad-record fraction is over the policy's threshold."""
        bad, records = self.bad, max(self.records, 1)
        if bad >= self.policy.min_bad_records and bad / records > self.policy.max_bad_fraction:
            raise DataError(
                f"source {self.name}: {bad} of {records} records are bad ({self._reasons()}), over "
                f"data.max_bad_fraction={self.policy.max_bad_fraction}; first: {self.first_bad}"
            )

    def finish(self) -> None:
        """End of a read: a source whose every record was bad fails here (too few to hit the minimum)."""
        if self.documents == 0 and self.bad > 0:
            raise DataError(f"source {self.name}: no usable record, {self.bad} bad ({self._reasons()}); first: {self.first_bad}")

    def _reasons(self) -> str:
        counts = {**self.skipped, "undecodable": self.undecodable}
        return ", ".join(f"{k}: {v}" for k, v in counts.items() if v)

    def merge(self, other: "ReadStats") -> None:
        """Add ``other``'s counts (e.g. two shards' reads of one source)."""
        self.records += other.records
        self.documents += other.documents
        self.undecodable += other.undecodable
        self.passes = max(self.passes, other.passes)
        for k, v in other.skipped.items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        self.first_bad = self.first_bad or other.first_bad

    def as_dict(self) -> dict[str, Any]:
        """The JSON form in results.json ``data_quality``."""
        return {
            "records": self.records,
            "documents": self.documents,
            "skipped": dict(self.skipped),
            "undecodable": self.undecodable,
            "passes": self.passes,
            "first_bad": self.first_bad,
        }
