"""Sweeps from the command line: real ``dapt train -m`` runs on the tiny model (W&B offline).

* a 2×2 basic multirun: 4 jobs, 4 folders, 4 W&B offline runs with the sweep's group and tags,
  then ``dapt compare`` and ``notebooks/compare_runs.ipynb`` on those runs;
* an Optuna sweep of 3 trials (``hparams_search=domain_ppl``) where one trial fails;
* a joblib sweep (``hydra/launcher=local_parallel``) where one job fails and the sweep goes on;
* one job through ``hydra/launcher=submitit_local``;
* the W&B sweep YAML's agent command line parses into the intended overrides;
* bad overrides are rejected with the valid choices listed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from dapt.config import REPO_ROOT, config_dir
from tests.helpers import fail_message
from tests.helpers import run_dapt as dapt

FAST = ["model=tiny", "base_prep=none", "tasks=[]", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "data.eval_tokens=256", "data.dev_eval_tokens=256", "data.batch_size=4", "data.max_seq_length=64", "data.shuffle_buffer=16",
        "save_model=false"]
NO_WANDB = ["logger.wandb.enabled=false"]


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


# ----------------------------------------------------------------------------- 2×2 basic multirun

@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dapt train -m optimizer.lr=1e-4,5e-4 masking.rate=0.15,0.4`` with W&B offline (run once)."""
    root = tmp_path_factory.mktemp("grid")
    sweep_dir = root / "multirun" / "sweep_test" / "t0"
    proc = dapt(["train", "-m", *FAST, "experiment_name=sweep_test", "optimizer.lr=1e-4,5e-4", "masking.rate=0.15,0.4",
                 f"hydra.sweep.dir={sweep_dir}"], cwd=root)
    assert proc.returncode == 0, fail_message(proc)
    return sweep_dir


@pytest.mark.slow
def test_multirun_2x2_gives_four_runs_with_own_folders_and_wandb_runs(grid_sweep):
    from dapt.tracking.wandb_offline import offline_runs, read_offline_run

    jobs = job_dirs(grid_sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    combos, run_ids, names = set(), set(), set()
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        lr, rate = results["config"]["optimizer"]["lr"], results["config"]["masking"]["rate"]
        combos.add((lr, rate))
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("optimizer.lr=") for o in overrides) and any(o.startswith("masking.rate=") for o in overrides)
        assert (job / "csv" / "metrics.csv").is_file()
        files = offline_runs(job)
        assert len(files) == 1, f"{job}: expected one W&B offline run, got {files}"
        run = read_offline_run(files[0])
        assert run.group == "sweep_test" and run.job_type == "dapt"
        tag_values = dict(t.split("=", 1) for t in run.tags if "=" in t)
        assert float(tag_values["optimizer.lr"]) == lr and float(tag_values["masking.rate"]) == rate
        assert "sweep:sweep_test/t0" in run.tags and "model=tiny" in run.tags
        assert run.exit_code == 0  # wandb.finish() ended each job's run
        assert run.summary["domain_ppl_after"] == pytest.approx(results["domain_ppl_after"])
        assert run.config["hydra_job"]["num"] == int(job.name)
        run_ids.add(run.run_id)
        names.add(run.name)
    assert combos == {(1e-4, 0.15), (1e-4, 0.4), (5e-4, 0.15), (5e-4, 0.4)}
    assert len(run_ids) == 4 and len(names) == 4


@pytest.mark.slow
def test_compare_table_and_plots_on_the_sweep(grid_sweep, tmp_path):
    import pandas as pd

    out = tmp_path / "cmp"
    proc = dapt(["compare", str(grid_sweep), "--out", str(out), "--sort", "domain_ppl_after"], cwd=tmp_path)
    assert proc.returncode == 0, fail_message(proc)
    assert "4 runs" in proc.stdout
    table = pd.read_csv(out / "runs.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok"}
    assert {"optimizer.lr", "masking.rate", "domain_ppl_after", "general_ppl_after", "train_tokens"} <= set(table.columns)
    assert set(zip(table["optimizer.lr"], table["masking.rate"])) == {(1e-4, 0.15), (1e-4, 0.4), (5e-4, 0.15), (5e-4, 0.4)}
    assert list(table["domain_ppl_after"]) == sorted(table["domain_ppl_after"])
    assert (table["train_tokens"] == 4 * 4 * 64).all()
    assert (out / "ppl_curves.png").stat().st_size > 5000
    md = (out / "runs.md").read_text().strip().splitlines()
    assert len(md) == 6 and "optimizer.lr" in md[0]


@pytest.mark.slow
def test_notebook_runs_the_same_comparison(grid_sweep, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO_ROOT / "notebooks" / "compare_runs.ipynb", as_version=4)
    out = tmp_path / "nb_out"
    saved = dict(os.environ)
    os.environ.update({"DAPT_COMPARE_SOURCES": str(grid_sweep), "DAPT_COMPARE_OUT": str(out)})
    try:
        NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "4 runs; status: {'ok': 4}" in text
    assert "optimizer.lr" in text and "masking.rate" in text
    assert (out / "ppl_curves.png").stat().st_size > 5000
    assert len((out / "runs.md").read_text().strip().splitlines()) == 6


