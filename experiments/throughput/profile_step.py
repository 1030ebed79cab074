"""Where the time of dapt's training step goes: ``torch.profiler`` over a few real steps.

    python -m experiments.throughput.profile_step            # bf16 autocast (dapt's default on CPUs with native bf16)
    python -m experiments.throughput.profile_step --fp32

The step is ``MLMModule.training_step`` (sparse head) + backward + clipping + foreach AdamW on
all-MiniLM-L6-v2 with a batch of 16 × 128 random-token blocks masked at 15%, outside Lightning, so the
table shows the model's own operators. Prints the mean step time and the operators by self CPU time.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from dapt.masking import build_masker
    from dapt.modeling.loading import load_mlm_model, load_tokenizer
    from dapt.modeling.mlm_module import MLMModule
    from experiments.throughput.common import MINILM, quiet_libraries

    parser = argparse.ArgumentParser(prog="profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp32", action="store_true", help="profile the fp32 step instead of bf16 autocast")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    quiet_libraries()
    tokenizer = load_tokenizer(MINILM)
    model = load_mlm_model(MINILM, attn_implementation="sdpa").model.train()
    masker = build_masker({"rate": 0.15}, tokenizer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2000, 20000, (16, 128), generator=generator)
    batch = masker(ids, torch.ones_like(ids, dtype=torch.bool), generator)
    module = MLMModule(model, eval_names=(), total_steps=100, tune_cpu_threads=False)
    module.log = lambda *a, **k: None  # type: ignore[method-assign]  # no Lightning trainer here
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            out = module.training_step(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    print(f"{'fp32' if args.fp32 else 'bf16 autocast'}: {(time.perf_counter() - started) / args.steps:.3f} s per step")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
