"""The offline W&B run reader decodes what wandb itself wrote (group, tags, history, summary)."""

from __future__ import annotations

import os
import time

import pytest

from dapt.launch.sweeps import override_tags
from dapt.tracking.wandb_offline import iter_records, offline_runs, read_offline_run


def test_reader_roundtrips_a_real_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="dapt", dir=str(tmp_path), group="sweep_g", job_type="dapt", name="job-0",
                     tags=["optimizer.lr=0.0001", "masking.rate=0.4"], config={"optimizer": {"lr": 1e-4}}, mode="offline")
    for step, ppl in enumerate([50.0, 40.0, 35.0]):
        run.log({"val/domain/ppl": ppl, "trainer/global_step": step * 10})
    run.summary["domain_ppl_after"] = 35.0
    run.finish()

    files = offline_runs(tmp_path)
    assert len(files) == 1
    # wandb-core writes the file from its own process and may still be flushing after finish()
    # returns (seen when the service has run other work before): wait for the exit record.
    deadline = time.time() + 60
    while (rec := read_offline_run(files[0])).exit_code is None and time.time() < deadline:
        time.sleep(0.5)
    assert (rec.group, rec.job_type, rec.name, rec.project) == ("sweep_g", "dapt", "job-0", "dapt")
    assert rec.tags == ["optimizer.lr=0.0001", "masking.rate=0.4"]
    assert rec.config["optimizer"] == {"lr": 1e-4}
    assert [h["val/domain/ppl"] for h in rec.history] == [50.0, 40.0, 35.0]
    assert rec.summary["domain_ppl_after"] == 35.0
    assert rec.exit_code == 0
    assert read_offline_run(files[0].parent).run_id == rec.run_id  # the folder works too


def test_reader_rejects_other_files(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        list(iter_records(bad))


def test_override_tags_fit_wandb_limit():
    long = "data.train=[{type: jsonl, path: /very/long/path/to/some/corpus/file/train.jsonl}]"
    tags = override_tags(["optimizer.lr=1e-4", long, "optimizer.lr=1e-4", ""])
    assert tags[0] == "optimizer.lr=1e-4" and len(tags) == 2
    assert len(tags[1]) == 64 and tags[1].endswith("…")


def test_compare_reads_every_offline_file_of_a_run(tmp_path, monkeypatch):
    """A run with a second offline file (a resumed attempt writes a folder of its own) keeps its history and
    merges both summaries, the later segment (by the timestamp in its folder name, not the mtime, which
    cp and rsync scramble) winning a key both set."""
    wandb = pytest.importorskip("wandb")
    from dapt.reporting.runs import _offline_summary, _wandb_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="dapt", dir=str(tmp_path), id="abc123", mode="offline")
    for step, ppl in enumerate([50.0, 40.0, 35.0]):
        run.log({"val/domain/ppl": ppl, "trainer/global_step": step * 10})
    run.summary["domain_ppl_after"] = 35.0
    run.finish()
    again = wandb.init(project="dapt", dir=str(tmp_path), id="abc123", mode="offline", resume="allow")
    again.summary["doctor/warning"] = 2
    again.summary["domain_ppl_after"] = 30.0
    again.finish()
    first, second = sorted(offline_runs(tmp_path), key=lambda p: p.parent.name.replace("-abc123-1", "-abc123~"))
    os.utime(second, (1_000_000, 1_000_000))  # a copy that made the later segment look older
    os.utime(first, (2_000_000, 2_000_000))
    history = _wandb_history(tmp_path)
    assert list(history["step"]) == [0, 10, 20] and list(history["val/domain/ppl"]) == [50.0, 40.0, 35.0]
    summary = _offline_summary(tmp_path)
    assert summary["domain_ppl_after"] == 30.0 and summary["doctor/warning"] == 2


def test_offline_segments_sort_by_folder_timestamp_and_counter(tmp_path):
    from dapt.reporting.runs import _segment_order

    names = ["offline-run-20240102_000000-ab-c1", "offline-run-20240101_235959-ab-c1-1", "offline-run-20240101_235959-ab-c1",
             "offline-run-20240101_235959-ab-c1-2"]
    paths = [tmp_path / "wandb" / n / "run-ab-c1.wandb" for n in names]
    assert [p.parent.name for p in sorted(paths, key=_segment_order)] == [names[2], names[1], names[3], names[0]]
