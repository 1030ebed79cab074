"""Fuzz of the downstream task readers (issue #12): a malformed task file fails with dapt's one-line
``DataError`` naming the file (and the line where the reader knows it), never a library traceback.

Files are built from valid lines mixed with malformed ones (wrong column counts, bad IOB tags, empty
fields, non-UTF-8 and NUL bytes, very long lines, blank-line runs, unicode whitespace and line
separators, JSON that is not an object, missing/null/non-string fields, absurd nesting). Each read
either returns examples that keep the readers' invariants or raises a ``DaptError``; any other
exception fails the test.
"""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from dapt.errors import DaptError
from dapt.evaluation.readers import NerExample, TextExample, read_conll, read_jsonl, read_label_tsv

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Characters that are whitespace or line boundaries somewhere (str.split, str.splitlines, text-mode
# newlines): a message containing one of the latter is not one line for a terminal or a log parser.
ODD_CHARS = "\t \u00a0\u2003\u3000\x0b\x0c\x1c\x1d\x1e\x1f\x85\u2028\u2029\ufeff\x00\r"
_odd_text = st.text(alphabet=st.sampled_from(ODD_CHARS) | st.characters(codec="utf-8"), max_size=12)
_word = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)


def _one_line(message: str) -> bool:
    return len(message.splitlines()) <= 1 and "\n" not in message and "\r" not in message


def _check_error(err: DaptError, path: Path, *, line_known: bool = True) -> None:
    message = str(err)
    assert _one_line(message), f"multi-line error: {message!r}"
    assert str(path) in message, f"error does not name the file: {message!r}"
    if line_known and "not found" not in message:
        assert re.search(re.escape(str(path)) + r":\d+", message), f"error has no line number: {message!r}"
    message.encode("utf-8")  # printable by the CLI (no lone surrogates from the file's bytes)


@contextmanager
def _written(lines: list[bytes], name: str) -> Iterator[Path]:
    """A fresh directory per example (removed afterwards) holding ``name`` with ``lines``."""
    with tempfile.TemporaryDirectory(prefix="dapt-reader-fuzz-") as directory:
        path = Path(directory) / name
        path.write_bytes(b"".join(lines))
        yield path


# ------------------------------------------------------------------------------ CoNLL

_tags = st.sampled_from(["O", "B-Disease", "I-Disease", "B-Chemical", "I-Chemical"])
_bad_tags = st.sampled_from(["X-Disease", "B-", "I-", "b-Disease", "", "B_Disease", "O-", "I-\u2028x",
                             "B-a\x0bb", "B-\x85", "B-x\u2029", "B-\x1c", "0", "B-Disease\x00"])
_conll_sep = st.sampled_from([" ", "\t", "  ", " \t", "\u00a0", "\u3000"])


@st.composite
def _conll_line(draw) -> bytes:
    kind = draw(st.integers(0, 11))
    sep = draw(_conll_sep)
    if kind <= 4:  # a valid two-column token line
        token = (draw(_word).split() or ["w"])[0]
        return f"{token}{sep}{draw(_tags)}\n".encode()
    if kind == 5:  # blank-line runs, possibly of unicode whitespace
        return draw(st.sampled_from(["\n", "\n\n\n", " \n", "\t\n", "\u3000\n", "\r\n", "\r"])).encode()
    if kind == 6:  # wrong column count
        cols = draw(st.lists(_word, min_size=0, max_size=5))
        return (sep.join(cols) + "\n").encode()
    if kind == 7:  # a bad IOB tag
        return f"word{sep}{draw(_bad_tags)}\n".encode()
    if kind == 8:  # raw bytes: non-UTF-8, NUL, lone CR
        return draw(st.binary(max_size=30)) + b"\n"
    if kind == 9:  # very long line
        return b"w" * draw(st.integers(1000, 70000)) + b" O\n"
    if kind == 10:  # unicode whitespace / line separators inside columns
        return f"{draw(_odd_text)}{sep}{draw(_odd_text)}\n".encode("utf-8", "surrogatepass")
    return draw(st.sampled_from([b"-DOCSTART- -X- O O\n", b"-DOCSTART-\n", b"\xef\xbb\xbfword O\n",
                                 b"word\tO\tO\n", b"\tO\n", b"word\t\n", b"\xff\xfe O\n", b"a\x00b O\n"]))


