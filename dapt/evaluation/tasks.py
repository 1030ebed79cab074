"""Downstream task definitions: the ``conf/task/<name>.yaml`` schema and loading a task's splits.

A task file says what the task is (NER or classification), which metric selects the best epoch, how
to read its files and where they are (relative to ``paths.data_dir``, so the same YAML works on every
machine). ``load_task`` returns the three splits with the label set taken from train, and deals
with labels that dev/test have but train lacks (warned about by name, then ignored or an error).
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf

from dapt.config import REPO_ROOT, to_dataclass
from dapt.errors import ConfigError, DataError
from dapt.evaluation.readers import NerExample, TextExample, _shown, read_conll, read_hub, read_jsonl, read_label_tsv

log = logging.getLogger(__name__)

TASK_TYPES = ("ner", "classification")
METRICS = {"ner": ("f1", "precision", "recall"), "classification": ("accuracy", "micro_f1", "macro_f1")}
FORMATS = ("conll", "jsonl", "tsv", "hub")


@dataclass
class ReaderConfig:
    """How to read the task's files.

    Attributes:
        format: ``conll`` (NER), ``jsonl`` or ``tsv`` (``label<TAB>text``), or ``hub`` (``datasets``).
        token_column / label_column: CoNLL column indices (negative counts from the end).
        separator: CoNLL column separator: ``tab``, ``space`` or ``whitespace`` (any run of blanks).
        tag_scheme: ``iob2`` or ``iob1`` (converted to IOB2 on reading; SciERC ships IOB1).
        text_field / label_field: JSONL (or hub) fields; dotted names reach into nested objects.
        tokens_field: hub NER field holding the word list.
        dataset / config_name / revision: hub dataset id, its config and revision (``format: hub``).
    """

    format: str = "conll"
    token_column: int = 0
    label_column: int = -1
    separator: str = "whitespace"
    tag_scheme: str = "iob2"
    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    dataset: Optional[str] = None
    config_name: Optional[str] = None
    revision: Optional[str] = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"task.reader.format={self.format!r}: use one of {', '.join(FORMATS)}")
        if self.separator not in ("tab", "space", "whitespace"):
            raise ConfigError(f"task.reader.separator={self.separator!r}: use tab, space or whitespace")
        if self.tag_scheme not in ("iob1", "iob2"):
            raise ConfigError(f"task.reader.tag_scheme={self.tag_scheme!r}: use iob1 or iob2")
        if self.format == "hub" and not self.dataset:
            raise ConfigError("task.reader.dataset is required when task.reader.format=hub")


@dataclass
class TaskConfig:
    """One downstream task (``conf/task/<name>.yaml``).

    Attributes:
        name: the task's name (results, cache keys and W&B keys use it).
        type: ``ner`` (token classification) or ``classification`` (one label per text).
        metric: primary test metric, also used on dev to pick the best epoch and for early stopping.
        train / dev / test: file paths relative to ``paths.data_dir`` (or absolute); for
            ``reader.format=hub`` the split names. ``dev: null`` carves ``dev_fraction`` of train.
        dev_fraction / split_seed: the carved dev split (fixed seed: every model sees the same one).
        unseen_labels: what to do with a dev/test label that train lacks: ``ignore`` (warn naming it;
            classification examples with it are dropped, NER tags of that type become ``O``) or ``error``.
    """

    name: str = MISSING
    type: str = MISSING
    metric: str = MISSING
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    train: str = MISSING
    dev: Optional[str] = None
    test: str = MISSING
    dev_fraction: float = 0.1
    split_seed: int = 13
    unseen_labels: str = "ignore"
    description: str = ""

    def __post_init__(self) -> None:
        if self.type not in TASK_TYPES:
            raise ConfigError(f"task {self.name}: type={self.type!r}, use one of {', '.join(TASK_TYPES)}")
        if self.metric not in METRICS[self.type]:
            raise ConfigError(f"task {self.name}: metric={self.metric!r}, a {self.type} task reports {', '.join(METRICS[self.type])}")
        if (self.reader.format == "conll") != (self.type == "ner") and self.reader.format != "hub":
            raise ConfigError(f"task {self.name}: reader.format={self.reader.format} does not fit type={self.type}")
        if self.unseen_labels not in ("ignore", "error"):
            raise ConfigError(f"task {self.name}: unseen_labels={self.unseen_labels!r}, use ignore or error")
        if self.dev is None and not 0.0 < self.dev_fraction < 1.0:
            raise ConfigError(f"task {self.name}: dev is null, so dev_fraction must be in (0, 1), got {self.dev_fraction}")


Example = Union[NerExample, TextExample]


@dataclass
class TaskData:
    """A task's splits after reading, with the train label set and what was noticed on the way."""

    task: TaskConfig
    train: list[Any]
    dev: list[Any]
    test: list[Any]
    labels: list[str]
    notes: list[str] = field(default_factory=list)


