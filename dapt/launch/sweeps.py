"""Hydra jobs and sweeps: what a job knows about itself, and how a sweep survives bad input.

* ``current_job()``: is this a multirun job, its own overrides (W&B tags), its number and folders.
* ``override_tags()``: the job's overrides as W&B tags (W&B allows 64 characters per tag).
* ``record_failure()``: a failed sweep job leaves ``failure.json`` in its folder; the sweep goes on.
* ``sweeper_tracks_failures()``: optimising sweepers (Optuna) must see a failed trial as an exception
  (it is recorded as FAIL; a NaN value would abort optuna 2.x), the basic sweeper gets NaN.
* ``check_overrides()``: before Hydra starts, an override naming an unknown config option or key is
  rejected with the valid choices listed (Hydra itself names only the bad key).
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dapt.errors import ConfigError

WANDB_TAG_MAX = 64
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class JobInfo:
    """The Hydra job this process runs (``None`` from ``current_job`` outside Hydra)."""

    multirun: bool
    overrides: list[str] = field(default_factory=list)  # this job's task overrides, concrete values
    override_dirname: str = ""
    num: int | None = None
    output_dir: str | None = None
    sweep_dir: str | None = None
    cwd: str | None = None
    sweeper: str = BASIC_SWEEPER

    @property
    def sweep_name(self) -> str | None:
        """``<experiment>/<time>`` of a sweep folder ``multirun/<experiment>/<time>``."""
        if not (self.multirun and self.sweep_dir):
            return None
        path = Path(self.sweep_dir)
        return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def current_job() -> JobInfo | None:
    """Describe the running Hydra job, or ``None`` when called outside ``dapt train``."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
    except Exception:  # noqa: BLE001 - outside Hydra
        return None
    multirun = hc.mode == RunMode.MULTIRUN
    sweeper = ""
    try:
        sweeper = str(hc.sweeper.get("_target_", "")) if hc.sweeper is not None else ""
    except Exception:  # noqa: BLE001
        pass
    num = hc.job.get("num")
    return JobInfo(
        multirun=multirun,
        overrides=[str(o) for o in (hc.overrides.task or [])],
        override_dirname=str(hc.job.get("override_dirname") or ""),
        num=int(num) if num is not None and multirun else None,
        output_dir=str(hc.runtime.output_dir) if hc.runtime.get("output_dir") else None,
        sweep_dir=str(Path(hc.runtime.cwd, hc.sweep.dir)) if multirun else None,
        cwd=str(hc.runtime.cwd),
        sweeper=sweeper or BASIC_SWEEPER,
    )


def sweeper_tracks_failures(job: JobInfo | None) -> bool:
    """True for sweepers that read the objective (Optuna): a failed job must raise, not return NaN."""
    return bool(job and job.multirun and job.sweeper != BASIC_SWEEPER)


def override_tags(overrides: Iterable[str], max_len: int = WANDB_TAG_MAX) -> list[str]:
    """``key=value`` tags, one per override, shortened to W&B's limit (``…`` marks a cut)."""
    tags = []
    for item in overrides:
        tag = str(item).strip()
        if not tag:
            continue
        tags.append(tag if len(tag) <= max_len else tag[: max_len - 1] + "…")
    return list(dict.fromkeys(tags))