_conll_options = st.fixed_dictionaries({
    "separator": st.sampled_from(["whitespace", "space", "tab"]),
    "tag_scheme": st.sampled_from(["iob1", "iob2"]),
    "token_column": st.sampled_from([0, 1, -2, 3]),
    "label_column": st.sampled_from([-1, 1, 2, -5]),
})


@FUZZ
@given(lines=st.lists(_conll_line(), max_size=30), options=_conll_options)
@example(lines=[b"caf\xe9 O\n"], options={"separator": "whitespace", "tag_scheme": "iob2", "token_column": 0, "label_column": -1})
@example(lines=[b"word\tB-a\x0bb\n"], options={"separator": "tab", "tag_scheme": "iob2", "token_column": 0, "label_column": -1})
@example(lines=[b"word\tX\x0bY\n"], options={"separator": "tab", "tag_scheme": "iob2", "token_column": 0, "label_column": -1})
@example(lines=[b"O\tI-Disease\n", b"a O\n", b"b I-Disease\n"], options={"separator": "whitespace", "tag_scheme": "iob1", "token_column": 0, "label_column": -1})
def test_fuzzed_conll_reads_or_fails_with_a_one_line_data_error(lines, options):
    with _written(lines, "fuzz.conll") as path:
        try:
            sentences = read_conll(path, **options)
        except DaptError as err:
            _check_error(err, path)
            return
    for sentence in sentences:
        assert isinstance(sentence, NerExample)
        assert sentence.tokens and len(sentence.tokens) == len(sentence.tags)
        assert all(isinstance(t, str) and t for t in sentence.tokens)
        for position, tag in enumerate(sentence.tags):
            assert tag == "O" or (len(tag) > 2 and tag[:2] in ("B-", "I-")), tag
            if options["tag_scheme"] == "iob1" and tag.startswith("I-"):  # IOB2 out: I- continues its type
                assert position > 0 and sentence.tags[position - 1][2:] == tag[2:], sentence.tags


# ------------------------------------------------------------------------------ JSONL

_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12) | _odd_text
_json_values = st.recursive(
    _json_leaf,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["text", "label", "meta", "x", "a\nb", "\u2028", "\udc80"]), children, max_size=3),
    max_leaves=8,
)


