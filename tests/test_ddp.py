"""Data-parallel training with 2 CPU processes (gloo), started by ``dapt train trainer=ddp``.

Checks that rank 1 runs in the job's own folder (no second output folder), that the two ranks
trained on disjoint blocks (``DAPT_RECORD_BLOCKS=1`` makes each rank list its blocks), that only
rank 0 wrote results, W&B and the model, and that the token count is steps × batch × length × 2.
Then the same job, stopped by a SIGTERM to rank 0 only and resumed, and killed (rank 0 SIGKILLed,
rank 1 must not outlive it) and resumed, ends bitwise where the uninterrupted job ended: every rank
resumes its own data position, masking generator and dropout RNG.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dapt.launch.ddp import local_process_count, rank_command, starts_script_ranks
from tests.helpers import fail_message
from tests.helpers import run_dapt as dapt

STEPS, BATCH, LENGTH, WORLD = 6, 4, 64, 2
JOB = ["trainer=ddp", "optimizer.lr=3e-4", "model=tiny", "base_prep=none", "tasks=[]", f"trainer.max_steps={STEPS}",
       "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=2", "data.eval_tokens=256", "data.dev_eval_tokens=256",
       f"data.batch_size={BATCH}", f"data.max_seq_length={LENGTH}", "data.shuffle_buffer=16", "experiment_name=ddp_test"]
ENV = {"DAPT_RECORD_BLOCKS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ddp_job(tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted DDP job, run as a sweep job (the case where rank 1 must find the job folder)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    sweep_dir = tmp_path / "multirun" / "ddp"
    proc = dapt(["train", "-m", *JOB, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, env=ENV, timeout=400)
    return tmp_path, sweep_dir, proc


@pytest.mark.slow
def test_ddp_two_cpu_ranks_share_the_job_folder_and_see_disjoint_data(ddp_job):
    tmp_path, sweep_dir, proc = ddp_job
    assert proc.returncode == 0, fail_message(proc)

    job = sweep_dir / "0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun"]  # rank 1 made no folder of its own
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "multirun.yaml"]
    assert (job / "dapt_rank1.log").is_file(), "rank 1 did not run in the job folder"

    blocks = {rank: [line.split()[-1] for line in (job / f"rank{rank}_blocks.txt").read_text().splitlines()] for rank in range(WORLD)}
    for rank, hashes in blocks.items():
        assert len(hashes) == STEPS * BATCH, f"rank {rank} consumed {len(hashes)} blocks"
        assert len(set(hashes)) == len(hashes), f"rank {rank} saw a block twice within one pass"
    assert not set(blocks[0]) & set(blocks[1]), "the two ranks trained on the same blocks"

    results = json.loads((job / "results.json").read_text())
    assert results["steps"] == STEPS
    # the control arm trains under DDP too (no rank waits on a lock the other holds)
    assert results["control"]["steps"] == STEPS
    # each held-out block is scored once across the ranks (no padding duplicates in perplexity or its CI)
    import csv

    rows = list(csv.DictReader((job / "csv" / "metrics.csv").open()))
    scored = {float(r["val/domain/masked_tokens"]) for r in rows if r.get("val/domain/masked_tokens")}
    assert scored == {float(results["heldout_sets"]["dev"]["domain"]["masked_tokens"])}, scored
    assert results["train_tokens"] == STEPS * BATCH * LENGTH * WORLD
    assert results["config"]["trainer"]["devices"] == WORLD and results["config"]["trainer"]["strategy"] == "ddp"
    # rank zero only: one results.json, one W&B run, one model
    assert len(list(tmp_path.rglob("results.json"))) == 1
    assert len(list(job.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert (job / "model" / "config.json").is_file() and len(list(tmp_path.rglob("model.safetensors"))) == 1
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    run = read_offline_run(offline_runs(job)[0])
    assert run.group == "ddp_test" and run.summary["train_tokens"] == STEPS * BATCH * LENGTH * WORLD


@pytest.mark.slow
def test_ddp_stopped_or_killed_then_resumed_ends_where_the_uninterrupted_job_ends(ddp_job, tmp_path):
    import time

    import psutil

    from tests.test_resume import _losses, _trained_blocks, _weights

    ref_root, sweep_dir, proc = ddp_job
    assert proc.returncode == 0, fail_message(proc)
    reference = sweep_dir / "0"

    def same_as_reference(run: Path) -> None:
        ref_w, got_w = _weights(reference), _weights(run)
        assert [k for k in ref_w if not torch.equal(ref_w[k], got_w[k])] == [], "weights differ from the uninterrupted job"
        assert _losses(run) == _losses(reference) and len(_losses(reference)) == STEPS
        for rank in range(WORLD):
            assert _trained_blocks(run, rank) == _trained_blocks(reference, rank), f"rank {rank} trained other blocks"
        ref, got = (json.loads((d / "results.json").read_text()) for d in (reference, run))
        for key in ("train_tokens", "train_sources", "domain_ppl_after", "domain_ppl_after_ci", "general_dev_ppl_after"):
            assert got[key] == ref[key], key

    # SIGTERM to rank 0 only, at the end of step 3: both ranks agree at the next step boundary and stop after step 4
    out = tmp_path / "stopped"
    stopped = dapt(["train", *JOB, f"paths.output_dir={out}"], cwd=tmp_path, env={**ENV, "DAPT_DEBUG_SIGNAL": "3:TERM:0"}, timeout=400)
    assert stopped.returncode == 143, fail_message(stopped)
    assert "interrupted by SIGTERM at step 4" in stopped.stderr, stopped.stderr[-2000:]
    failure = json.loads((out / "failure.json").read_text())
    assert failure["step"] == 4 and torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    resumed = dapt(["train", *JOB, f"paths.output_dir={out}", "resume=auto"], cwd=tmp_path, env=ENV, timeout=400)
    assert resumed.returncode == 0, fail_message(resumed)
    assert json.loads((out / "results.json").read_text())["resumed_from_step"] == 4
    same_as_reference(out)

    # SIGKILL to rank 0 at the end of step 5: rank 1 dies with it (no orphan waiting in a collective); resumed from step 4
    out = tmp_path / "killed"
    started = time.time()
    killed = dapt(["train", *JOB, f"paths.output_dir={out}"], cwd=tmp_path, env={**ENV, "DAPT_DEBUG_SIGNAL": "5:KILL:0"}, timeout=400)
    assert killed.returncode == -9, fail_message(killed)
    def orphans() -> list[int]:
        return [p.pid for p in psutil.process_iter(["cmdline", "create_time", "status"])
                if p.info["create_time"] >= started - 1 and p.info["status"] != psutil.STATUS_ZOMBIE
                and str(out) in " ".join(p.info["cmdline"] or [])]

    deadline = time.time() + 15
    while orphans() and time.time() < deadline:
        time.sleep(0.5)
    assert not orphans(), "rank processes outlived rank 0"
    resumed = dapt(["train", *JOB, f"paths.output_dir={out}", "resume=auto"], cwd=tmp_path, env=ENV, timeout=400)
    assert resumed.returncode == 0, fail_message(resumed)
    assert json.loads((out / "results.json").read_text())["resumed_from_step"] == 4
    same_as_reference(out)


def test_rank_command_reruns_this_job_in_its_folder(tmp_path):
    cmd = rank_command(["trainer=ddp", "optimizer.lr=0.0003", "tasks=[]"], tmp_path / "multirun" / "x" / "3", 1)
    assert cmd[:4] == [sys.executable, "-m", "dapt.cli", "train"]
    assert cmd[4:7] == ["trainer=ddp", "optimizer.lr=0.0003", "tasks=[]"]  # the job's concrete values, no -m
    assert f"hydra.run.dir='{tmp_path / 'multirun' / 'x' / '3'}'" in cmd
    assert "hydra.output_subdir=null" in cmd and "hydra.job.name=dapt_rank1" in cmd


@pytest.mark.parametrize(
    "trainer, n, script",
    [
        ({"strategy": "ddp", "devices": 2}, 2, True),
        ({"strategy": "ddp", "devices": 1}, 1, False),
        ({"strategy": "ddp_spawn", "devices": 2}, 2, False),
        ({"strategy": "fsdp", "devices": [0, 1, 2]}, 3, True),
        ({"strategy": "deepspeed_stage_2", "devices": "4"}, 4, True),
        ({"devices": 1}, 1, False),
    ],
)
def test_which_trainers_need_local_ranks(trainer, n, script):
    assert local_process_count(trainer) == n
    assert starts_script_ranks(trainer) is script


def test_no_ranks_started_under_a_cluster_launcher(monkeypatch, tmp_path):
    from dapt.launch.ddp import local_ranks

    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun / SLURM / a rank we started ourselves
    with local_ranks({"strategy": "ddp", "devices": 2}, tmp_path, []) as started:
        assert started == 0
