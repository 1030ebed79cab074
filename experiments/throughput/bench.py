"""``make bench`` (``python -m experiments.throughput.bench``): dapt's training throughput vs the HF Trainer recipe, side by side.

Question: on the same machine, model, sequence length, batch and mask rate, how many training
tokens/s does dapt reach compared with transformers' ``run_mlm.py`` recipe, at no worse loss, how
far is it from the machine's matmul peak (MFU), and is the data pipeline / memory out of the way?

Stages (each run is a fresh process, see ``worker.py``):
1. peak: best dense fp32 and bf16 matmul FLOP/s, cached for training runs (``dapt.modeling.flops``);
   each recipe's MFU divides by the peak of the precision its matmuls run in.
2. head-to-head: ``rounds`` × (HF Trainer with its defaults, HF Trainer with its best setting for this
   hardware, dapt, and dapt in fp32 when dapt runs in bf16), order alternating; every run starts
   from the same weights, reads the same documents in the same order, trains ``steps`` steps; step
   times after ``warmup_steps`` → median tokens/s; the held-out loss after the run judges quality
   (dapt vs HF, and dapt's precision vs fp32, paired by round).
3. time to quality: training seconds for dapt and the HF recipe at its best to reach the same
   held-out loss from the same start (``time_to_quality``).
4. levers: dapt's step with one setting changed at a time (``levers.py``).
5. pipeline and memory (``pipeline.py``); 6. masking strategies (``experiments.throughput.masking_bench``, if present).

Prints a table; writes ``bench.json``; the last line is
``speedup_vs_hf_trainer=<x> speedup_vs_hf_best=<y> mfu=<z>``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments.throughput.common import BenchSettings, alternate, median, quiet_libraries, repo_root, spread

DEFAULT_OUT = Path(__file__).resolve().parent / "bench.json"
REQUIRED_KEYS = ("settings", "machine", "peak_flops", "peak_flops_by_dtype", "flops_per_token", "hf_trainer", "hf_best", "dapt",
                 "speedup_vs_hf_trainer", "speedup_vs_hf_best", "mfu", "quality", "time_to_quality", "levers", "pipeline", "memory", "masking",
                 "elapsed_s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.throughput.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps, one round: checks the plumbing in seconds")
    parser.add_argument("--rounds", type=int, help="A/B rounds of the head-to-head (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 14; smoke 4)")
    parser.add_argument("--warmup-steps", type=int, help="leading steps excluded from timing (default 4)")
    parser.add_argument("--levers", help="comma-separated levers to time, or 'none' (see experiments/throughput/levers.py)")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: ttq,levers,pipeline,memory,masking")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--arch", choices=("minilm", "bert-base"), help="model shape (default minilm: the real MiniLM-L6 weights)")
    parser.add_argument("--seq-len", type=int, help="tokens per block (default 128)")
    parser.add_argument("--batch-size", type=int, help="blocks per step (default 16)")
    parser.add_argument("--train-documents", type=int, help="OHSUMED documents read per run (default 600)")
    parser.add_argument("--precision", help="dapt's precision (default auto: bf16 where the hardware does it natively)")
    parser.add_argument("--compile", action="store_true", help="run dapt's head-to-head with model.compile=true")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to write bench.json")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace) -> BenchSettings:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    overrides: dict[str, Any] = {"device": device}
    for key in ("rounds", "steps", "warmup_steps", "arch", "seq_len", "batch_size", "train_documents", "precision"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.levers is not None:
        overrides["levers"] = () if args.levers.strip() in ("", "none") else tuple(x.strip() for x in args.levers.split(","))
    settings = BenchSettings.smoke(**overrides) if args.smoke else BenchSettings(**overrides)
    if settings.steps - settings.warmup_steps < 2:
        raise SystemExit(f"--steps ({settings.steps}) must exceed --warmup-steps ({settings.warmup_steps}) by at least 2")
    return settings


def dapt_runtime_env() -> dict[str, str]:
    """Environment that the ``dapt`` CLI applies to itself before torch loads (``dapt.cli.RUNTIME_ENV``,
    e.g. the OpenMP wait policy), so dapt's side of the benchmark runs exactly as ``dapt train`` does."""
    try:
        from dapt.cli import RUNTIME_ENV  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return {str(k): str(v) for k, v in dict(RUNTIME_ENV).items()}


