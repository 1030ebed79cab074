"""Runs that survive: a killed run resumed with ``resume=auto`` ends exactly where an uninterrupted run
ends (loss curve, weights, data blocks, reported numbers); SIGTERM/SIGINT stop at a step boundary with
a checkpoint, failure.json and exit status 128+signal; concurrent runs get their own folders; a sweep
with a failed job exits non-zero.

Every run here is a real ``dapt train`` subprocess on a tiny model, one CPU thread (bitwise
reproducible), with the fault injected by ``DAPT_DEBUG_SIGNAL=<step>:<KILL|TERM|INT>``: the process
sends itself a real signal at the end of that step.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_OVERRIDES
from tests.helpers import fail_message, run_dapt

STEPS = 12
COMMON = [*[o for o in TINY_OVERRIDES if not o.startswith("trainer.max_steps")], f"trainer.max_steps={STEPS}",
          "trainer.val_check_interval=5", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=4", "control.enabled=false"]
ENV = {"DAPT_RECORD_BLOCKS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_dapt(["train", *COMMON, f"paths.output_dir={out}", *extra], cwd=out.parent, env={**ENV, **(env or {})})


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _losses(run_dir: Path) -> dict[int, str]:
    """step -> train/loss as written in the CSV history (strings: compared exactly)."""
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return {int(float(r["step"])): r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def _trained_blocks(run_dir: Path, rank: int = 0) -> list[str]:
    """Blocks that reached the final model, in order: each attempt's blocks up to where the next
    attempt resumed (a resumed attempt starts again at its checkpoint's step)."""
    attempts: list[tuple[int, list[tuple[int, str]]]] = [(0, [])]  # (the step it started at, its blocks)
    for line in (run_dir / f"rank{rank}_blocks.txt").read_text().splitlines():
        if line.startswith("# resumed at step "):
            attempts.append((int(line.rsplit(" ", 1)[1]), []))
        else:
            step, block = line.split()
            attempts[-1][1].append((int(step), block))
    kept: list[str] = []
    for i, (_, blocks) in enumerate(attempts):
        limit = attempts[i + 1][0] if i + 1 < len(attempts) else None
        kept += [b for s, b in blocks if limit is None or s < limit]
    return kept


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _train(out)
    assert proc.returncode == 0, fail_message(proc)
    return out


def _assert_same_run(resumed: Path, reference: Path) -> None:
    ref_w, got_w = _weights(reference), _weights(resumed)
    assert ref_w.keys() == got_w.keys()
    different = [k for k in ref_w if not torch.equal(ref_w[k], got_w[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    assert _losses(resumed) == _losses(reference)
    assert len(_losses(reference)) == STEPS
    assert _trained_blocks(resumed) == _trained_blocks(reference)
    ref, got = (json.loads((d / "results.json").read_text()) for d in (reference, resumed))
    for key in ("steps", "train_tokens", "train_sources", "domain_ppl_after", "general_ppl_after", "domain_dev_ppl_after",
                "domain_ppl_after_ci"):
        assert got[key] == ref[key], key
    assert not (resumed / "checkpoints").exists(), "the checkpoint of a finished run is deleted (checkpoint.keep=false)"


def test_sigkill_mid_run_then_resume_auto_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    killed = _train(out, env={"DAPT_DEBUG_SIGNAL": "6:KILL"})
    assert killed.returncode == -9, fail_message(killed)
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "results.json").exists()
    # killed after 6 steps (blocks of steps 0-5 recorded), checkpoint after 4: steps 4-5 are trained again
    assert {int(line.split()[0]) for line in (out / "rank0_blocks.txt").read_text().splitlines()} == set(range(6))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    first_leg = ckpt["callbacks"]["RunClock"]["seconds"]
    started = time.time()
    resumed = _train(out, "resume=auto")
    second_leg = time.time() - started
    assert resumed.returncode == 0, fail_message(resumed)
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_from_step"] == 4 and results["steps"] == STEPS
    # train_seconds spans both attempts: the first up to its checkpoint, then the whole second one
    assert results["attempts"] == 2 and first_leg > 0
    assert first_leg < results["train_seconds"] < first_leg + second_leg
    _assert_same_run(out, uninterrupted)
    # once finished, resume=auto (a requeued job, a re-launched sweep) reuses the results
    stamp = (out / "results.json").stat().st_mtime_ns
    again = _train(out, "resume=auto")
    assert again.returncode == 0 and "already finished" in again.stdout, fail_message(again)
    assert (out / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name,code,step", [("TERM", 143, 7), ("INT", 130, STEPS)])
def test_signal_checkpoints_writes_failure_and_exits_nonzero_then_resumes_exactly(uninterrupted, tmp_path, name, code, step):
    """Mid-run, and on the last step (Lightning itself ignores a stop request once training is done)."""
    out = tmp_path / "run"
    stopped = _train(out, env={"DAPT_DEBUG_SIGNAL": f"{step}:{name}"})
    assert stopped.returncode == code, fail_message(stopped)
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"interrupted by SIG{name} at step {step}" in errors[0], fail_message(stopped)
    assert "resume with: dapt train" in errors[0] and errors[0].endswith("resume=auto")
    assert "Traceback" not in stopped.stderr
    failure = json.loads((out / "failure.json").read_text())
    assert failure["error"] == "RunInterrupted" and failure["step"] == step and failure["signal"] == code - 128
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == step  # the signal's step, not the last periodic checkpoint
    assert not (out / "results.json").exists()
    resumed = _train(out, "resume=auto")
    assert resumed.returncode == 0, fail_message(resumed)
    assert json.loads((out / "results.json").read_text())["resumed_from_step"] == step
    assert not (out / "failure.json").exists(), "a run that finished after its interruption is not reported failed"
    _assert_same_run(out, uninterrupted)


def test_resume_auto_finds_the_interrupted_run_of_the_same_config_only(tmp_path, compose):
    from dapt.errors import ConfigError
    from dapt.pipeline.resume import CHECKPOINT_DIR, LAST_CHECKPOINT, find_resume_point, write_run_config

    cfg = compose([*COMMON, "resume=auto"])
    root = tmp_path / "outputs"
    old, other, finished, new = (root / name for name in ("a_old", "b_other_config", "c_finished", "d_new"))
    for run_dir, run_cfg in ((old, cfg), (other, compose([*COMMON, "resume=auto", "seed=7"])), (finished, cfg)):
        write_run_config(run_dir, run_cfg)
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True)
        torch.save({"global_step": 3}, run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT)
    (finished / "results.json").write_text("{}")
    new.mkdir()
    os.utime(finished / "results.json", (1, 1))  # finished long before the interrupted run's checkpoint
    point = find_resume_point(cfg, new)
    assert point is not None and point.run_dir == old and point.step == 3 and not point.finished
    # settings that do not change the computation (logging, checkpoint interval, output dir) do not matter
    assert find_resume_point(compose([*COMMON, "resume=auto", "checkpoint.every_n_steps=9", "logger.csv.enabled=false"]), new).run_dir == old
    assert find_resume_point(compose([*COMMON]), new) is None  # resume not asked for
    assert find_resume_point(compose([*COMMON, "resume=auto", "optimizer.lr=1e-3"]), new) is None  # no run of that config
    # another data folder is another run
    assert find_resume_point(compose([*COMMON, "resume=auto", f"paths.data_dir={tmp_path}"]), new) is None
    # the newest run of the config finished: its results are reused, nothing is recomputed
    os.utime(finished / "results.json")
    point = find_resume_point(cfg, new)
    assert point.run_dir == finished and point.finished and point.checkpoint is None
    # ...unless a stage after training failed (it keeps its checkpoint and is resumed)
    (finished / "results.json").write_text('{"error": {"stage": "downstream"}}')
    point = find_resume_point(cfg, new)
    assert point.run_dir == finished and not point.finished and point.checkpoint == finished / CHECKPOINT_DIR / LAST_CHECKPOINT
    # a damaged checkpoint is not fatal for resume=auto: a new run starts
    (old / CHECKPOINT_DIR / LAST_CHECKPOINT).write_bytes(b"not a checkpoint")
    (finished / CHECKPOINT_DIR / LAST_CHECKPOINT).unlink()
    assert find_resume_point(cfg, new) is None
    # an explicit checkpoint must be a run folder's checkpoints/last.ckpt
    stray = tmp_path / "stray.ckpt"
    torch.save({"global_step": 1}, stray)
    with pytest.raises(ConfigError, match="run folder"):
        find_resume_point(compose([*COMMON, f"resume={stray}"]), new)


def test_the_resume_signature_holds_the_code_and_ignores_where_and_how_a_run_logs(compose):
    from dapt.pipeline.resume import code_digest, run_signature

    base = run_signature(compose(COMMON))
    assert base["code"] == code_digest() and len(base["code"]) == 16
    assert run_signature(compose([*COMMON, "tags=[x]", "optimized_metric=general_dev_ppl_after", "paths.output_dir=/tmp/x"])) == base
    assert run_signature(compose([*COMMON, "seed=3"])) != base


def test_resume_from_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    proc = _train(out, f"resume={tmp_path / 'nowhere'}")
    assert proc.returncode == 2, fail_message(proc)
    assert "error: resume=" in proc.stderr and "no checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_held_by_a_live_process_is_not_continued_by_a_second_one(tmp_path):
    """Two copies of one run (a requeued job whose first copy still runs, a sweep launched twice)
    would overwrite each other's checkpoint and results: the second stops with a one-line error,
    leaving the run untouched; once the holder is gone (however it died), the run can be continued."""
    from dapt.errors import RunInUseError
    from dapt.pipeline.resume import CHECKPOINT_DIR, LAST_CHECKPOINT
    from dapt.pipeline.run_lock import RunLock

    out = tmp_path / "run"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    torch.save({"global_step": 3}, out / CHECKPOINT_DIR / LAST_CHECKPOINT)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dapt.pipeline.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted(p.name for p in out.rglob("*"))
        second = _train(out, f"resume={out}")
        assert second.returncode == 2, fail_message(second)
        assert f"is in use by another process (pid {holder.pid} on host" in second.stderr and "Traceback" not in second.stderr
        assert sorted(p.name for p in out.rglob("*")) == before, "the second copy wrote into the run it may not continue"
        with pytest.raises(RunInUseError, match=f"pid {holder.pid}"):
            RunLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(out).acquire()  # the kernel dropped the dead holder's lock
    assert f"pid {os.getpid()} " in lock.holder()
    with pytest.raises(RunInUseError):  # a second claim, even from this process, is refused
        RunLock(out).acquire()
    lock.release()
    RunLock(out).acquire().release()


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    args = [sys.executable, "-m", "dapt.cli", "train", *COMMON, "trainer.max_steps=2", "experiment_name=twins"]
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    runs = sorted((tmp_path / "outputs" / "twins").iterdir())
    assert len(runs) == 2 and all((r / "results.json").is_file() for r in runs), runs


def test_a_sweep_with_a_failed_job_runs_the_rest_and_exits_nonzero_naming_it(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_dapt(["train", "-m", *COMMON, "trainer.max_steps=2", "masking.rate=0.15,7.0,0.2", f"hydra.sweep.dir={sweep}"],
                    cwd=tmp_path, env=ENV)
    assert proc.returncode == 1, fail_message(proc)
    assert (sweep / "0" / "results.json").is_file() and (sweep / "2" / "results.json").is_file()  # the rest ran
    assert (sweep / "1" / "failure.json").is_file()
    assert "error: 1 sweep job(s) failed" in proc.stderr, fail_message(proc)
    (listed,) = [line for line in proc.stderr.splitlines() if line.strip().startswith("job ")]
    assert listed.strip().startswith("job 1 (") and "masking.rate=7.0" in listed and "failure.json" in listed


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    from dapt.pipeline.resume import wandb_run_id
    from dapt.tracking.loggers import LoggerConfig, build_loggers

    monkeypatch.setenv("WANDB_MODE", "offline")
    first = wandb_run_id(tmp_path)
    assert wandb_run_id(tmp_path) == first  # the id is kept in the run folder, not drawn again
    assert wandb_run_id(tmp_path / "other") != first
    loggers = build_loggers(LoggerConfig(), tmp_path, run_name="r", group="g", tags=[], config={}, run_id=first)
    (wandb_logger,) = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    assert wandb_logger._wandb_init["id"] == first and wandb_logger._wandb_init["resume"] == "allow"


def test_run_clock_adds_the_earlier_attempts_time_and_counts_attempts():
    from dapt.pipeline.resume import RunClock

    clock = RunClock()
    clock.load_state_dict({"seconds": 100.0, "attempts": 2})
    clock.start()
    assert 100.0 <= clock.seconds() < 105.0 and clock.attempts == 3
    assert clock.state_dict()["seconds"] >= 100.0


def test_resume_auto_refuses_to_duplicate_a_live_run_that_has_no_checkpoint_yet(tmp_path, compose):
    """A sweep launched twice: the first copy's job is running (before its first checkpoint); the
    second copy's job with the same config must not start a duplicate beside it."""
    from dapt.errors import RunInUseError
    from dapt.pipeline.resume import find_resume_point, write_run_config
    from dapt.pipeline.run_lock import RunLock

    cfg = compose([*COMMON, "resume=auto"])
    live, new = tmp_path / "outputs" / "a_live", tmp_path / "outputs" / "b_new"
    write_run_config(live, cfg)
    new.mkdir()
    lock = RunLock(live).acquire()
    try:
        with pytest.raises(RunInUseError, match="the same run is in progress in .*a_live"):
            find_resume_point(cfg, new)
    finally:
        lock.release()
    assert find_resume_point(cfg, new) is None  # once it is gone (and left no checkpoint), a new run starts


def test_child_ranks_are_pointed_at_the_run_rank_0_resolved(tmp_path):
    from dapt.launch.ddp import rank_overrides

    run = tmp_path / "it's here"
    got = rank_overrides(["trainer=ddp", "resume=auto", "paths.output_dir=/x", "+resume=y", "seed=3"], run, run / "checkpoints" / "last.ckpt")
    assert got[:2] == ["trainer=ddp", "seed=3"]
    assert got[2] == "paths.output_dir='" + str(run).replace("'", "\\'") + "'"
    assert got[3].startswith("resume='") and got[3].endswith("last.ckpt'")
    assert rank_overrides(["trainer=ddp"], run, None)[-1] == "resume=never"


def test_a_child_rank_dies_with_its_parent(tmp_path):
    """PR_SET_PDEATHSIG: a child that is not in any collective (here: sleeping) still dies when the
    process that started it is SIGKILLed (Linux only)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    import psutil

    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, subprocess, sys, time\n"
        "from dapt.launch.ddp import _die_with_parent_hook\n"
        "child = subprocess.Popen(['sleep', '120'], preexec_fn=_die_with_parent_hook())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.wait(timeout=60)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        os.kill(child_pid, 9)
        pytest.fail("the child outlived its SIGKILLed parent")
