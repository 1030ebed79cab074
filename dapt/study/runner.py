"""Run a study's arms, each a ``dapt train`` process, so that re-running the command continues it.

Layout of a study's output folder (``--out``, default ``studies/<name>``)::

    <out>/<arm>/arm.json   the overrides the arm was launched with (a re-run with others is refused)
    <out>/<arm>/log.txt    the arm's stdout and stderr (appended on every attempt)
    <out>/<arm>/run/       the arm's Hydra run directory: results.json, model/, checkpoints/ ...

Why a process per arm and ``resume=auto``: a finished arm is recognised by its complete
``results.json`` and not run again; an arm stopped half-way (Ctrl-C, SIGTERM, a killed job) left a
checkpoint that ``dapt train resume=auto`` continues exactly (weights, optimizer, data position,
RNG). Each arm's run folder has no siblings, so ``resume=auto`` can only continue that arm's own run.
Bases, control arms and the start model's downstream scores are cached by ``dapt.pipeline`` on
content, so arms that share them compute them once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from dapt.config import config_dir
from dapt.errors import ConfigError
from dapt.io import atomic_write_json, read_json_object
from dapt.study.spec import Arm, StudySpec

ARM_FILE = "arm.json"
LOG_FILE = "log.txt"
RUN_DIR = "run"


@dataclass(frozen=True)
class ArmStatus:
    """Where one arm stands: ``done`` (complete results.json), ``partial`` (a checkpoint or a failed
    late stage to continue) or ``todo``."""

    arm: Arm
    folder: Path
    state: str
    detail: str = ""


def run_folder(out: Path, arm: Arm) -> Path:
    return out / arm.name / RUN_DIR


def results_of(out: Path, arm: Arm) -> dict[str, Any] | None:
    """The arm's complete results.json (None while it is unfinished or its last attempt failed)."""
    path = run_folder(out, arm) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return None if "error" in results else results


def status(out: Path, arm: Arm) -> ArmStatus:
    folder = run_folder(out, arm)
    if results_of(out, arm) is not None:
        return ArmStatus(arm, folder, "done")
    ckpt = folder / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ArmStatus(arm, folder, "partial", f"checkpoint {ckpt}")
    if (folder / "results.json").is_file():
        return ArmStatus(arm, folder, "partial", "a late stage failed; resume=auto runs it again")
    return ArmStatus(arm, folder, "todo")


def arm_overrides(spec: StudySpec, arm: Arm, out: Path, extra: list[str]) -> list[str]:
    """The ``dapt train`` overrides of one arm: common, the arm's own, the user's extra overrides, the
    start model (an earlier arm's), then where to write (its own folder, ``resume=auto``) and the W&B group."""
    overrides = [*spec.common, *arm.overrides, *extra]
    if arm.start is not None:  # after the user's overrides: `model=roberta_base` must not replace the arm's start
        start = results_of(out, spec.arm(arm.start))
        model = (start or {}).get("model_dir") or str(run_folder(out, spec.arm(arm.start)) / "model")
        overrides += [f"model.source={Path(model).resolve()}", "model.random_init=false"]  # a saved model, whatever the model group
    return [*overrides, f"hydra.run.dir={run_folder(out, arm).resolve()}", "resume=auto", f"experiment_name=study_{spec.name}"]


def check_arm(spec: StudySpec, arm: Arm, overrides: list[str]) -> None:
    """One-line error naming the arm for an unknown option or key, before any arm runs."""
    from dapt.launch.sweeps import check_overrides

    try:
        check_overrides([o for o in overrides if not o.startswith(("hydra.", "model.source="))], config_dir())
    except ConfigError as exc:
        raise ConfigError(f"study {spec.name}, arm {arm.name}: {exc}") from None


def arm_record(out: Path, arm: Arm) -> dict[str, Any]:
    """The arm's arm.json (launch overrides, start stamp, attempts); {} before its first launch."""
    return read_json_object(out / arm.name / ARM_FILE)


def start_stamp(spec: StudySpec, arm: Arm, out: Path) -> dict[str, Any] | None:
    """Which run of the start arm this arm continues (its name and ``provenance.finished_at``): a start
    arm that was deleted and run again is a different model, even at the same path."""
    if arm.start is None:
        return None
    results = results_of(out, spec.arm(arm.start)) or {}
    return {"arm": arm.start, "finished_at": (results.get("provenance") or {}).get("finished_at")}