# ----------------------------------------------------------------------------- Optuna, joblib, submitit

@pytest.mark.slow
def test_optuna_sweep_three_trials_returns_the_objective_and_survives_a_failed_trial(tmp_path):
    """hparams_search=domain_ppl; masking.rate=7.0 is invalid, so the trial(s) drawing it fail.

    With sampler seed 3 optuna 2.10 draws 0.15, 7.0, 0.15: two trials train, one fails; the failed
    trial is recorded (failure.json, Optuna FAIL) and the study finishes with the best finite value.
    """
    sweep_dir = tmp_path / "optuna"
    proc = dapt(["train", "-m", "hparams_search=domain_ppl", "masking.rate=choice(0.15,7.0)", "hydra.sweeper.n_trials=3",
                 "hydra.sweeper.sampler.seed=3", *FAST, *NO_WANDB, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 1 and "error: 1 sweep job(s) failed" in proc.stderr, fail_message(proc)  # the study ran to the end
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 3
    values, failed = [], []
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        rate = float(next(o for o in overrides if o.startswith("masking.rate=")).split("=", 1)[1])
        if rate > 1:
            failure = json.loads((job / "failure.json").read_text())
            assert failure["error"] == "ConfigError" and "masking.rate=7.0" in failure["message"]
            assert not (job / "results.json").exists()
            failed.append(job)
        else:
            values.append(json.loads((job / "results.json").read_text())["metrics"]["domain_dev_ppl_after"])
    assert len(failed) == 1 and len(values) == 2
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values))  # dapt train returned optimized_metric
    assert best["best_params"]["masking.rate"] == 0.15


