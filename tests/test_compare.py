"""``dapt compare`` on hand-made run folders: table, blanks for missing metrics, plots, bad input.

These are fast (no training). The same code on real sweep runs is tested in ``test_sweeps.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from matplotlib.transforms import Bbox

from dapt import reporting as compare
from dapt.commands.compare import main as compare_main
from dapt.errors import DaptError
from dapt.reporting import Run, comparison_table, config_differences, load_runs


def _config(lr: float, rate: float, seed: int = 42) -> dict:
    return {
        "experiment_name": "dapt_biomed", "seed": seed,
        "optimizer": {"name": "adamw", "lr": lr}, "masking": {"name": "random", "rate": rate},
        "paths": {"output_dir": f"/somewhere/{lr}-{rate}-{seed}"},  # differs, but is bookkeeping
        "tasks": ["ncbi_disease"],
    }


def _downstream(after: list[float], before: list[float], task: str = "ncbi_disease") -> dict:
    def cell(values: list[float]) -> dict:
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return {"mean": mean, "std": std, "values": values, "n": len(values)}

    return {task: {"metric": "f1", "before": {"test_f1": cell(before), "dev_f1": cell(before)},
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
    assert compare_main([str(sweep), "--out", str(out), "--sort", "domain_ppl_after"]) == 0
    printed = capsys.readouterr().out
    assert "4 runs (1 failed or unfinished)" in printed
    assert {p.name for p in out.iterdir()} == {"runs.csv", "runs.md", "ppl_curves.png", "downstream.png"}
    assert compare_main([str(sweep), "--filter", "masking.rate=0.15", "--format", "csv", "--no-plots", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("run,status,optimizer.lr")  # masking.rate no longer differs
    assert compare_main([str(sweep), "-f", "status=failed", "--format", "markdown", "--no-plots", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert compare_main([str(sweep), "-f", "group=dapt_biomed", "-f", "optimizer.lr=5e-4", "--format", "csv", "--no-plots", "--out", str(out)]) == 0
    assert [line.split(",")[0] for line in capsys.readouterr().out.strip().splitlines()[1:]] == ["1", "3"]
    # default output folder: <source>/compare for one folder, ./compare for several
    assert compare_main([str(sweep), "--no-plots", "--format", "csv"]) == 0
    assert (sweep / "compare" / "runs.csv").is_file()
    assert compare_main([str(sweep / "0"), str(sweep / "1"), "--no-plots", "--format", "csv"]) == 0
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


# ----------------------------------------------------------------------------- legibility: a sweep and a mixed bag of runs

def _full_metrics(ppl: float, general: float, control: float, f1: dict[str, float] | None, steps: int = 2000) -> dict:
    m = {"domain_dev_ppl_after": ppl * 1.02, "domain_ppl_before": 30.0, "domain_ppl_after": ppl,
         "domain_ppl_after_ci_low": ppl * 0.96, "domain_ppl_after_ci_high": ppl * 1.04,
         "domain_ppl_change": ppl / 30.0 - 1, "domain_ppl_change_ci_low": ppl / 30.0 - 1.03, "domain_ppl_change_ci_high": ppl / 30.0 - 0.97,
         "domain_ppl_change_vs_control": ppl / control - 1, "domain_ppl_change_vs_control_ci_low": ppl / control - 1.04,
         "domain_ppl_change_vs_control_ci_high": ppl / control - 0.96, "general_ppl_before": 25.0, "general_ppl_after": general,
         "general_ppl_after_ci_low": general * 0.95, "general_ppl_after_ci_high": general * 1.05, "forgetting": general / 25.0 - 1,
         "forgetting_vs_control": general / 26.0 - 1, "forgetting_vs_control_ci_low": general / 26.0 - 1.02,
         "forgetting_vs_control_ci_high": general / 26.0 - 0.98, "control/domain_ppl_after": control,
         "tokens_per_s": 51234.5, "train_tokens": steps * 4096, "steps": steps, "mfu": 0.31}
    for task, score in (f1 or {}).items():
        m[f"downstream/{task}/after/test_f1/mean"] = score
        m[f"downstream/{task}/after/test_f1/std"] = 0.01
        m[f"downstream/{task}/before/test_f1/mean"] = score - 0.02
        m[f"downstream/{task}/delta"] = 0.02
        m[f"downstream/{task}/p_value"] = 0.04
    return m


def _history(start: float, end: float, general: float, steps: int = 2000) -> list[dict]:
    points = 8
    return [{"step": steps * i // (points - 1), "val/domain/ppl": start * (end / start) ** (i / (points - 1)),
             "val/general/ppl": 25.0 * (general / 25.0) ** (i / (points - 1))} for i in range(points)]


def _overrides(run_dir: Path, overrides: list[str]) -> None:
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def _full_config(**changes: dict) -> dict:
    config = {"experiment_name": "dapt_biomed", "seed": 42, "model": {"name": "distilroberta-base", "hidden": 768},
              "data": {"name": "biomed", "max_length": 256}, "trainer": {"max_steps": 2000, "precision": "bf16"},
              "optimizer": {"name": "adamw", "lr": 1e-4}, "masking": {"name": "random", "rate": 0.15},
              "logger": {"wandb": {"name": None, "group": None}}, "tasks": ["ncbi_disease", "chemprot"],
              "paths": {"output_dir": "/x"}}
    for group, values in changes.items():
        config[group] = {**config[group], **values} if isinstance(values, dict) else values
    return config


@pytest.fixture()
def homogeneous(tmp_path: Path) -> Path:
    """A sweep of 5 runs that differ only in ``masking.rate`` (plus a shared override)."""
    root = tmp_path / "multirun" / "dapt_biomed" / "2026-03-03_10-00-00_ab12cd"
    for i, rate in enumerate((0.1, 0.15, 0.2, 0.3, 0.4)):
        ppl = 20.0 - 10 * rate
        run = _make_run(root / str(i), _full_config(masking={"rate": rate}),
                        _full_metrics(ppl, 26.0 + 5 * rate, 24.0, {"ncbi_disease": 0.80 + rate / 10, "chemprot": 0.70 - rate / 10}),
                        history=_history(30.0, ppl, 26.0 + 5 * rate),
                        downstream={**_downstream([0.80 + rate / 10 + d for d in (-0.01, 0, 0.01)], [0.79, 0.80, 0.78]),
                                    **_downstream([0.70 - rate / 10 + d for d in (-0.02, 0, 0.02)], [0.69, 0.70, 0.68], "chemprot")})
        _overrides(run, ["experiment=dapt_biomed", f"masking.rate={rate}"])
    return root


@pytest.fixture()
def heterogeneous(tmp_path: Path) -> list[Path]:
    """The default run and four short ones started by hand: different models, data, masking, many
    differing config keys, one named in W&B, one without downstream results."""
    out = tmp_path / "outputs"
    specs = [
        ("dapt_biomed/2026-03-03_09-00-00_1a2b3c", [], _full_config(), 2000),
        ("dapt_biomed/2026-03-03_11-20-41_9f8e7d", ["model=tiny", "trainer.max_steps=20"],
         _full_config(model={"name": "tiny-random-roberta", "hidden": 32}, trainer={"max_steps": 20}), 20),
        ("dapt_cs/2026-03-03_11-22-05_44aa10", ["data=cs", "tasks=[scierc,acl_arc]", "trainer.max_steps=50"],
         _full_config(experiment_name="dapt_cs", data={"name": "cs", "max_length": 512}, tasks=["scierc", "acl_arc"], trainer={"max_steps": 50}), 50),
        ("dapt_biomed/2026-03-03_11-25-12_c0ffee", ["masking=whole_word", "masking.rate=0.4", "optimizer.lr=5e-4", "seed=7", "trainer.precision=32"],
         _full_config(masking={"name": "whole_word", "rate": 0.4}, optimizer={"lr": 5e-4}, seed=7, trainer={"precision": "32"}), 50),
        ("dapt_biomed/2026-03-03_11-30-00_777777", ["logger.wandb.name=ablation-no-warmup-long-descriptive-name", "scheduler=constant"],
         _full_config(logger={"wandb": {"name": "ablation-no-warmup-long-descriptive-name", "group": "ablations"}},
                      trainer={"max_steps": 30, "gradient_clip_val": 1.0}), 30),
    ]
    dirs = []
    for i, (sub, overrides, config, steps) in enumerate(specs):
        ppl = 18.0 + 3 * i
        tasks = {t: 0.75 + 0.02 * i for t in config["tasks"]}
        has_downstream = i != 2  # the cs run finished without downstream results
        run = _make_run(out / sub, config, _full_metrics(ppl, 27.0 + i, 24.0, tasks if has_downstream else None, steps=steps),
                        history=_history(30.0, ppl, 27.0 + i, steps),
                        downstream={k: v for t in config["tasks"] for k, v in _downstream(
                            [0.75 + 0.02 * i + d for d in (-0.01, 0, 0.01)], [0.74, 0.75, 0.73], t).items()} if has_downstream else None)
        _overrides(run, overrides)
        dirs.append(run)
    return dirs


def _legible(fig) -> None:
    """The axes get most of the figure, nothing is cut off, and no legend covers an axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    union = Bbox.union(boxes)
    assert union.width >= 0.4 * width and union.height >= 0.4 * height, (union, fig.bbox)
    for box in boxes:  # no panel squeezed to a sliver by its neighbours, labels or legend
        assert box.width >= 0.4 * union.width / len(boxes) and box.height >= 0.4 * height
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        extent = legend.get_window_extent(renderer)
        assert not any(extent.overlaps(box) for box in boxes), (extent, boxes)
    tight = fig.get_tightbbox(renderer)  # inches: everything drawn lies inside the figure
    assert tight.x0 >= -0.05 and tight.y0 >= -0.05
    assert tight.x1 <= fig.get_figwidth() + 0.05 and tight.y1 <= fig.get_figheight() + 0.05


