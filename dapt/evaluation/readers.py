"""Readers for downstream task files: CoNLL (NER), JSONL and ``label<TAB>text`` TSV (classification).

Task data comes in the formats its authors shipped (tabs or spaces, 3 or 4 columns, ``-DOCSTART-``
lines, IOB1 or IOB2), so the readers are configured rather than guessed, and every malformed line
fails with ``file:line`` in a one-line ``DataError`` before any model is loaded. Everything comes out
as plain Python (``NerExample`` / ``TextExample``) with IOB2 tags, so encoding and scoring never see
a format quirk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from dapt.errors import DataError

DOCSTART = "-DOCSTART-"


@dataclass(frozen=True)
class NerExample:
    """One sentence: its words and one IOB2 tag per word."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class TextExample:
    """One classification instance: raw text (entity markers kept as text) and its label."""

    text: str
    label: str


# Bytes that are not UTF-8, as ``errors="surrogateescape"`` decodes them (valid UTF-8 never yields these).
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _shown(value: str) -> str:
    """``value`` as is when printable, else escaped (``repr``): a message stays one line, printable."""
    return value if value.isprintable() else repr(value)[1:-1]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; a non-UTF-8 byte or a read error is a ``DataError``.

    Lines are split exactly as ``open(path, encoding="utf-8")`` splits them (universal newlines).
    """
    try:
        with path.open(encoding="utf-8", errors="surrogateescape") as handle:
            for lineno, raw in enumerate(handle, start=1):
                bad = _UNDECODABLE.search(raw)
                if bad is not None:
                    byte = ord(bad.group()) - 0xDC00
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{byte:02x} at column {bad.start() + 1}); "
                                    "re-encode the file as UTF-8")
                yield lineno, raw
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or type(exc).__name__})") from None


def _split_columns(line: str, separator: str) -> list[str]:
    if separator == "tab":
        return line.split("\t")
    if separator in ("space", "whitespace"):
        return line.split()
    raise DataError(f"unknown CoNLL separator '{separator}' (use tab, space or whitespace)")


def _check_tag(tag: str, where: str) -> None:
    if tag != "O" and not (len(tag) > 2 and tag[:2] in ("B-", "I-")):
        raise DataError(f"{where}: tag '{_shown(tag[:60])}' is not O, B-TYPE or I-TYPE (wrong label_column?)")


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """Convert one sentence from IOB1 (``I-`` starts an entity unless it continues one) to IOB2.

    In IOB1 a ``B-`` only separates two adjacent entities of the same type, so every ``I-X`` that
    follows ``O`` or a tag of another type opens an entity and becomes ``B-X``. Already-IOB2 input
    comes out unchanged, so the conversion is safe to apply twice.
    """
    out: list[str] = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            out.append("B-" + tag[2:])
        else:
            out.append(tag)
        prev = tag
    return out


def read_conll(
    path: str | Path,
    *,
    token_column: int = 0,
    label_column: int = -1,
    separator: str = "whitespace",
    tag_scheme: str = "iob2",
) -> list[NerExample]:
    """Read a CoNLL-style file: one token a line, columns split by ``separator``, blank-line sentences.

    ``-DOCSTART-`` lines are document markers, not sentences, and are skipped. The column count of the
    first token line is the file's; a line with another count is malformed (``file:line``). Tags are
    returned in IOB2 (``tag_scheme: iob1`` converts per sentence).
    """
    path = Path(path)
    if tag_scheme not in ("iob1", "iob2"):
        raise DataError(f"{path}: unknown tag_scheme '{tag_scheme}' (use iob1 or iob2)")
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    sentences: list[NerExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    ncols: int | None = None

    def flush() -> None:
        if tokens:
            final = iob1_to_iob2(tags) if tag_scheme == "iob1" else list(tags)
            sentences.append(NerExample(tuple(tokens), tuple(final)))
            tokens.clear()
            tags.clear()

    for lineno, raw in _lines(path):
        line = raw.rstrip("\r\n")
        if not line.strip():
            flush()
            continue
        if line.startswith(DOCSTART):
            flush()
            continue
        cols = _split_columns(line, separator)
        where = f"{path}:{lineno}"
        if ncols is None:
            ncols = len(cols)
            for name, index in (("token_column", token_column), ("label_column", label_column)):
                if not -ncols <= index < ncols:
                    raise DataError(
                        f"{where}: {name}={index} does not exist, lines have {ncols} {separator}-separated columns"
                    )
        elif len(cols) != ncols:
            raise DataError(f"{where}: malformed CoNLL line, expected {ncols} {separator}-separated columns, found {len(cols)}: {line[:60]!r}")
        token, tag = cols[token_column], cols[label_column]
        if not token:
            raise DataError(f"{where}: empty token column")
        _check_tag(tag, where)
        tokens.append(token)
        tags.append(tag)
    flush()
    return sentences


def _get_field(record: dict[str, Any], field: str, where: str) -> Any:
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            keys = ", ".join(_shown(k) for k in sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: field '{_shown(field)}' does not exist (fields: {keys})")
        value = value[part]
    return value


def read_jsonl(path: str | Path, *, text_field: str = "text", label_field: str = "label") -> list[TextExample]:
    """Read one JSON object a line; ``text_field`` / ``label_field`` may be dotted (``meta.label``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    examples: list[TextExample] = []
    for lineno, raw in _lines(path):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, or e.g. an integer over Python's digit limit
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else _shown(str(exc).splitlines()[0])
            raise DataError(f"{where}: invalid JSON ({detail})") from None
        except RecursionError:  # json's recursion limit on absurdly nested arrays/objects
            raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
        text = _get_field(record, text_field, where)
        label = _get_field(record, label_field, where)
        if not isinstance(text, str):
            raise DataError(f"{where}: field '{_shown(text_field)}' is not a string")
        if label is None or isinstance(label, (list, dict)):
            found = "null" if label is None else type(label).__name__
            raise DataError(f"{where}: field '{_shown(label_field)}' is {found}, not a label (string or number)")
        examples.append(TextExample(text=text, label=str(label)))
    return examples


def read_label_tsv(path: str | Path) -> list[TextExample]:
    """Read ``label<TAB>text`` lines (the R8 / text_gcn format); tabs inside the text are kept."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    examples: list[TextExample] = []
    for lineno, raw in _lines(path):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label.strip():
            raise DataError(f"{path}:{lineno}: malformed line, expected label<TAB>text: {line[:60]!r}")
        examples.append(TextExample(text=text, label=label.strip()))
    return examples


def read_hub(
    dataset_id: str,
    split: str,
    *,
    config_name: str | None = None,
    revision: str | None = None,
    kind: str,
    text_field: str = "text",
    label_field: str = "label",
    tokens_field: str = "tokens",
) -> list[NerExample] | list[TextExample]:
    """Read a split of a Hugging Face ``datasets`` dataset (needs internet or the local HF cache).

    Integer labels are turned into names through the split's ``ClassLabel`` features, so a hub task
    is scored exactly like its local file twin.
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError("hub tasks need the 'datasets' package") from exc
    try:
        ds = datasets.load_dataset(dataset_id, config_name, split=split, revision=revision)
    except Exception as exc:  # network, missing split, script datasets: all user-fixable
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"could not load hub dataset '{dataset_id}' split '{split}': {first}") from None
    for field in ((tokens_field, label_field) if kind == "ner" else (text_field, label_field)):
        if field not in ds.column_names:
            raise DataError(f"hub dataset '{dataset_id}' split '{split}': field '{field}' does not exist (fields: {', '.join(ds.column_names)})")

    def names(feature: Any) -> Any:
        inner = getattr(feature, "feature", feature)
        return getattr(inner, "names", None)

    label_names = names(ds.features[label_field])

    def to_name(value: Any) -> str:
        return label_names[value] if label_names is not None and isinstance(value, int) else str(value)

    if kind == "ner":
        out_ner: list[NerExample] = []
        for i, row in enumerate(ds):
            tags = [to_name(t) for t in row[label_field]]
            for tag in tags:
                _check_tag(tag, f"{dataset_id}[{split}][{i}]")
            out_ner.append(NerExample(tuple(row[tokens_field]), tuple(tags)))
        return out_ner
    return [TextExample(text=row[text_field], label=to_name(row[label_field])) for row in ds]
