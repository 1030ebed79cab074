"""What a study is: its arms (``dapt train`` override lists), their seeds, budget and paper numbers.

A study is one YAML file in ``conf/study/`` (or any file passed with ``dapt study --spec``). Each arm
is a complete ``dapt train`` command line: the study's ``common`` overrides, then the arm's own (an
``experiment=`` recipe plus the one thing the arm varies), then whatever the user adds on the command
line (paper scale: ``model=roberta_base trainer=gpu downstream=paper``). Every run trains its own
equal-steps control arm and fine-tunes the start, the control and the adapted model over the same
seeds (``dapt.pipeline``), so the study only has to run arms and read their results.

An arm may ``start`` from another arm's adapted model (DAPT+TAPT continues the DAPT model); the runner
then passes that model as ``model.source``. The file is checked when it is read: an unknown key, a
duplicate or malformed arm name, a ``start`` naming no earlier arm, or a ``reference`` naming no arm
from the base (or two arms naming each other) is a one-line error naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dapt.config import config_dir
from dapt.errors import ConfigError

ARM_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
STUDY_KEYS = {"title", "question", "paper_source", "wall_time", "paper_scale", "gpu_hours", "common", "base_paper",
              "arms", "notes", "readme", "control_label", "guard", "reference"}
ARM_KEYS = {"name", "label", "overrides", "start", "paper", "reference"}


@dataclass(frozen=True)
class Arm:
    """One ``dapt train`` run of a study.

    Attributes:
        name: folder name under the study's output directory (``[a-z0-9_]``, unique in the study).
        label: the row's label in the table (e.g. ``DAPT``; arms sharing a label differ by task).
        overrides: Hydra overrides of this arm, after the study's ``common`` ones.
        start: name of an earlier arm whose adapted model this arm continues (None: the study's start).
        paper: the paper's score per task for this arm, in the paper's units (F1 x 100).
        reference: the arm this one is compared with directly, in place of the study's ``reference``
            (masking_rate: 0.30 mask-only against 0.15 mask-only, because the study-wide 0.15 80/10/10
            scores held-out text with another corruption and answers the other question, scheme vs scheme).
    """

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    start: str | None = None
    paper: dict[str, float] = field(default_factory=dict)
    reference: str | None = None


@dataclass(frozen=True)
class StudySpec:
    """A study: its arms, what it asks, what it costs, and the paper's numbers beside ours.

    Attributes:
        name: the study's name (``dapt study <name>``; the YAML file's stem).
        title, question: what the table answers (first lines of the generated report).
        arms: the runs, in order (an arm's ``start`` always names an earlier arm).
        common: overrides every arm gets first (seeds, budget).
        paper_source: where the paper's numbers come from (``shared/REFERENCES.md`` section).
        base_paper: the paper's score of the unadapted start per task (the "base" rows).
        wall_time: the stated CPU budget (2 cores), with how it was measured or estimated.
        paper_scale: overrides that run the same study at the paper's scale, and ``gpu_hours`` its cost.
        notes: lines printed under the table (what the cells mean, where the study departs from the paper).
        readme: the README (repo-relative) that embeds the generated table (``--readme``).
        control_label: the control rows' label.
        guard: the regression guard's expectations (``dapt.study.report.check_guard``).
        reference: an arm every other arm is compared with directly, unless the arm names its own
            ``reference`` (an ablation's default, e.g. random masking): the question such a study asks
            is which arm beats it, which the control and base columns answer only indirectly (the
            difference of two CIs is not the CI of the difference).
        path: the YAML file it was read from.
    """

    name: str
    title: str
    question: str
    arms: tuple[Arm, ...]
    common: tuple[str, ...] = ()
    paper_source: str = ""
    base_paper: dict[str, float] = field(default_factory=dict)
    wall_time: str = ""
    paper_scale: tuple[str, ...] = ()
    gpu_hours: str = ""
    notes: tuple[str, ...] = ()
    readme: str | None = None
    control_label: str = "control (same steps, general text)"
    guard: dict[str, Any] = field(default_factory=dict)
    reference: str | None = None
    path: Path | None = None

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"study {self.name}: no arm '{name}' (arms: {', '.join(a.name for a in self.arms)})")

    def reference_of(self, arm: Arm) -> str | None:
        """The arm ``arm`` is compared with directly: its own ``reference``, else the study's; None for
        the reference itself and for an arm that continues another (it has no equal-start counterpart)."""
        name = arm.reference or self.reference
        return None if arm.start is not None or name == arm.name else name

    def references(self) -> list[str]:
        """Every arm some arm is compared with, in order of first use (empty: no reference block)."""
        names: list[str] = []
        for arm in self.arms:
            if (name := self.reference_of(arm)) and name not in names:
                names.append(name)
        return names


def studies_dir() -> Path:
    """``conf/study/``: one YAML per study."""
    return config_dir() / "study"


def available() -> dict[str, Path]:
    """The studies shipped in ``conf/study/``, by name."""
    folder = studies_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of strings (Hydra overrides), got {value!r}")
    return tuple(value)


def _scores(value: Any, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) for v in value.values()):
        raise ConfigError(f"{where}: expected task: number pairs, got {value!r}")
    return {str(k): float(v) for k, v in value.items()}


def load(name_or_path: str | Path) -> StudySpec:
    """Read a study by name (``conf/study/<name>.yaml``) or from a YAML path, checking every key."""
    path = Path(name_or_path)
    if not path.suffix:
        studies = available()
        if str(name_or_path) not in studies:
            raise ConfigError(f"unknown study '{name_or_path}' (studies: {', '.join(studies) or 'none'}; dapt study --help)")
        path = studies[str(name_or_path)]
    if not path.is_file():
        raise ConfigError(f"study file not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:  # noqa: BLE001 - a YAML syntax error: one line naming the file
        raise ConfigError(f"{path}: not a valid study YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study is a mapping with keys {', '.join(sorted(STUDY_KEYS))}")
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}' (valid keys: {', '.join(sorted(STUDY_KEYS))})")
    for key in ("title", "question", "arms"):
        if not raw.get(key):
            raise ConfigError(f"{path}: missing '{key}'")
    arms: list[Arm] = []
    for i, item in enumerate(raw["arms"]):
        where = f"{path}: arms[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: an arm is a mapping with keys {', '.join(sorted(ARM_KEYS))}")
        bad = sorted(set(item) - ARM_KEYS)
        if bad:
            raise ConfigError(f"{where}: unknown key '{bad[0]}' (valid keys: {', '.join(sorted(ARM_KEYS))})")
        name = str(item.get("name", ""))
        if not ARM_NAME.match(name):
            raise ConfigError(f"{where}: arm name '{name}' must match {ARM_NAME.pattern} (it names a folder)")
        if any(a.name == name for a in arms):
            raise ConfigError(f"{where}: duplicate arm name '{name}'")
        start = item.get("start")
        if start is not None and not any(a.name == start for a in arms):
            raise ConfigError(f"{where}: start '{start}' names no earlier arm (an arm can only continue an arm listed before it)")
        own_reference = item.get("reference")
        if own_reference is not None and start is not None:
            raise ConfigError(f"{where}: an arm that continues another (start: {start}) has no reference; drop its 'reference'")
        arms.append(Arm(name=name, label=str(item.get("label") or name), overrides=_strings(item.get("overrides"), f"{where}.overrides"),
                        start=start, paper=_scores(item.get("paper"), f"{where}.paper"),
                        reference=None if own_reference is None else str(own_reference)))
    from_base = [a.name for a in arms if a.start is None]
    for i, arm in enumerate(arms):
        if arm.reference == arm.name:
            raise ConfigError(f"{path}: arms[{i}]: reference '{arm.reference}' is the arm itself")
        if arm.reference is not None and arm.reference not in from_base:
            raise ConfigError(f"{path}: arms[{i}]: reference '{arm.reference}' names no arm that starts from the study's base "
                              f"(arms: {', '.join(from_base)})")
    guard = raw.get("guard") or {}
    if not isinstance(guard, dict):
        raise ConfigError(f"{path}: guard must be a mapping")
    reference = raw.get("reference")
    if reference is not None and not any(a.name == reference and a.start is None for a in arms):
        raise ConfigError(f"{path}: reference '{reference}' names no arm that starts from the study's base "
                          f"(arms: {', '.join(a.name for a in arms if a.start is None)})")
    spec = StudySpec(
        name=path.stem, title=str(raw["title"]), question=str(raw["question"]).strip(), arms=tuple(arms),
        common=_strings(raw.get("common"), f"{path}: common"), paper_source=str(raw.get("paper_source") or ""),
        base_paper=_scores(raw.get("base_paper"), f"{path}: base_paper"), wall_time=str(raw.get("wall_time") or "").strip(),
        paper_scale=_strings(raw.get("paper_scale"), f"{path}: paper_scale"), gpu_hours=str(raw.get("gpu_hours") or "").strip(),
        notes=_strings(raw.get("notes"), f"{path}: notes"), readme=raw.get("readme"),
        control_label=str(raw.get("control_label") or StudySpec.control_label), guard=dict(guard),
        reference=None if reference is None else str(reference), path=path,
    )
    pairs: set[frozenset[str]] = set()
    for arm in spec.arms:  # a and b naming each other would put one comparison twice into the Holm family
        if (ref := spec.reference_of(arm)) is not None:
            if frozenset((arm.name, ref)) in pairs:
                raise ConfigError(f"{path}: arms '{arm.name}' and '{ref}' are each other's reference (one comparison, named twice)")
            pairs.add(frozenset((arm.name, ref)))
    return spec