def start_rerun(spec: StudySpec, out: Path, arm: Arm, record: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(then, now) stamps of ``arm``'s start arm when that arm was run again after ``arm`` continued it
    (``record``: ``arm``'s arm.json); None when it was not, or either stamp is unknown."""
    then, now = record.get("start"), start_stamp(spec, arm, out)
    return (then, now) if then is not None and now is not None and then != now else None


def _check_same_launch(spec: StudySpec, out: Path, arm: Arm, overrides: list[str]) -> None:
    """Refuse to reuse or continue an arm launched with other overrides or from another run of its
    start arm: its results would not be this study's."""
    path, record = out / arm.name / ARM_FILE, arm_record(out, arm)
    before = record.get("overrides")
    if before is None:
        return
    if before != overrides:
        old, new = set(before) - set(overrides), set(overrides) - set(before)
        raise ConfigError(
            f"{path}: arm {arm.name} was launched with other overrides (then: {', '.join(sorted(old)) or '-'}; "
            f"now: {', '.join(sorted(new)) or '-'}); use another --out, or delete {out / arm.name} to run it again")
    if stamps := start_rerun(spec, out, arm, record):
        then, now = stamps
        raise ConfigError(
            f"{path}: arm {arm.name} continued the run of arm {arm.start} that finished at {then.get('finished_at')}, "
            f"but that arm has been run again since (finished at {now.get('finished_at')}); delete {out / arm.name} to run it on the new model")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))]
    return [] if a == b else [f"{prefix}: {json.dumps(b, default=str)[:60]} then, {json.dumps(a, default=str)[:60]} now"]


def check_signature(out: Path, arm: Arm, overrides: list[str]) -> str | None:
    """Compare the arm's existing run (``run/run_config.json``) with the config these overrides compose
    to now. A config difference (an edited experiment, data or downstream YAML) is an error: the
    finished results would be reused for another config. Returns a warning when only dapt's code
    changed (its cells are then flagged by the table's provenance lines), else None."""
    from dapt.config import compose_config, register_resolvers
    from dapt.pipeline.resume import RUN_CONFIG, run_signature, without_precision
    from dapt.pipeline.schemas import register_schemas

    path = run_folder(out, arm) / RUN_CONFIG
    try:
        then = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    register_schemas()
    register_resolvers()
    cfg = compose_config([o for o in overrides if not o.startswith("hydra.")], "train", directory=config_dir())
    now = run_signature(cfg)
    code_then, code_now = then.pop("code", None), now.pop("code", None)
    differences = _differences(without_precision(now), without_precision(then))
    if differences:
        raise ConfigError(f"{path}: arm {arm.name}'s run was made with another config ({'; '.join(differences[:3])}); "
                          f"use another --out, or delete {out / arm.name} to run it again")
    if code_then != code_now:
        return f"arm {arm.name}: its run was made by other dapt code (digest {code_then}, now {code_now}); a finished run is reused and flagged in the table"
    return None


def _attempts(out: Path, arm: Arm) -> list[dict[str, Any]]:
    """The arm's earlier attempts (start time, wall seconds, exit status) from its arm.json."""
    return list(arm_record(out, arm).get("attempts") or [])


def wall_seconds(out: Path, arm: Arm) -> float:
    """Wall time the runner spent on this arm over all its attempts (0 when it never ran here)."""
    return float(sum(a.get("seconds") or 0 for a in _attempts(out, arm)))