def task_dir() -> Path:
    """``conf/task`` of the active config dir (``$DAPT_CONFIG_DIR`` or the repo's ``conf/``)."""
    env = os.environ.get("DAPT_CONFIG_DIR")
    return (Path(env) if env else REPO_ROOT / "conf") / "task"


def available_tasks() -> list[str]:
    directory = task_dir()
    return sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []


def resolve_task(spec: str | Mapping[str, Any] | DictConfig | TaskConfig) -> TaskConfig:
    """A task name (``conf/task/<name>.yaml``), an inline mapping, or a ``TaskConfig``, validated."""
    if isinstance(spec, TaskConfig):
        return spec
    if isinstance(spec, str):
        path = task_dir() / f"{spec}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown task '{spec}' (no {path}); available tasks: {', '.join(available_tasks()) or 'none'}")
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        data.setdefault("name", spec)  # type: ignore[union-attr]
        return to_dataclass(TaskConfig, data, prefix=f"task.{spec}")
    if isinstance(spec, (Mapping, DictConfig)):
        name = spec.get("name", "?")
        return to_dataclass(TaskConfig, spec, prefix=f"task.{name}")
    raise ConfigError(f"a task must be a name or a mapping, got {type(spec).__name__}")


def _read_split(task: TaskConfig, split: str, location: str, data_dir: Path) -> list[Any]:
    reader = task.reader
    if reader.format == "hub":
        return read_hub(
            reader.dataset or "",
            location,
            config_name=reader.config_name,
            revision=reader.revision,
            kind=task.type,
            text_field=reader.text_field,
            label_field=reader.label_field,
            tokens_field=reader.tokens_field,
        )
    path = Path(location).expanduser()
    if not path.is_absolute():
        path = data_dir / path
    if not path.is_file():
        raise DataError(f"task {task.name}: {split} file not found: {path} (is DAPT_DATA_DIR / paths.data_dir right?)")
    if reader.format == "conll":
        return read_conll(
            path,
            token_column=reader.token_column,
            label_column=reader.label_column,
            separator=reader.separator,
            tag_scheme=reader.tag_scheme,
        )
    if reader.format == "jsonl":
        return read_jsonl(path, text_field=reader.text_field, label_field=reader.label_field)
    return read_label_tsv(path)


def entity_type(tag: str) -> str | None:
    return None if tag == "O" else tag[2:]


def _ner_labels(train: list[NerExample]) -> list[str]:
    types = sorted({t for ex in train for tag in ex.tags if (t := entity_type(tag))})
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def _report_unseen(task: TaskConfig, split: str, unseen: dict[str, int], what: str, unit: str, action: str,
                   notes: list[str]) -> bool:
    """Warn about (by name, with counts) or refuse labels of ``split`` that train lacks. True if any."""
    if not unseen:
        return False
    listed = ", ".join(f"{_shown(k)} ({v} {unit})" for k, v in sorted(unseen.items()))
    if task.unseen_labels == "error":
        raise DataError(f"task {task.name}: {split} has {what} unseen in train: {listed}")
    msg = f"task {task.name}: {split} has {what} unseen in train, {action}: {listed}"
    log.warning(msg)
    notes.append(msg)
    return True


def _handle_unseen(task: TaskConfig, split: str, examples: list[Any], labels: list[str], notes: list[str]) -> list[Any]:
    """Warn about (by name) and ignore dev/test labels that train lacks, or fail if configured so."""
    unseen: dict[str, int] = {}
    if task.type == "ner":
        known = {entity_type(t) for t in labels} - {None}
        for ex in examples:
            for tag in ex.tags:
                t = entity_type(tag)
                if t is not None and t not in known and tag.startswith("B-"):
                    unseen[t] = unseen.get(t, 0) + 1
        if not _report_unseen(task, split, unseen, "entity types", "entities", "tagged O (not scored)", notes):
            return examples
        return [NerExample(ex.tokens, tuple(t if entity_type(t) in known or t == "O" else "O" for t in ex.tags)) for ex in examples]
    known_labels = set(labels)
    for ex in examples:
        if ex.label not in known_labels:
            unseen[ex.label] = unseen.get(ex.label, 0) + 1
    if not _report_unseen(task, split, unseen, "labels", "examples", "examples dropped", notes):
        return examples
    return [ex for ex in examples if ex.label in known_labels]