@pytest.mark.parametrize("kind", ["homogeneous", "heterogeneous"])
def test_plots_are_legible(kind, request, tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    sources = request.getfixturevalue(kind)
    runs = load_runs(sources if isinstance(sources, list) else [sources])
    labels = set(compare.run_labels(runs).values())
    for name, make in (("ppl", compare.perplexity_figure), ("downstream", compare.downstream_figure)):
        fig = make(runs)
        assert fig is not None
        _legible(fig)
        texts = {t.get_text() for ax in fig.axes for t in ax.get_xticklabels()} | {
            t.get_text() for legend in fig.legends for t in legend.get_texts()}
        assert texts & labels and all(len(t) <= compare.LABEL_WIDTH for t in texts)  # short labels, not config dumps
        plt.close(fig)
    out = compare.write_outputs(runs, comparison_table(runs), tmp_path / kind)
    for key in ("ppl_curves", "downstream"):
        with Image.open(out[key]) as image:
            assert out[key].stat().st_size > 5000 and min(image.size) >= 300
    if os.environ.get("DAPT_COMPARE_PNG_DIR"):  # to look at them: DAPT_COMPARE_PNG_DIR=/tmp/compare_png pytest ...
        target = Path(os.environ["DAPT_COMPARE_PNG_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        for key in ("ppl_curves", "downstream"):
            shutil.copy(out[key], target / f"{kind}_{out[key].name}")


def test_labels_are_short_unique_and_say_what_differs(homogeneous, heterogeneous):
    sweep = load_runs([homogeneous])
    assert list(compare.run_labels(sweep).values()) == [f"masking.rate={r}" for r in (0.1, 0.15, 0.2, 0.3, 0.4)]
    mixed = compare.run_labels(load_runs(heterogeneous))
    assert len(set(mixed.values())) == len(mixed) == 5
    assert all(len(label) <= compare.LABEL_WIDTH for label in mixed.values())
    assert list(mixed.values())[:2] == ["defaults", "model=tiny,max_steps=20"]  # overrides shortened to fit
    assert list(mixed.values())[4].startswith("ablation-no-warmup")  # the W&B run name wins
    twins = compare.run_labels([Run(name="a/0", path=Path("a/0")), Run(name="b/0", path=Path("b/0"))])
    assert sorted(twins.values()) == ["a/0", "b/0"]  # equal folder names fall back to the unique path


def _printed(runs, width: int, **kwargs) -> str:
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    compare.print_comparison(runs, comparison_table(runs, **kwargs), f"{len(runs)} runs", console=console)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 100, 160])
def test_printed_tables_fit_the_terminal(homogeneous, heterogeneous, width):
    for runs in (load_runs([homogeneous]), load_runs(heterogeneous)):
        for kwargs in ({}, {"metrics": "all"}):
            text = _printed(runs, width, **kwargs)
            lines = text.splitlines()
            assert max(len(line) for line in lines) <= width
            labels = compare.run_labels(runs).values()
            assert all(any(line.strip().startswith(label) for line in lines) for label in labels)  # one line per run, not folded
            assert "domain_ppl_after" in text and "config differences" in text


def test_config_differences_get_their_own_table(homogeneous, heterogeneous):
    text = _printed(load_runs([homogeneous]), 100)
    head = text.split("5 runs")[0]
    assert "masking.rate" in head and "0.15" in head and "optimizer.lr" not in text
    mixed = load_runs(heterogeneous)
    text = _printed(mixed, 100)
    head = text.split("5 runs")[0]
    for key in ("model.name", "data.name", "trainer.max_steps", "masking.name", "optimizer.lr", "seed"):
        assert key in head
    assert "tiny-random-roberta" in head and "whole_word" in head
    table = compare.config_table(mixed)
    assert list(table["run"]) == list(compare.run_labels(mixed).values())
    assert {"model.name", "data.name", "optimizer.lr", "seed"} <= set(table.columns)


def test_cli_prints_within_columns(homogeneous, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "90")
    assert compare_main([str(homogeneous), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert max(len(line) for line in printed.splitlines()) <= 90 and "masking.rate=0.3" in printed
    monkeypatch.setenv("COLUMNS", "90")
    assert compare_main([str(homogeneous), "--out", str(tmp_path / "o"), "--no-plots", "--average-seeds"]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 90
    full = (tmp_path / "o" / "runs.csv").read_text().splitlines()[0].split(",")
    assert "domain_ppl_after std" in full  # the files keep every column


def test_seed_std_is_pandas_sample_std():
    import numpy as np
    import pandas as pd

    values = [0.81, 0.79, 0.84, 0.80]
    runs = [Run(name=str(i), config={"seed": i, "masking.rate": 0.15}, metrics={"domain_ppl_after": v}) for i, v in enumerate(values)]
    avg = compare.average_over_seeds(comparison_table(runs), runs)
    assert avg["domain_ppl_after std"].iloc[0] == pytest.approx(np.std(values, ddof=1))
    assert pd.Series(values).std(ddof=1) == pytest.approx(np.std(values, ddof=1))
    one = compare.average_over_seeds(comparison_table(runs[:1]), runs[:1])
    assert np.isnan(one["domain_ppl_after std"].iloc[0])  # one run: no spread, blank (not 0)
    scores = compare.downstream_scores([Run(name="r", downstream={"t": {"after": {"test_f1": {"mean": 0.8, "values": values}}}})])
    assert scores[0]["std"] == pytest.approx(np.std(values, ddof=1))


def test_flatten_is_json_normalize_with_lists_as_json():
    assert compare.flatten({"a": {"b": 1, "c": {"d": "x"}}, "tags": ["p", "q"], "e": None}) == {
        "a.b": 1, "a.c.d": "x", "tags": '["p", "q"]', "e": None}


def test_cli_warns_when_general_perplexities_come_from_different_general_sets(sweep, tmp_path, capsys):
    """Runs scored before and after WikiText's markup was removed must not be compared silently."""
    for job, tokens in (("0", 304000), ("1", 232064)):
        path = sweep / job / "results.json"
        results = json.loads(path.read_text())
        results["heldout_sets"] = {"test": {"general": {"documents": 62, "tokens": tokens}}}
        path.write_text(json.dumps(results))
    assert compare_main([str(sweep), "--no-plots", "--format", "csv", "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: general perplexities scored on different general held-out sets" in err
    assert "test 62 documents / 304000 tokens / None masked: 0" in err and "test 62 documents / 232064 tokens / None masked: 1" in err
    results["heldout_sets"]["test"]["general"]["tokens"] = 304000
    (sweep / "1" / "results.json").write_text(json.dumps(results))
    assert compare_main([str(sweep), "--no-plots", "--format", "csv", "--out", str(tmp_path / "cmp")]) == 0
    assert "general held-out sets" not in capsys.readouterr().err
    # the same counts but other text (the sets' digests differ) is a different set too
    for job, digest in (("0", "aaaaaaaaaaaaaaaa"), ("1", "bbbbbbbbbbbbbbbb")):
        path = sweep / job / "results.json"
        results = json.loads(path.read_text())
        results["heldout_sets"] = {"test": {"general": {"documents": 62, "tokens": 304000, "digest": digest}}}
        path.write_text(json.dumps(results))
    assert compare_main([str(sweep), "--no-plots", "--format", "csv", "--out", str(tmp_path / "cmp")]) == 0
    assert "text+masks aaaaaaaa: 0" in capsys.readouterr().err


def test_general_set_grouping_does_not_depend_on_the_runs_order():
    """A run recorded before the digest (counts only) must not bridge two runs whose digests differ:
    in every order, runs with digests a and c are reported as scored on different sets; a run
    without a digest joins the one digest group its counts match."""
    import itertools

    from dapt.reporting.cells import general_sets_warning

    def job(name: str, digest: str | None) -> dict:
        general = {"documents": 62, "tokens": 232064, "masked_tokens": 34260} | ({"digest": digest} if digest else {})
        return {"name": name, "results": {"heldout_sets": {"test": {"general": general}}}}

    runs = [job("a", "a" * 16), job("b", None), job("c", "c" * 16)]
    for order in itertools.permutations(runs):
        warning = general_sets_warning(list(order), lambda j: j["name"])
        assert warning is not None and "text+masks aaaaaaaa" in warning and "text+masks cccccccc" in warning, [j["name"] for j in order]
    for order in itertools.permutations(runs[:2]):
        assert general_sets_warning(list(order), lambda j: j["name"]) is None