ACK = re.compile(r"received SIG(TERM|INT): stopping")  # what dapt train logs on the first signal it receives
GRACE_SECONDS = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Forward:
    """SIGTERM or SIGINT to the study: stop after the running arm, which must checkpoint.

    A scheduler (SLURM's time limit, ``scancel``) signals every process of the job and a terminal's
    Ctrl-C the whole foreground group, so the arm usually got the signal itself; a second one would
    make it stop at once without its checkpoint. So the signal is forwarded only when the arm has not
    said within ``GRACE_SECONDS`` that it received one (a plain ``kill`` of the study process). The
    study keeps reading the arm's output until it exits (a full pipe would block it)."""

    def __init__(self) -> None:
        self.child: subprocess.Popen[str] | None = None
        self.signum: int | None = None
        self.acknowledged = False
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None

    @property
    def stopped(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_Forward":
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: nothing to forward
                pass
        return self

    def attach(self, child: subprocess.Popen[str] | None) -> None:
        self.child, self.acknowledged = child, False
        if child is not None and self.stopped:  # signalled between the check and the start of this arm
            self._arm_timer()

    def seen(self, line: str) -> None:
        if ACK.search(line):
            self.acknowledged = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.child is not None:
            self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is None and self.child is not None:
            self._timer = threading.Timer(GRACE_SECONDS, self._forward_unless_acknowledged, args=(self.child, self.signum))
            self._timer.daemon = True
            self._timer.start()

    def _forward_unless_acknowledged(self, child: subprocess.Popen[str], signum: int) -> None:
        if not self.acknowledged and child.poll() is None:
            child.send_signal(signum)

    def exit_status(self, rc: int) -> int:
        """The study's exit status once an arm stopped after a signal: the arm's 130/143, else 128 + the signal."""
        return rc if rc in (130, 143) else 128 + int(self.signum or signal.SIGTERM)

    def __exit__(self, *exc: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _stream(proc: subprocess.Popen[str], log: TextIO, echo: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        log.flush()
        echo(line.rstrip("\n"))


def run_study(spec: StudySpec, out: Path, extra: list[str], *, only: list[str] | None = None,
              echo: Callable[[str], None] = print, env: dict[str, str] | None = None) -> int:
    """Run the arms of ``spec`` that are not done (in order; those named in ``only`` if given).

    Returns 0 when every selected arm is done; 130/143 when interrupted (re-run to continue); 1 when
    an arm failed (arms that start from it are skipped, the others still run). Overrides are checked
    for every selected arm before the first one starts.
    """
    selected = [spec.arm(name) for name in only] if only else list(spec.arms)
    for arm in selected:
        overrides = arm_overrides(spec, arm, out, extra)
        check_arm(spec, arm, overrides)
        _check_same_launch(spec, out, arm, overrides)  # also for finished arms: their results must be this study's
        state = status(out, arm).state
        if state in ("done", "partial"):  # a run to reuse or continue (a crash before any checkpoint leaves none)
            warning = check_signature(out, arm, overrides)
            if warning and state == "partial":
                warning += "; dapt train does not continue a checkpoint made by other code: this arm restarts from step 0"
            if warning:
                echo(f"warning: {warning}")
        if arm.start is not None and arm.start not in {a.name for a in selected} and results_of(out, spec.arm(arm.start)) is None:
            raise ConfigError(f"study {spec.name}, arm {arm.name}: it starts from arm {arm.start}, which has not finished "
                              f"(run it first, or leave out --only)")
    failed: list[str] = []
    child_env = {**os.environ, **(env or {})}
    with _Forward() as forward:
        for i, arm in enumerate(selected, 1):
            state = status(out, arm)
            head = f"[study {spec.name} {i}/{len(selected)}] {arm.name}"
            if forward.stopped:  # a signal between two arms: start no other
                echo(f"{head}: not started (the study was signalled); run the same command again to continue")
                return forward.exit_status(0)
            if state.state == "done":
                echo(f"{head}: done, reusing {state.folder / 'results.json'}")
                continue
            if arm.start is not None and (arm.start in failed or results_of(out, spec.arm(arm.start)) is None):
                echo(f"{head}: skipped (its start, arm {arm.start}, did not finish)")
                failed.append(arm.name)
                continue
            overrides = arm_overrides(spec, arm, out, extra)
            (out / arm.name).mkdir(parents=True, exist_ok=True)
            attempts = _attempts(out, arm)
            record = {"study": spec.name, "arm": arm.name, "overrides": overrides, "start": start_stamp(spec, arm, out), "attempts": attempts}
            atomic_write_json(out / arm.name / ARM_FILE, record)
            log_path = out / arm.name / LOG_FILE
            echo(f"{head}: {'continuing' if state.state == 'partial' else 'running'} (log: {log_path})")
            echo("  dapt train " + " ".join(overrides))
            started, stamp = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
            with log_path.open("a", encoding="utf-8") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} dapt train {' '.join(overrides)}\n")
                proc = subprocess.Popen([sys.executable, "-m", "dapt.cli", "train", *overrides], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=child_env, bufsize=1)
                forward.attach(proc)
                _stream(proc, log, lambda line: (forward.seen(line), echo(f"  | {line}")))
                rc = proc.wait()
                forward.attach(None)
            minutes = (time.monotonic() - started) / 60
            attempts.append({"started": stamp, "seconds": round(60 * minutes, 1), "exit": rc})
            atomic_write_json(out / arm.name / ARM_FILE, {**record, "attempts": attempts})
            if rc in (130, 143) or forward.stopped:
                echo(f"{head}: interrupted after {minutes:.1f} min (exit {rc}); run the same command again to continue")
                return forward.exit_status(rc)
            if rc != 0 or results_of(out, arm) is None:
                echo(f"{head}: FAILED (exit {rc}) after {minutes:.1f} min; see {log_path}")
                failed.append(arm.name)
                continue
            echo(f"{head}: done in {minutes:.1f} min")
    if failed:
        echo(f"study {spec.name}: not finished: {', '.join(failed)}; fix the cause (see their log.txt) and run again")
        return 1
    return 0