def run_worker(
    spec: dict[str, Any], env_overrides: dict[str, str | None] | None = None, *, force: bool = False, inprocess: bool = False
) -> dict[str, Any]:
    """Run one spec in a fresh process (``worker.py``) and return its JSON result.

    ``env_overrides`` are defaults (a variable the user set wins, as with ``dapt``'s own
    ``setdefault``) unless ``force``; ``None`` removes a variable (only with ``force``).
    """
    _progress(f"{spec['kind']} run" + "".join(f" {k}={spec[k]}" for k in ("seed", "bf16", "precision", "probe_every") if spec.get(k) is not None))
    if inprocess:  # --smoke: checks the plumbing without paying a process start-up per run
        from experiments.throughput.worker import run

        started = time.perf_counter()
        result = run(spec)
        result["wall_s"] = time.perf_counter() - started
        return result
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo_root()), os.environ.get("PYTHONPATH", "")) if p)
    for key, value in (env_overrides or {}).items():
        if not force:
            if value is not None:
                env.setdefault(key, value)
        elif value is None:
            env.pop(key, None)
        else:
            env[key] = value
    with tempfile.TemporaryDirectory(prefix="dapt_bench_") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.throughput.worker", str(spec_path), str(out_path)],
            env=env, cwd=str(repo_root()), capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"bench worker {spec['kind']} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out_path.read_text())