def record_failure(run_dir: Path, exc: BaseException, job: JobInfo | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<run_dir>/failure.json`` (error, message, traceback, overrides, ``extra``) and return its path."""
    from dapt.io import atomic_write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "failure.json"
    atomic_write_json(path, {
        "error": type(exc).__name__,
        "message": str(exc),
        "overrides": job.overrides if job else [],
        "job_num": job.num if job else None,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        **(extra or {}),
    })
    return path


# Failed jobs of the sweep that just ended (filled by ``SweepFailureReport``); ``dapt train -m``
# prints them and exits 1.
SWEEP_FAILURES: list[str] = []


def sweep_failures(sweep_dir: Path) -> list[str]:
    """One line per ``failure.json`` under a sweep folder: job, overrides, error and the file."""
    lines = []
    for path in sorted(Path(sweep_dir).glob("**/failure.json")):
        try:
            info = json.loads(path.read_text())
            lines.append(f"job {info.get('job_num')} ({','.join(info.get('overrides') or []) or 'no overrides'}): "
                         f"{info.get('error')}: {info.get('message')} [{path}]")
        except (OSError, ValueError):
            lines.append(f"{path} (unreadable)")
    return lines


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object  # type: ignore[misc,assignment]


class SweepFailureReport(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback (conf/hydra/default.yaml): after a sweep has run all its jobs, collect the
    ``failure.json`` files its jobs wrote, in this process or in launcher processes (joblib,
    submitit), so that the sweep ends with exit status 1 and a list of what failed."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        SWEEP_FAILURES[:] = sweep_failures(Path(str(config.hydra.sweep.dir)))


# ----------------------------------------------------------------------------- override checking

def check_overrides(argv: list[str], config_dir: Path, config_name: str = "train") -> None:
    """Raise ``ConfigError`` listing valid choices when an override names an unknown option or key.

    Only plain ``group=option`` and ``a.b.c=value`` overrides are checked (``+``/``++``/``~`` and
    ``hydra.*`` keys are Hydra's business); anything this check cannot decide is left to Hydra.
    """
    try:
        from hydra._internal.utils import get_args_parser
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args, _ = get_args_parser().parse_known_args(argv)
        if args.config_name not in (None, config_name) or args.config_path or args.config_dir:
            return
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # noqa: BLE001 - unparsable: Hydra reports it
        return
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.types import ChoiceSweep
    from omegaconf import OmegaConf

    from dapt.config import compose_config, hydra_config_dir, renamed_hint

    if GlobalHydra.instance().is_initialized():
        return
    plain = [o for o in overrides if not (o.is_add() or o.is_force_add() or o.is_delete())]
    with hydra_config_dir(config_dir):
        loader = GlobalHydra.instance().config_loader()
        group_args: list[str] = []
        key_overrides = []
        for o in plain:
            key = o.key_or_group
            options = loader.get_group_options(key)
            if options or (config_dir / key).is_dir():
                if isinstance(o.value(), ChoiceSweep):
                    values: list[Any] = list(o.sweep_string_iterator())
                else:
                    values = [] if o.is_sweep_override() else [o.value()]  # glob/range sweeps: Hydra checks
                # a combinable group takes a list of options (remedy=[l2sp,llrd]): each is checked
                choices = [c for v in values for c in (v if isinstance(v, list) else [v])]
                for value in choices:
                    if value is not None and str(value) != "null" and isinstance(value, str) and value not in options:
                        raise ConfigError(
                            f"unknown option '{key}={value}' (choices for {key}: {', '.join(sorted(options)) or 'none'})"
                        )
                if values and values[0] is not None and not key.startswith("hydra"):
                    group_args.append(f"{o.get_key_element()}={values[0]}")
            elif not key.startswith("hydra.") and key != "hydra":
                key_overrides.append(key)
    try:
        cfg = compose_config(group_args, config_name, directory=config_dir)
    except Exception as exc:  # noqa: BLE001 - a schema error in a chosen YAML: one line; else Hydra reports it
        _raise_schema_error(exc)
        return
    tree = OmegaConf.to_container(cfg, resolve=False)
    for key in key_overrides:
        parent, missing = _deepest_existing(tree, key.split("."))
        if missing is None:
            continue
        node = _get(tree, parent)
        where = f"under '{'.'.join(parent)}'" if parent else "at top level"
        valid = ", ".join(sorted(str(k) for k in node)) if isinstance(node, dict) else "none (not a mapping)"
        hint = renamed_hint(key)
        add = "" if hint else f"; use +{key}=... to add a new key"  # an old key is not a new one to add
        raise ConfigError(f"unknown config key '{key}'{hint} (valid keys {where}: {valid}{add})")
    # A value the group's schema rejects (a word for a bool, text for a float): one line, before any job
    # runs. Each choice of a swept key or group is composed once, with the first choice of the others.
    choices: list[tuple[str, list[str]]] = []
    for o in plain:
        if o.key_or_group.startswith("hydra") or (o.is_sweep_override() and not isinstance(o.value(), ChoiceSweep)):
            continue  # range/glob sweeps: Hydra expands and checks them
        listed = list(o.sweep_string_iterator()) if isinstance(o.value(), ChoiceSweep) else [o.get_value_element_as_str()]
        choices.append((o.get_key_element(), listed))
    first = [f"{key}={listed[0]}" for key, listed in choices]
    for i, (key, listed) in enumerate(choices):
        for value in listed[1:] if i else listed:  # the first choices are composed with override 0
            try:
                compose_config([*first[:i], f"{key}={value}", *first[i + 1:]], config_name, directory=config_dir)
            except Exception as exc:  # noqa: BLE001 - anything but a schema error: Hydra reports it
                _raise_schema_error(exc, f"{key}={value}" if len(listed) > 1 else None)
                return  # not a schema error: the other compositions would fail the same way


def _raise_schema_error(exc: BaseException, choice: str | None = None) -> None:
    """Raise ``ConfigError`` with one line when ``exc`` comes from a schema check (the group schemas of
    ``dapt.pipeline.schemas``); Hydra's own report of it spans several lines and a stack hint."""
    from omegaconf.errors import OmegaConfBaseException

    from dapt.config import describe_config_error

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OmegaConfBaseException):
            raise ConfigError(describe_config_error(seen) + (f" (in the sweep's choice {choice})" if choice else "")) from None
        seen = seen.__cause__ or seen.__context__


def _get(tree: Any, parts: list[str]) -> Any:
    node = tree
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _deepest_existing(tree: Any, parts: list[str]) -> tuple[list[str], str | None]:
    """(longest existing prefix, first missing part or None when the whole key exists)."""
    node = tree
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif node is None or isinstance(node, str) and node.startswith("${"):
            return parts[:i], None  # null or interpolated node: cannot tell; leave it to Hydra
        else:
            return parts[:i], part
    return parts, None
