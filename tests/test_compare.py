"""``dapt compare`` on hand-made run folders: table, blanks for missing metrics, plots, bad input.

These are fast (no training). The same code on real sweep runs is tested in ``test_sweeps.py``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dapt.errors import DaptError
from dapt.tracking import compare
from dapt.tracking.compare import Run, comparison_table, config_differences, load_runs


def _config(lr: float, rate: float, seed: int = 42) -> dict:
    return {
        "experiment_name": "dapt_biomed", "seed": seed,
        "optimizer": {"name": "adamw", "lr": lr}, "masking": {"name": "random", "rate": rate},
        "paths": {"output_dir": f"/somewhere/{lr}-{rate}-{seed}"},  # differs, but is bookkeeping
        "tasks": ["ncbi_disease"],
    }


def _downstream(after: list[float], before: list[float]) -> dict:
    def cell(values: list[float]) -> dict:
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return {"mean": mean, "std": std, "values": values, "n": len(values)}

    return {"ncbi_disease": {"metric": "f1", "before": {"test_f1": cell(before), "dev_f1": cell(before)},
                             "after": {"test_f1": cell(after), "dev_f1": cell(after)}, "delta": 0.01, "p_value": 0.2}}


def _make_run(path: Path, config: dict, metrics: dict | None = None, *, history: list[dict] | None = None,
              downstream: dict | None = None, failure: str | None = None) -> Path:
    path.mkdir(parents=True)
    (path / ".hydra").mkdir()
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create(config), path / ".hydra" / "config.yaml")
    if metrics is not None:
        results = {"config": config, "metrics": metrics, **{k: v for k, v in metrics.items() if "/" not in k}}
        if downstream:
            results["downstream"] = downstream
        (path / "results.json").write_text(json.dumps(results))
    if failure:
        (path / "failure.json").write_text(json.dumps({"error": "ConfigError", "message": failure}))
    if history:
        (path / "csv").mkdir()
        keys = ["epoch", "step", "val/domain/ppl", "val/general/ppl"]
        with open(path / "csv" / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            for row in history:
                writer.writerow({"epoch": 0, **row})
    return path


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """A fake sweep: two finished runs (one with downstream scores), one with missing metrics,
    one failed job, plus a stray non-run folder."""
    root = tmp_path / "multirun" / "dapt_biomed" / "2026-01-01_00-00-00"
    hist = [{"step": 0, "val/domain/ppl": 50.0, "val/general/ppl": 40.0}, {"step": 10, "val/domain/ppl": 30.0, "val/general/ppl": 42.0}]
    _make_run(root / "0", _config(1e-4, 0.15), {"domain_ppl_before": 50.0, "domain_ppl_after": 30.0, "general_ppl_after": 42.0,
              "forgetting": 0.05, "downstream/ncbi_disease/after/test_f1/mean": 0.81},
              history=hist, downstream=_downstream([0.80, 0.82, 0.81], [0.78, 0.79, 0.77]))
    _make_run(root / "1", _config(5e-4, 0.15), {"domain_ppl_before": 50.0, "domain_ppl_after": 25.0},
              history=[{"step": 0, "val/domain/ppl": 50.0, "val/general/ppl": 40.0}, {"step": 10, "val/domain/ppl": 25.0, "val/general/ppl": 45.0}])
    _make_run(root / "2", _config(1e-4, 0.4), {})  # finished but no metrics recorded
    _make_run(root / "3", _config(5e-4, 7.0), None, failure="masking.rate=7.0 must be in (0, 1)")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a run")
    return root


def test_table_has_one_row_per_run_with_differences_and_blanks(sweep):
    runs = load_runs([sweep])
    assert [r.name for r in runs] == ["0", "1", "2", "3"]
    assert [r.status for r in runs] == ["ok", "ok", "ok", "failed"]
    assert config_differences(runs) == ["optimizer.lr", "masking.rate"]  # paths.* is bookkeeping
    table = comparison_table(runs)
    assert list(table.columns[:4]) == ["run", "status", "optimizer.lr", "masking.rate"]
    assert "domain_ppl_after" in table.columns and "downstream/ncbi_disease/after/test_f1/mean" in table.columns
    assert len(table) == 4
    blank = table.set_index("run")
    assert blank.loc["2", "domain_ppl_after"] != blank.loc["2", "domain_ppl_after"]  # NaN: blank, not a crash
    assert "must be in (0, 1)" in blank.loc["3", "error"]
    ordered = comparison_table(runs, sort="domain_ppl_after")
    assert list(ordered["run"]) == ["1", "0", "2", "3"]  # missing values last
    assert list(comparison_table(runs, sort="domain_ppl_after", descending=True)["run"])[:2] == ["0", "1"]
    with pytest.raises(DaptError, match="cannot sort by 'nope'"):
        comparison_table(runs, sort="nope")


def test_markdown_and_csv_show_blanks(sweep, tmp_path):
    runs = load_runs([sweep])
    table = comparison_table(runs, metrics=["domain_ppl_after", "not_a_metric"])
    md = compare.to_markdown(table)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| run | status | optimizer.lr | masking.rate | domain_ppl_after | not_a_metric")
    assert "| 2 | ok | 0.0001 | 0.4 |  |  |" in md
    written = compare.write_outputs(runs, table, tmp_path / "out", plots=False)
    rows = list(csv.DictReader(open(written["csv"])))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"] and rows[2]["domain_ppl_after"] == ""


def test_plots_are_written(sweep, tmp_path):
    runs = load_runs([sweep])
    curves = compare.plot_perplexity(runs, tmp_path / "ppl.png")
    bars = compare.plot_downstream(runs, tmp_path / "down.png")
    assert curves and curves.stat().st_size > 5000
    assert bars and bars.stat().st_size > 5000
    scores = compare.downstream_scores(runs)
    after = next(s for s in scores if s["stage"] == "after")
    assert after["run"] == "0" and after["metric"] == "test_f1" and after["n"] == 3
    assert after["std"] == pytest.approx(0.01)


def test_cli_writes_everything_and_filters(sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    assert compare.main([str(sweep), "--out", str(out), "--sort", "domain_ppl_after"]) == 0
    printed = capsys.readouterr().out
    assert "4 runs (1 failed or unfinished)" in printed
    assert {p.name for p in out.iterdir()} == {"runs.csv", "runs.md", "ppl_curves.png", "downstream.png"}
    assert compare.main([str(sweep), "--filter", "masking.rate=0.15", "--format", "csv", "--no-plots", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("run,status,optimizer.lr")  # masking.rate no longer differs
    assert compare.main([str(sweep), "-f", "status=failed", "--format", "markdown", "--no-plots", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert compare.main([str(sweep), "-f", "group=dapt_biomed", "-f", "optimizer.lr=5e-4", "--format", "csv", "--no-plots", "--out", str(out)]) == 0
    assert [line.split(",")[0] for line in capsys.readouterr().out.strip().splitlines()[1:]] == ["1", "3"]
    # default output folder: <source>/compare for one folder, ./compare for several
    assert compare.main([str(sweep), "--no-plots", "--format", "csv"]) == 0
    assert (sweep / "compare" / "runs.csv").is_file()
    assert compare.main([str(sweep / "0"), str(sweep / "1"), "--no-plots", "--format", "csv"]) == 0
    assert (tmp_path / "compare" / "runs.md").is_file()


def test_run_folders_from_different_sweeps_get_distinct_names(sweep, tmp_path):
    other = _make_run(tmp_path / "outputs" / "dapt_cs" / "2026-02-02_00-00-00", _config(1e-4, 0.15), {"domain_ppl_after": 9.0})
    runs = load_runs([sweep / "0", other])
    assert len({r.name for r in runs}) == 2 and all("/" in r.name for r in runs)


def test_average_over_seeds(tmp_path):
    for seed, ppl in ((1, 10.0), (2, 12.0), (3, 14.0)):
        _make_run(tmp_path / "s" / str(seed), _config(1e-4, 0.15, seed=seed), {"domain_ppl_after": ppl})
    _make_run(tmp_path / "s" / "9", _config(5e-4, 0.15, seed=1), {"domain_ppl_after": 20.0})
    runs = load_runs([tmp_path / "s"])
    avg = compare.average_over_seeds(comparison_table(runs), runs)
    assert len(avg) == 2
    row = avg[avg["optimizer.lr"] == 1e-4].iloc[0]
    assert row["runs"] == 3 and row["domain_ppl_after"] == pytest.approx(12.0) and row["domain_ppl_after std"] == pytest.approx(2.0)


def test_empty_or_missing_source_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DaptError, match="no dapt runs in"):
        load_runs([tmp_path / "empty"])
    from dapt.cli import main as cli_main

    assert cli_main(["compare", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no dapt runs in")
    with pytest.raises(DaptError, match="no such folder"):
        load_runs([tmp_path / "nope" / "x"])
    with pytest.raises(DaptError, match="key=value"):
        load_runs([tmp_path / "empty"], ["masking.rate"])


def test_wandb_project_offline_says_so(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(DaptError, match="needs network access"):
        load_runs(["my-team/dapt"])


def test_wandb_project_through_the_api(monkeypatch):
    """The W&B public API path, with a stand-in API object (no network here)."""
    calls = {}

    class FakeRun(SimpleNamespace):
        def history(self, keys=None, x_axis=None, pandas=True):
            import pandas as pd

            return pd.DataFrame({"trainer/global_step": [0, 10], "val/domain/ppl": [50.0, self.summary["domain_ppl_after"]]})

    class FakeApi:
        def runs(self, path, filters=None):
            calls["path"], calls["filters"] = path, filters
            return [
                FakeRun(id="a1", name="lr-1e-4", state="finished", config={"optimizer": {"lr": 1e-4}, "masking.rate": 0.15, "_wandb": {}},
                        summary={"domain_ppl_after": 30.0, "_runtime": 3}),
                FakeRun(id="b2", name="lr-5e-4", state="crashed", config={"optimizer": {"value": {"lr": 5e-4}}, "masking.rate": 0.15},
                        summary={"domain_ppl_after": 25.0}),
            ]

    runs = load_runs(["team/dapt"], ["group=dapt_biomed", "masking.rate=0.15"], api=FakeApi())
    assert calls["path"] == "team/dapt"
    assert calls["filters"] == {"$and": [{"group": "dapt_biomed"}, {"config.masking.rate": 0.15}]}
    assert [r.status for r in runs] == ["ok", "failed"]
    assert runs[0].config["optimizer.lr"] == 1e-4 and runs[1].config["optimizer.lr"] == 5e-4
    assert runs[0].metrics == {"domain_ppl_after": 30.0}
    table = comparison_table(runs)
    assert list(table["optimizer.lr"]) == [1e-4, 5e-4]
    assert list(runs[1].history["val/domain/ppl"]) == [50.0, 25.0]


def test_run_without_results_uses_hydra_config(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        "data:\n  name: cs\nexperiment_name: dapt_${data.name}\npaths:\n  output_dir: ${hydra:runtime.output_dir}\n"
    )
    run = compare.load_run(run_dir)
    assert run.status == "incomplete" and run.metrics == {}
    assert run.config["experiment_name"] == "dapt_cs"  # resolved where it can be
    assert run.history.empty and Run(name="bare").history.empty