def _progress(message: str) -> None:
    """One line per stage and per measured run on stderr (a few dozen lines in all, never a bar), so
    a bench of several minutes shows where it is, in a terminal and in a CI log alike."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from dapt.modeling.flops import _device_name

    info: dict[str, Any] = {
        "cpu": _device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_start": os.getloadavg(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "dapt_runtime_env": dapt_runtime_env(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def arms(settings: BenchSettings, compile_model: bool) -> list[tuple[str, dict[str, Any]]]:
    """The recipes timed side by side: (name, worker spec).

    ``hf_trainer``: the HF recipe with its defaults. ``hf_best``: with its best setting for this
    hardware per the HF docs (``bf16=True`` on a CPU that does bf16 natively; on a GPU the default run
    is already bf16, so no second arm). ``dapt``: dapt as ``dapt train`` runs it (``settings.precision``).
    ``dapt_fp32``: dapt in fp32, when dapt itself runs in another precision: the quality reference.
    """
    from dapt.precision import FP32, cpu_bf16_feature

    out: list[tuple[str, dict[str, Any]]] = [("hf_trainer", {"kind": "hf"})]
    if settings.device == "cpu" and cpu_bf16_feature():
        out.append(("hf_best", {"kind": "hf", "bf16": True}))
    out.append(("dapt", {"kind": "dapt", "compile": compile_model}))
    if settings.precision != FP32:
        out.append(("dapt_fp32", {"kind": "dapt", "compile": compile_model, "precision": FP32}))
    return out


def head_to_head(settings: BenchSettings, compile_model: bool) -> dict[str, Any]:
    """Alternating rounds of every arm (``arms``); tokens/s medians and paired speed-ups."""
    dapt_env: dict[str, str | None] = dict(dapt_runtime_env())
    base = {"settings": settings.as_dict()}

    def contender(name: str, spec: dict[str, Any]) -> tuple[str, Any]:
        if spec["kind"] == "hf":  # the recipe runs in the stock environment, also when the bench runs in dapt's (the dapt CLI's re-exec sets its allocator settings)
            return name, lambda r: run_worker({**base, **spec, "seed": r}, {k: None for k in dapt_env}, force=True,
                                              inprocess=settings.inprocess)
        return name, lambda r: run_worker({**base, **spec, "seed": r}, dapt_env, inprocess=settings.inprocess)

    runs = alternate(settings.rounds, [contender(name, spec) for name, spec in arms(settings, compile_model)])
    out: dict[str, Any] = {}
    for name, results in runs.items():
        out[name] = {
            "tokens_per_s": median(r["tokens_per_s"] for r in results),
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in results],
            "step_s_median": median(t for r in results for t in r["step_times"]),
            "eval_loss": median(r["eval_loss"] for r in results),
            "eval_loss_rounds": [r["eval_loss"] for r in results],
            "final_train_loss_rounds": [r["losses"][-1] if r["losses"] else None for r in results],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "runs": results,
        }
    out["dapt"]["model_config"] = runs["dapt"][0].get("dapt_model_config")
    out["dapt"]["runtime_env"] = dapt_env
    for other in ("hf_trainer", "hf_best", "dapt_fp32"):
        if other in runs:  # each round's arms ran back to back: the ratio per round is paired
            ratios = [d["tokens_per_s"] / o["tokens_per_s"] for o, d in zip(runs[other], runs["dapt"])]
            out[f"speedup_vs_{other}_rounds"] = ratios
            out[f"speedup_vs_{other}"] = median(ratios)
    return out


def time_to_quality(settings: BenchSettings) -> dict[str, Any]:
    """Training wall time for dapt and for the HF recipe (at its best setting for this hardware) to
    reach the same held-out loss from the same start (MosaicBERT's framing: speed that costs quality
    is not speed). Both train ``ttq_steps`` steps on the same documents with the same schedule; the
    held-out loss is measured every ``ttq_every`` steps (not counted as training time). The target is
    the worse of the two final losses, a level both reach; each time is interpolated between probes."""
    from dataclasses import replace

    from experiments.throughput.common import time_to_reach

    ttq = replace(settings, steps=settings.ttq_steps)
    base = {"settings": ttq.as_dict(), "seed": 0, "probe_every": settings.ttq_every}
    dapt_env: dict[str, str | None] = dict(dapt_runtime_env())
    hf_spec = dict(next((spec for name, spec in arms(settings, False) if name == "hf_best"), {"kind": "hf"}))
    runs = {
        "hf": run_worker({**base, **hf_spec}, {k: None for k in dapt_env}, force=True, inprocess=settings.inprocess),
        "dapt": run_worker({**base, "kind": "dapt"}, dapt_env, inprocess=settings.inprocess),
    }
    curves = {name: [tuple(point) for point in run["extra"]["curve"]] for name, run in runs.items()}
    target = max(curve[-1][1] for curve in curves.values())
    seconds = {name: time_to_reach(curve, target) for name, curve in curves.items()}
    ratio = seconds["hf"] / seconds["dapt"] if seconds["hf"] and seconds["dapt"] else None
    return {"steps": settings.ttq_steps, "probe_every": settings.ttq_every, "hf_recipe": hf_spec, "target_loss": target,
            "seconds_to_target": seconds, "ratio_hf_over_dapt": ratio, "curves": curves}


def precision_quality(h2h: dict[str, Any], share: float = 0.01) -> dict[str, Any]:
    """dapt in its precision against dapt in fp32, paired by round (same start, seed, data and masks).

    The final held-out loss is mostly the start's, so the check is on the *reduction* the run made:
    each round's bf16-minus-fp32 difference in final loss must be within ``share`` (1%) of fp32's
    reduction in that round. (Paired rounds share every random choice, so fp32's spread across
    rounds, which differ in seed, is not the noise of this difference.)
    """
    if "dapt_fp32" not in h2h:
        return {"verdict": "dapt ran in fp32: nothing to compare", "within_tolerance": None}
    runs, refs = h2h["dapt"]["runs"], h2h["dapt_fp32"]["runs"]
    rows = []
    for run, ref in zip(runs, refs):
        reduction = ref["start_eval_loss"] - ref["eval_loss"]
        diff = run["eval_loss"] - ref["eval_loss"]
        rows.append({"diff": diff, "fp32_reduction": reduction, "tolerance": share * abs(reduction)})
    ok = all(abs(r["diff"]) <= r["tolerance"] for r in rows)
    return {
        "rounds": rows,
        "share_of_reduction": share,
        "within_tolerance": ok,
        "verdict": "final held-out loss minus fp32's per round "
                   + ", ".join(f"{r['diff']:+.4f} (fp32 reduction {r['fp32_reduction']:.4f}, tolerance ±{r['tolerance']:.4f})" for r in rows)
                   + (": same quality" if ok else ": OUTSIDE TOLERANCE"),
    }


def _environment_levers(dapt_env: dict[str, str]) -> dict[str, tuple[str, dict[str, str | None]]]:
    """Levers that need their own process (read when the process starts): name -> (what, environment)."""
    passive = dapt_env.get("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "")).upper() == "PASSIVE"
    levers: dict[str, tuple[str, dict[str, str | None]]] = {
        "omp_default" if passive else "omp_passive": (
            "OpenMP default wait policy (spinning) instead of dapt's PASSIVE" if passive
            else "OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning at barriers)",
            {**dapt_env, "OMP_WAIT_POLICY": None if passive else "PASSIVE"},
        ),
    }
    if "GLIBC_TUNABLES" in dapt_env:
        levers["allocator_default"] = (
            "glibc's default malloc thresholds instead of dapt's GLIBC_TUNABLES (freed tensors go back to the kernel)",
            {**dapt_env, "GLIBC_TUNABLES": None},
        )
    return levers


def lever_stage(settings: BenchSettings) -> dict[str, Any]:
    """One-lever-at-a-time step timings, plus the environment levers (each needs a second process)."""
    dapt_env = dapt_runtime_env()
    env_levers = _environment_levers(dapt_env)
    wanted_env = [n for n in env_levers if n in settings.levers or (n.startswith("omp_") and "omp_passive" in settings.levers)
                  or (n == "allocator_default" and "allocator" in settings.levers)]
    names = tuple(n for n in settings.levers if n not in ("omp_passive", "allocator"))
    base = {"settings": settings.as_dict()}
    main = run_worker({**base, "kind": "levers", "levers": list(names)}, dict(dapt_env), inprocess=settings.inprocess)
    levers = main["levers"]
    if settings.inprocess:
        return levers
    ref = levers["dapt"]["step_s"]
    for name in wanted_env:
        description, env = env_levers[name]
        other = run_worker({**base, "kind": "levers", "levers": []}, env, force=True)["levers"]["dapt"]
        levers[name] = {
            "description": description,
            "step_s": other["step_s"],
            "tokens_per_s": other["tokens_per_s"],
            "speed_vs_dapt": ref / other["step_s"],
            "warmup_s": other["warmup_s"],
            "times": other["times"],
            "separate_process": True,
        }
    return levers


def masking_stage(settings: BenchSettings) -> dict[str, Any]:
    """Masking tokens/s per strategy from the masking helper's benchmark, when it is installed."""
    try:
        from experiments.throughput.masking_bench import benchmark_masking
    except ImportError as exc:
        return {"skipped": f"experiments.throughput.masking_bench not available ({exc})"}
    try:
        kwargs: dict[str, Any] = {"batch_size": settings.batch_size, "seq_len": settings.seq_len}
        if settings.tiny:
            kwargs["repeats"] = 5
        return {"tokens_per_s": benchmark_masking(**kwargs)}
    except Exception as exc:  # noqa: BLE001 - another helper's module: report, do not fail the bench
        return {"skipped": f"benchmark_masking failed: {type(exc).__name__}: {exc}"}


