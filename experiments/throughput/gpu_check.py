"""The whole GPU check in one command: dapt vs the HF Trainer recipe on one GPU, bf16, for MiniLM-L6
and bert-base shapes at sequence lengths 128 and 512.

    python -m experiments.throughput.gpu_check --out <dir>      # on a GPU machine (sized for < 8 minutes; not yet timed)

Why a script: a lent GPU machine is there for minutes, so one prepared command has to measure
everything and leave JSON behind. Each configuration is one ``bench`` run (``--rounds 1``, CPU-only
stages skipped), written to ``<dir>/bench_<arch>_seq<S>.json``; ``<dir>/gpu_check.json`` collects
the head-to-head figures and the target check (bert-base MFU >= 50% in bf16). ``bert-base`` is
random weights at bert-base-uncased's shape (no download; speed does not depend on the values).
MFU divides by the *measured* bf16 matmul peak of the GPU (``dapt.modeling.flops``), not the data
sheet's, so it says how close the step gets to what the GPU's BLAS reaches.
``--smoke`` runs the plumbing on the CPU with the tiny model (tests).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# (arch, seq_len, batch_size): 16k tokens per step everywhere, enough to keep an H100/H200 busy.
CONFIGS: tuple[tuple[str, int, int], ...] = (("minilm", 128, 128), ("minilm", 512, 32), ("bert-base", 128, 128), ("bert-base", 512, 32))
MFU_TARGET = 0.50


def summarize(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The figures that matter per configuration, from one bench.json."""
    return {
        "config": name,
        "precision": result["settings"]["precision"],
        "dapt_tokens_per_s": result["dapt"]["tokens_per_s"],
        "hf_tokens_per_s": result["hf_trainer"]["tokens_per_s"],
        "speedup_vs_hf_trainer": result["speedup_vs_hf_trainer"],
        "dapt_mfu": result["dapt"]["mfu"],
        "hf_mfu": result["hf_trainer"]["mfu"],
        "dapt_fp32_tokens_per_s": (result.get("dapt_fp32") or {}).get("tokens_per_s"),
        "precision_check": result["quality"]["precision"]["verdict"],
        "peak_flops_by_dtype": result["peak_flops_by_dtype"],
        "device": result["machine"].get("gpu") or result["machine"]["cpu"],
    }


def main(argv: list[str] | None = None) -> int:
    from experiments.throughput import bench

    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON files")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, one configuration: checks the plumbing")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = (("minilm", 64, 8),) if args.smoke else CONFIGS
    started = time.perf_counter()
    rows = []
    for i, (arch, seq_len, batch) in enumerate(configs, 1):
        name = f"{arch}_seq{seq_len}"
        print(f"[{i}/{len(configs)}] {name}, batch {batch} ({time.perf_counter() - started:.0f} s so far)", flush=True)
        path = out / f"bench_{name}.json"
        common = ["--rounds", "1", "--skip", "ttq,levers,pipeline,memory,masking", "--out", str(path)]
        if args.smoke:
            argv_i = ["--smoke", "--device", "cpu", *common]
        else:
            argv_i = ["--device", "cuda", "--arch", arch, "--seq-len", str(seq_len), "--batch-size", str(batch),
                      "--steps", str(args.steps), "--warmup-steps", "4", "--train-documents", "3000", *common]
        bench.main(argv_i)
        rows.append(summarize(name, json.loads(path.read_text())))
    bert = [r for r in rows if r["config"].startswith("bert-base")]
    report = {
        "rows": rows,
        "mfu_target": MFU_TARGET,
        "bert_base_mfu_target_met": all((r["dapt_mfu"] or 0) >= MFU_TARGET for r in bert) if bert else None,
        "elapsed_s": time.perf_counter() - started,
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{'config':<18}{'precision':>11}{'dapt tok/s':>12}{'HF tok/s':>11}{'speed-up':>10}{'dapt MFU':>10}{'HF MFU':>8}")
    for r in rows:
        print(f"{r['config']:<18}{r['precision']:>11}{r['dapt_tokens_per_s']:>12,.0f}{r['hf_tokens_per_s']:>11,.0f}"
              f"{r['speedup_vs_hf_trainer']:>9.2f}x{(r['dapt_mfu'] or 0):>10.1%}{(r['hf_mfu'] or 0):>8.1%}")
    print(f"gpu_check.json: {out / 'gpu_check.json'} ({report['elapsed_s']:.0f} s); bert-base MFU >= {MFU_TARGET:.0%}: "
          f"{report['bert_base_mfu_target_met']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
