"""How large must a held-out set be? Perplexity CI half-width vs token budget, on the default run.

Loads the default config's starting model (the cached general-MLM base; prepared first if missing),
builds each held-out set of the default data config at several ``data.eval_tokens`` budgets, and
prints perplexity with its 95% document-bootstrap CI and the relative half-width. The default
``eval_tokens`` in conf/data/common.yaml (test sets) gives a half-width of about 3% on the domain
test set (the README of this folder has the widths measured in the default run).

    python -m experiments.dapt_biomed.heldout_budget [override ...] [--budgets 65536,131072,262144]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--budgets", default="65536,131072,262144,393216")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)

    from dapt.modeling.loading import load_mlm_model
    from dapt.pipeline.base_prep import needs_preparation, prepare_base
    from experiments.heldout_scoring import score, setup_for

    setup = setup_for(args.overrides)
    cfg, run = setup.cfg, setup.run
    loaded = load_mlm_model(run.model.source, attn_implementation=run.model.attn_implementation)
    model = loaded.model
    if needs_preparation(run.base_prep, loaded.has_pretrained_head):
        base = prepare_base(model=model, tokenizer=setup.tokenizer, model_cfg=run.model, model_path=loaded.path, base_cfg=run.base_prep,
                            data_dir=str(cfg.paths.data_dir), cache_dir=str(cfg.paths.cache_dir), trainer_kwargs=run.trainer)
        model = load_mlm_model(base.path, attn_implementation=run.model.attn_implementation).model
    rows: list[dict[str, Any]] = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        t0 = time.time()
        dm = setup.datamodule(eval_tokens=budget, dev_eval_tokens=budget)
        heldout = score(model, setup, dm, root_dir="/tmp/heldout_budget")
        seconds = time.time() - t0
        for split, prefix in (("test", ""), ("dev", "_dev")):
            for name in ("domain", "general"):
                ppl, ci = heldout.get(f"{name}{prefix}_ppl"), heldout.get(f"{name}{prefix}_ppl_ci")
                info = dm.eval_info[split][name]
                half = (ci[1] - ci[0]) / 2 / ppl if ci and None not in ci else None
                rows.append({"budget": budget, "set": f"{name} {split}", "ppl": ppl, "ci": ci, "half_width": half,
                             "documents": info["documents"], "documents_in_split": info["documents_in_split"],
                             "masked_tokens": info["masked_tokens"], "eval_seconds_all_sets": round(seconds, 1)})
                interval = f"CI [{ci[0]:.2f}, {ci[1]:.2f}]  ±{half:.1%}" if half is not None else "CI unknown (one document)"
                print(f"eval_tokens={budget:>7}  {name:>7} {split:<4}  ppl {ppl:8.2f}  {interval}  "
                      f"docs {info['documents']}/{info['documents_in_split']}  masked {info['masked_tokens']}", flush=True)
        print(f"eval_tokens={budget}: all four sets evaluated in {seconds:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