def _fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    return format(value, spec)


def print_report(r: dict[str, Any]) -> None:
    d = r["dapt"]
    s = r["settings"]
    model_name = "tiny model" if s["tiny"] else (s["model_source"] if s["arch"] == "minilm" else f"{s['arch']} shape, random weights")
    print(f"\n== dapt vs HF Trainer recipe: {model_name}, seq {s['seq_len']}, "
          f"batch {s['batch_size']}, mask {s['mask_rate']}, {s['steps']} steps ({s['warmup_steps']} warm-up), "
          f"{s['rounds']} A/B rounds, {r['machine']['cpu']} ({r['machine']['torch_threads']} threads) ==")
    print(f"{'recipe':<26}{'precision':>11}{'tokens/s':>10}{'step s':>9}{'held-out loss':>15}{'model GFLOP/tok':>17}{'MFU':>8}{'peak RSS MB':>13}")
    labels = {"hf_trainer": "HF Trainer (run_mlm)", "hf_best": "HF Trainer, bf16=True", "dapt": "dapt", "dapt_fp32": "dapt, fp32 (reference)"}
    for name, label in labels.items():
        row = r.get(name)
        if not row or "tokens_per_s" not in row:
            continue
        fpt = r["flops_per_token"]["hf_dense" if name.startswith("hf") else "dapt_sparse"]
        dtype = str(row.get("precision_dtype", "")).replace("torch.", "")
        print(f"{label:<26}{dtype:>11}{_fmt(row['tokens_per_s']):>10}{_fmt(row['step_s_median'], '.3f'):>9}"
              f"{_fmt(row['eval_loss'], '.4f'):>15}{_fmt(fpt / 1e9, '.3f'):>17}{_fmt(row.get('mfu'), '.1%'):>8}{_fmt(row['peak_rss_mb']):>13}")
    threads = [run.get("extra", {}).get("cpu_thread_choices") for run in d["runs"]]
    print(f"dapt ran with conf/model/{(d.get('model_config') or {}).get('name')} overrides "
          f"{(d.get('model_config') or {}).get('config_overrides')}, runtime env {d.get('runtime_env') or '{}'}, "
          f"CPU thread tuner choices (step, threads) per round {threads}")
    peaks = ", ".join(f"{k.replace('torch.', '')} {v / 1e9:.0f}" for k, v in r["peak_flops_by_dtype"].items())
    print(f"speed-up vs HF defaults per round: {', '.join(f'{x:.2f}x' for x in r['speedup_rounds'])}; "
          f"vs HF best {r['speedup_vs_hf_best']:.2f}x; matmul peaks (GFLOP/s) {peaks}")
    print(f"quality: {r['quality']['verdict']}; {s['precision']}: {r['quality']['precision']['verdict']}")
    t = r["time_to_quality"]
    if "skipped" not in t:
        hf_name = "HF bf16=True" if t["hf_recipe"].get("bf16") else "HF defaults"
        secs = t["seconds_to_target"]
        print(f"time to held-out loss {t['target_loss']:.4f} ({t['steps']} steps, probed every {t['probe_every']}): "
              f"dapt {_fmt(secs['dapt'], '.1f')} s, {hf_name} {_fmt(secs['hf'], '.1f')} s"
              + (f" -> {t['ratio_hf_over_dapt']:.2f}x" if t["ratio_hf_over_dapt"] else ""))
    if r["levers"] and "skipped" not in r["levers"]:
        print(f"\n{'lever (one change to dapt step)':<26}{'step s':>9}{'tokens/s':>10}{'vs dapt':>9}  what")
        for name, lv in r["levers"].items():
            print(f"{name:<26}{_fmt(lv['step_s'], '.3f'):>9}{_fmt(lv['tokens_per_s']):>10}{lv['speed_vs_dapt']:>8.2f}x  {lv['description']}")
    p = r["pipeline"]
    if "skipped" not in p:
        print(f"\ndata pipeline: {_fmt(p['pipeline_tokens_per_s'])} tokens/s = {p['vs_training']:.0f}x training; "
              f"raw tokenizer {_fmt(p['raw_tokenizer_tokens_per_s'])} tokens/s = {p['raw_over_pipeline']:.2f}x the pipeline")
    m = r["memory"]
    if "skipped" not in m:
        print(f"streaming memory: peak RSS {m['small']['peak_rss_mb']:.0f} MB ({m['small']['corpus_mb']:.1f} MB corpus) → "
              f"{m['large']['peak_rss_mb']:.0f} MB ({m['large']['corpus_mb']:.1f} MB corpus, {m['growth']}x): ratio {m['peak_rss_ratio']:.3f}")
    mk = r["masking"]
    if "tokens_per_s" in mk:
        print("masking tokens/s: " + ", ".join(f"{k} {_fmt(v)}" for k, v in mk["tokens_per_s"].items()))
    elif "skipped" in mk:
        print(f"masking: {mk['skipped']}")
    stages = ", ".join(f"{k} {v:.0f}" for k, v in r.get("stage_s", {}).items())
    print(f"bench.json: {r['out']}   ({r['elapsed_s']:.0f} s: {stages})")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (a failed stage raises, so CI sees it)."""
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_libraries()

    from dapt.modeling.flops import flops_per_token, measured_peak_flops, mfu
    from dapt.modeling.loading import load_tokenizer
    from experiments.throughput.common import load_base_model
    from experiments.throughput.pipeline import measure_memory, measure_pipeline

    settings = build_settings(args)
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    results: dict[str, Any] = {"settings": settings.as_dict(), "machine": machine_info(), "out": args.out}
    stage_s: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stage_s[name] = now - mark
        mark = now
        _progress(f"stage {name} done ({stage_s[name]:.0f} s)")
    from dapt.precision import BF16, FP32, matmul_dtype, resolve_precision

    settings.precision = resolve_precision(settings.precision, settings.device).value
    results["settings"] = settings.as_dict()
    # MFU against the peak of the precision each arm's matmuls run in (bf16 peak for bf16 arms);
    # only the dtypes some arm uses are measured.
    arm_precision = {"hf_trainer": BF16 if settings.device == "cuda" else FP32, "hf_best": BF16,
                     "dapt": settings.precision, "dapt_fp32": FP32}
    used = {name for name, _ in arms(settings, args.compile)}
    dtypes = {name: matmul_dtype(p, settings.device) for name, p in arm_precision.items() if name in used}
    peak_seconds = 0.5 if settings.tiny else 3.0
    peaks = {str(dt): measured_peak_flops(dt, settings.device, seconds=peak_seconds, refresh=True)
             for dt in dict.fromkeys(dtypes.values())}
    results["peak_flops_by_dtype"] = peaks
    arm_dtype = {name: str(dt) for name, dt in dtypes.items()}
    results["peak_flops"] = peaks[arm_dtype["dapt"]]
    model = load_base_model(settings)
    results["flops_per_token"] = {
        "dapt_sparse": flops_per_token(model, settings.seq_len, settings.mask_rate, sparse=True),
        "hf_dense": flops_per_token(model, settings.seq_len, settings.mask_rate, sparse=False),
    }
    del model
    lap("peak_and_flops")

    h2h = head_to_head(settings, args.compile)
    for name in ("hf_trainer", "hf_best", "dapt", "dapt_fp32"):
        if name in h2h:
            results[name] = h2h[name]
            fpt = results["flops_per_token"]["hf_dense" if name.startswith("hf") else "dapt_sparse"]
            results[name]["precision_dtype"] = arm_dtype[name]
            results[name]["mfu"] = mfu(h2h[name]["tokens_per_s"], fpt, peaks[arm_dtype[name]])
    if "hf_best" not in results:  # no better HF setting on this hardware than its default
        results["hf_best"] = {"same_as": "hf_trainer"}
    results["speedup_rounds"], results["speedup_vs_hf_trainer"] = h2h["speedup_vs_hf_trainer_rounds"], h2h["speedup_vs_hf_trainer"]
    results["speedup_vs_hf_best"] = h2h.get("speedup_vs_hf_best", h2h["speedup_vs_hf_trainer"])
    results["speedup_vs_hf_best_rounds"] = h2h.get("speedup_vs_hf_best_rounds", h2h["speedup_vs_hf_trainer_rounds"])
    results["speedup_vs_dapt_fp32"] = h2h.get("speedup_vs_dapt_fp32")
    results["mfu"] = results["dapt"]["mfu"]
    results["mfu_hf_trainer"] = results["hf_trainer"]["mfu"]
    hf_losses, dapt_loss = results["hf_trainer"]["eval_loss_rounds"], results["dapt"]["eval_loss"]
    tolerance = spread(hf_losses)
    delta = dapt_loss - results["hf_trainer"]["eval_loss"]
    results["quality"] = {
        "dapt_minus_hf_eval_loss": delta,
        "hf_round_spread": tolerance,
        "no_worse": bool(delta <= tolerance),
        "verdict": f"dapt held-out loss {'≤' if delta <= 0 else '>'} HF's by {abs(delta):.4f} (HF run-to-run ±{tolerance:.4f}): "
                   + ("no worse" if delta <= tolerance else "WORSE"),
        "precision": precision_quality(h2h),
    }

    lap("head_to_head")
    results["time_to_quality"] = {"skipped": "--skip ttq"} if "ttq" in skip else time_to_quality(settings)
    lap("time_to_quality")
    results["levers"] = {"skipped": "--skip levers"} if "levers" in skip or not settings.levers else lever_stage(settings)
    lap("levers")
    tokenizer = load_tokenizer(settings.model_source)
    if "pipeline" in skip:
        results["pipeline"] = {"skipped": "--skip pipeline"}
    else:
        pipe = measure_pipeline(settings, tokenizer)
        pipe["vs_training"] = pipe["pipeline_tokens_per_s"] / results["dapt"]["tokens_per_s"]
        pipe["raw_over_pipeline"] = pipe["raw_tokenizer_tokens_per_s"] / pipe["pipeline_tokens_per_s"]
        results["pipeline"] = pipe
    lap("pipeline")
    results["memory"] = {"skipped": "--skip memory"} if "memory" in skip else measure_memory(settings)
    lap("memory")
    results["masking"] = {"skipped": "--skip masking"} if "masking" in skip else masking_stage(settings)
    lap("masking")
    results["stage_s"] = stage_s
    results["machine"]["load_average_end"] = os.getloadavg()
    results["elapsed_s"] = time.perf_counter() - started
    last = (f"speedup_vs_hf_trainer={results['speedup_vs_hf_trainer']:.2f} speedup_vs_hf_best={results['speedup_vs_hf_best']:.2f} "
            f"mfu={results['mfu']:.4f}")
    results["last_line"] = last
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print_report(results)
    print(last, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