@pytest.mark.slow
def test_joblib_sweep_runs_jobs_in_parallel_processes_and_records_a_failure(tmp_path):
    sweep_dir = tmp_path / "joblib"
    proc = dapt(["train", "-m", "hydra/launcher=local_parallel", "masking.rate=0.15,7.0", *FAST, *NO_WANDB,
                 f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    # the failure happened in a joblib worker process; the sweep still ends with status 1 and names it
    assert proc.returncode == 1 and "error: 1 sweep job(s) failed" in proc.stderr, fail_message(proc)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    ok, bad = job_dirs(sweep_dir)
    assert json.loads((ok / "results.json").read_text())["steps"] == 4
    failure = json.loads((bad / "failure.json").read_text())
    assert "masking.rate=7.0 must be in (0, 1)" in failure["message"] and "masking.rate=7.0" in failure["overrides"]


@pytest.mark.slow
def test_submitit_local_launcher_runs_a_real_job(tmp_path):
    sweep_dir = tmp_path / "submitit"
    proc = dapt(["train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "optimizer.lr=3e-4",
                 *FAST, *NO_WANDB, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, fail_message(proc)
    (job,) = job_dirs(sweep_dir)
    results = json.loads((job / "results.json").read_text())
    assert results["config"]["optimizer"]["lr"] == 3e-4 and results["steps"] == 4
    assert list((sweep_dir / ".submitit").glob("*/*_log.out")), "submitit job logs missing"


# ----------------------------------------------------------------------------- W&B sweep YAML

def agent_command(sweep: dict[str, Any], values: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    """The command a ``wandb agent`` runs for one set of parameter ``values`` of sweep YAML ``sweep``.

    Uses the wandb package's own helpers for ``${args_no_hyphens}`` etc. and the same macro expansion
    as the agent, so the test can check that the sweep YAML drives the Hydra CLI as intended.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    unknown = sorted(set(values) - set(sweep.get("parameters", {})))
    if unknown:
        raise ValueError(f"sweep has no parameter {unknown[0]!r}")
    saved = dict(os.environ)
    try:
        os.environ.update(env or {})
        command = sweep_utils.create_sweep_command(list(sweep.get("command") or sweep_utils.DEFAULT_SWEEP_COMMAND))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    sweep_vars: dict[str, Any] = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    sweep_vars.update({"interpreter": ["python"], "program": [sweep.get("program", "")], "env": ["/usr/bin/env"]})
    out: list[str] = []
    for chunk in command:
        chunk = str(chunk)
        if chunk.startswith("${") and chunk.endswith("}"):
            out += sweep_vars.get(chunk[2:-1]) or []
        else:
            out.append(chunk)
    return out


def test_wandb_sweep_agent_command_parses_into_hydra_overrides(tmp_path):
    sweep = yaml.safe_load((REPO_ROOT / "experiments" / "sweeps" / "wandb_lr_masking.yaml").read_text())
    assert sweep["metric"] == {"name": "domain_dev_ppl_after", "goal": "minimize"}
    command = agent_command(sweep, {"optimizer.lr": 0.00031, "masking.rate": 0.3, "scheduler.warmup_ratio": 0.0})
    assert command[:3] == ["/usr/bin/env", "dapt", "train"]
    assert command[3:6] == ["optimizer.lr=0.00031", "masking.rate=0.3", "scheduler.warmup_ratio=0.0"]
    # Run what the agent would run (minus the env wrapper), asking Hydra for the composed config only.
    proc = dapt([*command[2:], "--cfg", "all", "--resolve"], cwd=tmp_path, env={"WANDB_RUN_ID": "abc123"})
    assert proc.returncode == 0, fail_message(proc)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["optimizer"]["lr"] == 0.00031 and cfg["masking"]["rate"] == 0.3 and cfg["scheduler"]["warmup_ratio"] == 0.0
    assert cfg["experiment_name"] == "sweep_lr_masking"
    assert cfg["hydra"]["run"]["dir"] == "outputs/sweep_lr_masking/abc123"  # one folder per W&B run
    assert not (tmp_path / "outputs").exists()  # --cfg runs nothing
    for name in sweep["parameters"]:  # every sweep parameter is a real config key
        node = cfg
        for part in name.split("."):
            node = node[part]


# ----------------------------------------------------------------------------- configs and bad input

def _compose_with_hydra(overrides: list[str]):
    from dapt.config import compose_config

    return compose_config(overrides, return_hydra_config=True)


def test_hparams_search_and_launcher_configs_compose():
    from omegaconf import OmegaConf

    cfg = _compose_with_hydra(["hparams_search=domain_ppl"])
    assert cfg.optimized_metric == "domain_dev_ppl_after" and cfg.hydra.sweeper.direction == "minimize"
    assert "optuna" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.max_failure_rate == 1.0
    cfg = _compose_with_hydra(["hparams_search=downstream_f1", "tasks=[chemprot]"])
    assert cfg.optimized_metric == "downstream/chemprot/after/dev_score/mean" and cfg.hydra.sweeper.direction == "maximize"
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "trainer=multinode"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == 8 == launcher["gpus_per_node"]
    assert "SlurmLauncher" in launcher["_target_"]
    cfg = _compose_with_hydra(["hydra/launcher=local_parallel"])
    assert "Joblib" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.n_jobs == 2
    for trainer, strategy in (("ddp", "ddp"), ("multinode", "ddp"), ("fsdp", "fsdp")):
        assert _compose_with_hydra([f"trainer={trainer}"]).trainer.strategy == strategy


def test_unknown_override_lists_valid_choices():
    from dapt.errors import ConfigError
    from dapt.launch.sweeps import check_overrides

    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer\.lrr' \(valid keys under 'optimizer': .*\blr\b"):
        check_overrides(["-m", "optimizer.lrr=1e-4,5e-4"], config_dir())
    with pytest.raises(ConfigError, match=r"unknown option 'hparams_search=nope' \(choices for hparams_search: domain_ppl, downstream_f1"):
        check_overrides(["hparams_search=nope"], config_dir())
    with pytest.raises(ConfigError, match=r"unknown option 'masking=nope'.*random"):
        check_overrides(["-m", "masking=random,nope"], config_dir())
    with pytest.raises(ConfigError, match=r"choices for hydra/launcher: .*local_parallel.*slurm.*submitit_local"):
        check_overrides(["hydra/launcher=slurmm"], config_dir())
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer\.strategy'.*use \+trainer\.strategy"):
        check_overrides(["trainer.strategy=ddp"], config_dir())
    # valid ones pass: sweeps, additions, deletions, hydra keys, keys a chosen option brings
    check_overrides(["-m", "optimizer.lr=1e-4,5e-4", "masking.rate=0.15,0.4", "+trainer.strategy=ddp", "~downstream",
                     "hydra.sweeper.n_trials=3", "trainer=ddp", "trainer.strategy=ddp", "hparams_search=domain_ppl",
                     "data.train.0.path=x.jsonl", "masking.rate=interval(0.1,0.5)"], config_dir())


def test_cli_unknown_key_is_one_line(tmp_path):
    proc = dapt(["train", "optimizer.lrr=1"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, fail_message(proc)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: unknown config key 'optimizer.lrr'") and "lr" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_objective_is_strict_only_for_optimising_sweepers():
    from omegaconf import OmegaConf

    from dapt.commands.train import _objective
    from dapt.errors import DaptError, TrainingError
    from dapt.launch.sweeps import BASIC_SWEEPER, JobInfo, sweeper_tracks_failures

    cfg = OmegaConf.create({"optimized_metric": "domain_ppl_after"})
    assert _objective(cfg, {"domain_ppl_after": 12.5}) == 12.5
    assert _objective(cfg, {}) is None  # DDP ranks other than 0 have no metrics
    assert math.isnan(_objective(cfg, {"domain_ppl_after": float("nan")}))
    with pytest.raises(TrainingError, match="is nan"):
        _objective(cfg, {"domain_ppl_after": float("nan")}, strict=True)
    with pytest.raises(DaptError, match="not among this run's metrics"):
        _objective(cfg, {"other": 1.0})
    assert not sweeper_tracks_failures(JobInfo(multirun=True, sweeper=BASIC_SWEEPER))
    assert sweeper_tracks_failures(JobInfo(multirun=True, sweeper="hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"))
    assert not sweeper_tracks_failures(None)