def _check_scorable(task: TaskConfig, splits: dict[str, list[Any]]) -> None:
    """Refuse splits that would be scored without measuring anything.

    An NER test split without a single entity of a type train knows has F1 0 for every model (reported
    as 0.000 +- 0.000, which reads like a result); a classification split whose texts are all empty
    is scored on the label prior alone.
    """
    if task.type == "ner":
        if not any(tag != "O" for ex in splits["test"] for tag in ex.tags):
            raise DataError(f"task {task.name}: test split ({task.test}) has no entity of a type seen in train "
                            "(only O tags): there is nothing to score")
        return
    for split, examples in splits.items():
        if not any(ex.text.strip() for ex in examples):
            location = getattr(task, split) or "carved from train"
            raise DataError(f"task {task.name}: every text in the {split} split ({location}) is empty: wrong text_field?")


def carve_dev(task: TaskConfig, train: list[Any]) -> tuple[list[Any], list[Any]]:
    """(train, dev) of a task without a dev file: ``dev_fraction`` of train held out as dev.

    A fixed shuffle (``split_seed``), independent of the fine-tuning seed: every model and seed is
    selected on the same dev examples, so the seed spread measures fine-tuning noise only.
    """
    order = list(range(len(train)))
    random.Random(task.split_seed).shuffle(order)
    n_dev = max(1, int(round(len(train) * task.dev_fraction)))
    return [train[i] for i in sorted(order[n_dev:])], [train[i] for i in sorted(order[:n_dev])]


def read_train_split(task: TaskConfig, data_dir: str | Path) -> list[Any]:
    """The examples fine-tuning trains on, read without opening the dev or test files: the train split,
    less the dev examples ``carve_dev`` holds out of it when the task has no dev file."""
    train = _read_split(task, "train", task.train, Path(data_dir).expanduser())
    return carve_dev(task, train)[0] if task.dev is None else train


def load_task(task: TaskConfig, data_dir: str | Path) -> TaskData:
    """Read train/dev/test, take the label set from train and reconcile dev/test with it."""
    data_dir = Path(data_dir).expanduser()
    notes: list[str] = []
    train = _read_split(task, "train", task.train, data_dir)
    if task.dev is None:
        train, dev = carve_dev(task, train)
        notes.append(f"task {task.name}: no dev split, {len(dev)} train examples held out as dev (seed {task.split_seed})")
    else:
        dev = _read_split(task, "dev", task.dev, data_dir)
    test = _read_split(task, "test", task.test, data_dir)
    for split, examples, location in (("train", train, task.train), ("dev", dev, task.dev), ("test", test, task.test)):
        if not examples:
            raise DataError(f"task {task.name}: {split} split is empty ({location or 'carved from train'})")
    if task.type == "ner":
        labels = _ner_labels(train)
        if labels == ["O"]:
            raise DataError(f"task {task.name}: train has no entities (only O tags): wrong label_column?")
    else:
        labels = sorted({ex.label for ex in train})
        if len(labels) < 2:
            raise DataError(f"task {task.name}: train has a single label {labels}: wrong label_field?")
    dev = _handle_unseen(task, "dev", dev, labels, notes)
    test = _handle_unseen(task, "test", test, labels, notes)
    for split, examples in (("dev", dev), ("test", test)):
        if not examples:
            raise DataError(f"task {task.name}: {split} split is empty after dropping labels unseen in train")
    _check_scorable(task, {"train": train, "dev": dev, "test": test})
    if task.type == "classification":
        for split, examples in (("dev", dev), ("test", test)):
            missing = sorted(set(labels) - {ex.label for ex in examples})
            if missing:
                msg = f"task {task.name}: {split} has no example of train label(s) {', '.join(missing)}"
                log.info(msg)
                notes.append(msg)
    return TaskData(task=task, train=train, dev=dev, test=test, labels=labels, notes=notes)