@st.composite
def _jsonl_line(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind <= 3:  # valid record (label may be an int, as shipped datasets have)
        record = {"text": draw(st.text(max_size=30)), "label": draw(st.sampled_from(["pos", "neg", 0, 1]))}
        if draw(st.booleans()):
            record["meta"] = {"label": draw(st.sampled_from(["a", "b"]))}
        return json.dumps(record, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass") + b"\n"
    if kind == 4:  # any JSON value: not an object, missing / null / non-string fields, odd keys
        return json.dumps(draw(_json_values)).encode() + b"\n"
    if kind == 5:  # raw bytes: non-UTF-8, NUL
        return draw(st.binary(max_size=40)).replace(b"\n", b" ") + b"\n"
    if kind == 6:  # very long or absurdly nested lines
        return draw(st.sampled_from([b"[" * 100000, b"{\"text\": " * 50000, b"9" * 5000,
                                     b'{"text": "' + b"x" * 100000 + b'", "label": "a"}'])) + b"\n"
    if kind == 7:  # blank-line runs and unicode whitespace
        return draw(st.sampled_from(["\n", "\n\n\n", "\u3000\n", "\u2028\n", "\x0c\n", "\r"])).encode()
    if kind == 8:  # broken JSON
        return draw(st.sampled_from([b'{"text": "a", "label":}\n', b'{"text": "a"\n', b"NaN\n", b"\xef\xbb\xbf{}\n",
                                     b'{"text": "a\x00", "label": "b"}\n', b'{"text": "\xff", "label": "b"}\n',
                                     b'{"text": "\\ud800", "label": "b"}\n', b"'text'\n"]))
    return json.dumps(draw(_json_values)).encode("utf-8", "surrogatepass") + b"\n"


@FUZZ
@given(lines=st.lists(_jsonl_line(), max_size=20),
       fields=st.sampled_from([("text", "label"), ("text", "meta.label"), ("meta.text", "label"), ("x", "a\nb")]))
@example(lines=[b'{"text": "\xff", "label": "b"}\n'], fields=("text", "label"))
@example(lines=[b"[" * 100000 + b"\n"], fields=("text", "label"))
@example(lines=[b'{"a\\nb": 1, "\\u2028": 2}\n'], fields=("text", "label"))
@example(lines=[b'{"text": "t", "label": null}\n'], fields=("text", "label"))
def test_fuzzed_jsonl_reads_or_fails_with_a_one_line_data_error(lines, fields):
    text_field, label_field = fields
    with _written(lines, "fuzz.jsonl") as path:
        try:
            examples = read_jsonl(path, text_field=text_field, label_field=label_field)
        except DaptError as err:
            _check_error(err, path)
            return
    for ex in examples:
        assert isinstance(ex, TextExample) and isinstance(ex.text, str) and isinstance(ex.label, str)


# ------------------------------------------------------------------------------ TSV

@st.composite
def _tsv_line(draw) -> bytes:
    kind = draw(st.integers(0, 8))
    if kind <= 3:  # valid label<TAB>text (tabs inside the text are kept)
        return f"{draw(st.sampled_from(['earn', 'acq', 'crude']))}\t{draw(st.text(max_size=30)).replace(chr(10), ' ').replace(chr(13), ' ')}\n".encode("utf-8", "surrogatepass")
    if kind == 4:  # no tab, empty label, empty text
        return draw(st.sampled_from([b"earn only\n", b"\ttext\n", b" \ttext\n", b"earn\t\n", b"\t\n", b"\u3000\ttext\n"]))
    if kind == 5:  # raw bytes: non-UTF-8, NUL
        return draw(st.binary(max_size=40)) + b"\n"
    if kind == 6:  # very long line
        return b"earn\t" + b"x" * draw(st.integers(1000, 70000)) + b"\n"
    if kind == 7:  # unicode whitespace / separators in the label
        return f"{draw(_odd_text)}\t{draw(_odd_text)}\n".encode("utf-8", "surrogatepass")
    return draw(st.sampled_from([b"\n", b"\n\n\n", b"\r", b"\xef\xbb\xbfearn\ttext\n", b"ea\x00rn\ttext\n", b"\xff\tx\n"]))


@FUZZ
@given(lines=st.lists(_tsv_line(), max_size=25))
@example(lines=[b"earn\tcaf\xe9\n"])
def test_fuzzed_tsv_reads_or_fails_with_a_one_line_data_error(lines):
    with _written(lines, "fuzz.tsv") as path:
        try:
            examples = read_label_tsv(path)
        except DaptError as err:
            _check_error(err, path)
            return
    for ex in examples:
        assert isinstance(ex, TextExample) and isinstance(ex.text, str) and isinstance(ex.label, str)
        assert ex.label and ex.label == ex.label.strip()


# ------------------------------------------------------------------------------ load_task


@FUZZ
@given(fmt=st.sampled_from(["conll", "jsonl", "tsv"]), data=st.data(),
       unseen=st.sampled_from(["ignore", "error"]), carve=st.booleans())
def test_fuzzed_task_files_load_or_fail_with_a_one_line_data_error(fmt, data, unseen, carve):
    from dapt.evaluation.tasks import TaskConfig, load_task, resolve_task

    line = {"conll": _conll_line(), "jsonl": _jsonl_line(), "tsv": _tsv_line()}[fmt]
    contents = {split: data.draw(st.lists(line, max_size=15), label=split) for split in ("train", "dev", "test")}
    names = {split: f"{split}.{fmt}" for split in contents}
    spec = {
        "name": "fuzz", "type": "ner" if fmt == "conll" else "classification",
        "metric": "f1" if fmt == "conll" else "accuracy", "reader": {"format": fmt},
        "train": names["train"], "dev": None if carve else names["dev"], "test": names["test"],
        "unseen_labels": unseen,
    }
    task = resolve_task(spec)
    assert isinstance(task, TaskConfig)
    with tempfile.TemporaryDirectory(prefix="dapt-task-fuzz-") as directory:
        for split, lines in contents.items():
            (Path(directory) / names[split]).write_bytes(b"".join(lines))
        try:
            loaded = load_task(task, directory)
        except DaptError as err:
            message = str(err)
            assert _one_line(message), f"multi-line error: {message!r}"
            assert "task fuzz" in message or str(Path(directory)) in message, message  # the task, or the file
            message.encode("utf-8")
            return
    assert loaded.train and loaded.dev and loaded.test and all(isinstance(label, str) for label in loaded.labels)
    for split in (loaded.train, loaded.dev, loaded.test):
        for ex in split:
            if fmt == "conll":
                assert len(ex.tokens) == len(ex.tags)
                assert {t for t in ex.tags if not t.startswith("I-")} <= set(loaded.labels), ex.tags
            else:
                assert isinstance(ex.label, str)


@pytest.mark.parametrize("fmt, train, test", [
    ("tsv", b"a\tx\nb\ty\n", b"c\x0bd\tx\na\tz\n"),  # a label with a vertical tab (a line break for splitlines)
    ("conll", b"a\tB-X\n", b"a\tB-X\n\nb\tB-\x1cY\n"),  # an entity type with a file separator
])
def test_unseen_label_errors_stay_one_line(tmp_path, fmt, train, test):
    from dapt.evaluation.tasks import load_task, resolve_task

    (tmp_path / f"train.{fmt}").write_bytes(train)
    (tmp_path / f"test.{fmt}").write_bytes(test)
    task = resolve_task({"name": "fuzz", "type": "ner" if fmt == "conll" else "classification",
                         "metric": "f1" if fmt == "conll" else "accuracy",
                         "reader": {"format": fmt, "separator": "tab"} if fmt == "conll" else {"format": fmt},
                         "train": f"train.{fmt}", "dev": f"train.{fmt}", "test": f"test.{fmt}", "unseen_labels": "error"})
    with pytest.raises(DaptError, match="unseen in train") as info:
        load_task(task, tmp_path)
    assert _one_line(str(info.value)), repr(str(info.value))


def test_jsonl_label_must_be_a_scalar(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": "neg"}\n', encoding="utf-8")
    assert [ex.label for ex in read_jsonl(path)] == ["0", "neg"]  # numbers stay accepted, as strings
    for bad, found in (("null", "null"), ("[1]", "list"), ('{"x": 1}', "dict")):
        path.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": %s}\n' % bad, encoding="utf-8")
        with pytest.raises(DaptError, match=rf"labels.jsonl:2: field 'label' is {found}, not a label"):
            read_jsonl(path)


def test_non_utf8_byte_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_bytes(b"-DOCSTART- O\n\nword O\ncaf\xe9 B-Disease\n")
    with pytest.raises(DaptError, match=r"bad.conll:4: not UTF-8 text \(byte 0xe9 at column 4\)"):
        read_conll(path)


def test_unreadable_or_odd_paths_are_one_line_data_errors(tmp_path):
    for reader in (read_conll, read_jsonl, read_label_tsv):
        for path in (tmp_path / "missing.txt", tmp_path):  # absent, a directory
            with pytest.raises(DaptError) as info:
                reader(path)
            _check_error(info.value, path, line_known=False)
