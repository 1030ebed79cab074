"""One measured run in a fresh process: ``python -m experiments.throughput.worker SPEC.json OUT.json``.

Why a process per run: each side gets its own runtime environment (OpenMP wait policy and thread
count are fixed when torch loads, so dapt's CPU policy and the HF defaults cannot share a process),
a clean allocator, and its own peak RSS. Kinds: ``hf`` (the run_mlm recipe), ``dapt`` (dapt's
Lightning path) and ``levers`` (one-lever-at-a-time step timings, see ``levers.py``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Any

from experiments.throughput.common import (
    BenchSettings,
    StepClock,
    build_eval_batches,
    dapt_model_config,
    eval_loss,
    fresh_copy,
    load_base_model,
    peak_rss_mb,
    quiet_libraries,
    train_texts,
    with_config,
)


def _settings(spec: dict[str, Any]) -> BenchSettings:
    values = dict(spec["settings"])
    values["levers"] = tuple(values.get("levers", ()))
    return BenchSettings(**values)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Execute one spec and return a JSON-able result (timings, losses, held-out loss, RSS)."""
    quiet_libraries()
    import torch

    from dapt.modeling.loading import load_tokenizer

    settings = _settings(spec)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    seed = int(spec.get("seed", 0))
    tokenizer = load_tokenizer(settings.model_source)
    base = load_base_model(settings)
    kind = spec["kind"]
    out: dict[str, Any] = {"kind": kind, "threads": torch.get_num_threads()}
    dapt_cfg = dapt_model_config(settings)
    out["dapt_model_config"] = dapt_cfg
    if kind == "levers":
        from experiments.throughput.levers import measure_levers

        out["levers"] = measure_levers(
            with_config(base, dapt_cfg["config_overrides"]), settings, names=tuple(spec.get("levers", settings.levers)),
            checkpoint_attention_dropout=float(getattr(base.config, "attention_probs_dropout_prob", 0.0) or 0.0),
            compile_default=dapt_cfg["compile"],
        )
    else:
        evals = build_eval_batches(settings, tokenizer)
        # HF trains the checkpoint as it is; dapt trains it with dapt's conf/model settings.
        model = fresh_copy(base) if kind == "hf" else with_config(base, dapt_cfg["config_overrides"])
        clock = StepClock(probe=lambda: eval_loss(model, evals), every=int(spec.get("probe_every") or 0))
        out["start_eval_loss"] = eval_loss(model, evals)  # what the run's held-out loss reduction is measured from
        if clock.every:  # time-to-quality: the curve starts at the start model's held-out loss
            clock.curve.append((0.0, out["start_eval_loss"], 0))
        if kind == "hf":
            from experiments.throughput.hf_baseline import group_texts_dataset, run_hf_trainer

            dataset = group_texts_dataset(train_texts(settings), tokenizer, settings.seq_len)
            result = run_hf_trainer(model, tokenizer, dataset, settings, seed=seed, bf16=spec.get("bf16"), clock=clock)
        elif kind == "dapt":
            from experiments.throughput.dapt_run import run_dapt

            result = run_dapt(model, tokenizer, settings, seed=seed, compile_model=bool(spec.get("compile") or dapt_cfg["compile"]),
                              precision=spec.get("precision"), clock=clock)
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
        result.eval_loss = eval_loss(model, evals)
        out.update(asdict(result))
        out["step_times"] = result.step_times
        out["tokens_per_s"] = result.tokens_per_s
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m experiments.throughput.worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    started = time.perf_counter()
    result = run(spec)
    result["wall_s"] = time.perf_counter() - started
    with open(args[1], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
