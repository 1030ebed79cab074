"""Re-score a finished run's models on its held-out sets as the current code builds them.

When a held-out set changes (e.g. WikiText's markup removed from the general set), a finished run's
perplexities and changes are stale, but its models are not: this loads the run's start model (the
cached base), its control and its adapted model, scores all three on the held-out sets the run's own
overrides compose to now, and prints each perplexity with its CI, the paired changes (adapted vs
start, adapted vs control) and the run's recorded numbers beside them. Sets built exactly as the run
built them (``dapt.data.heldout.same_heldout_set``) must score as recorded: otherwise it says
MISMATCH and exits 1 (the check that nothing else moved).

    python -m experiments.heldout_rescore RUN_DIR [--out rescore.json]

RUN_DIR is a ``dapt train`` run directory (``results.json``, ``.hydra/overrides.yaml``, ``model/``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml

SETS = ("domain", "domain_dev", "general", "general_dev")
SKIP_OVERRIDES = ("hydra.", "resume=")  # where the run wrote, how it resumed: not what it measured


def _models(results: dict[str, Any], run_dir: Path, run: Any) -> dict[str, str]:
    """Paths of the run's start model, control and adapted model (those it recorded).

    Refuses runs whose start cannot be loaded as it was scored: a random-init start without a saved
    base (``heldout_scoring.setup_for`` has already refused extended vocabularies)."""
    start = (results.get("base") or {}).get("path")
    if not start:
        if run.model.random_init or run.model.config_overrides:
            raise SystemExit(f"{run_dir}: the start model was built at run time (random_init/config_overrides) and not saved")
        start = run.model.source
    models = {"start": start, "control": (results.get("control") or {}).get("path"), "adapted": results.get("model_dir") or str(run_dir / "model")}
    missing = [f"{name} ({path})" for name, path in models.items() if not path or not Path(path).exists()]
    if missing:
        raise SystemExit(f"{run_dir}: model files not found: {', '.join(missing)} (a cached base or control may have been cleaned)")
    return models


def _fmt(ppl: float | None, ci: Any) -> str:
    if ppl is None:
        return "-"
    return f"{ppl:8.2f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci and None not in ci else f"{ppl:8.2f}"


def _change(key: str, changes: dict[str, Any]) -> str:
    value, ci = changes.get(key), changes.get(f"{key}_ci")
    if value is None:
        return "-"
    return f"{value:+.1%} [{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci and None not in ci else f"{value:+.1%}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON here")
    args = parser.parse_args(argv)

    from dapt.modeling.loading import load_mlm_model
    from dapt.pipeline.results import perplexity_changes
    from experiments.heldout_scoring import score, setup_for

    for needed in ("results.json", ".hydra/overrides.yaml"):
        if not (args.run_dir / needed).is_file():
            raise SystemExit(f"{args.run_dir}: no {needed} (not a finished dapt train run directory)")
    results = json.loads((args.run_dir / "results.json").read_text())
    overrides = [o for o in yaml.safe_load((args.run_dir / ".hydra" / "overrides.yaml").read_text()) if not o.startswith(SKIP_OVERRIDES)]
    setup = setup_for(overrides)
    run = setup.run
    dm = setup.datamodule()
    scored: dict[str, dict[str, Any]] = {}
    for name, path in _models(results, args.run_dir, run).items():
        t0 = time.time()
        model = load_mlm_model(path, attn_implementation=run.model.attn_implementation).model
        scored[name] = score(model, setup, dm, root_dir=str(args.run_dir / "rescore"))
        print(f"{name}: {path} scored in {time.time() - t0:.0f} s", flush=True)

    recorded = {"start": "before", "adapted": "after"}
    rows: list[dict[str, Any]] = []
    print(f"\n{'set':<12} {'model':<8} {'perplexity now [95% CI]':<32} recorded")
    for key in SETS:
        for name, heldout in scored.items():
            old = (results.get("control") or {}) if name == "control" else results
            old_key = f"{key}_ppl_after" if name == "control" else f"{key}_ppl_{recorded[name]}"
            row = {"set": key, "model": name, "ppl": heldout.get(f"{key}_ppl"), "ci": heldout.get(f"{key}_ppl_ci"),
                   "recorded_ppl": old.get(old_key), "recorded_ci": old.get(f"{old_key}_ci")}
            rows.append(row)
            print(f"{key:<12} {name:<8} {_fmt(row['ppl'], row['ci']):<32} {_fmt(row['recorded_ppl'], row['recorded_ci'])}")
    # the run's own rule and key names (results.json "changes"), so the two columns line up key by key
    changes = perplexity_changes(scored["adapted"], scored["start"], scored["control"])
    recorded_changes = results.get("changes") or {}
    print(f"\n{'paired change (adapted)':<32} {'now':<28} recorded")
    for key in (k for k in changes if not k.endswith("_ci")):
        print(f"{key:<32} {_change(key, changes):<28} {_change(key, recorded_changes)}")
    info = {split: {name: dict(entry) for name, entry in sets.items()} for split, sets in dm.eval_info.items()}
    print(f"\nheld-out sets now: {json.dumps(info)}")
    mismatch = _unchanged_but_different(rows, info, results.get("heldout_sets") or {})
    for line in mismatch:
        print(f"MISMATCH: {line}")
    if args.out:
        from dapt.io import atomic_write_json
        from dapt.versioning import provenance

        atomic_write_json(args.out, {"run_dir": str(args.run_dir), "overrides": overrides, "provenance": provenance(),
                                     "precision": run.trainer.get("precision"), "mismatch": mismatch, "rows": rows,
                                     "changes": changes, "heldout_sets": info,
                                     "recorded_heldout_sets": results.get("heldout_sets")})

    if mismatch:
        raise SystemExit(f"{len(mismatch)} perplexities of unchanged held-out sets differ from the recorded ones: "
                         "the models, the code or the numerics are not those of the run")


def _unchanged_but_different(rows: list[dict[str, Any]], now: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """The perplexities of held-out sets that are built exactly as the run built them (same tokens and
    masks: ``same_heldout_set``) but no longer score as recorded: those must be equal, or the re-scoring
    is not of the same models under the same code and numerics."""
    from dapt.data.heldout import same_heldout_set

    out = []
    for row in rows:
        split, name = ("dev", row["set"][:-4]) if row["set"].endswith("_dev") else ("test", row["set"])
        same_set = same_heldout_set(now.get(split, {}).get(name), (recorded.get(split) or {}).get(name))
        if same_set and row["ppl"] is not None and row["recorded_ppl"] is not None and abs(row["ppl"] / row["recorded_ppl"] - 1) > 1e-6:
            out.append(f"{row['set']} {row['model']}: {row['ppl']:.4f} now, {row['recorded_ppl']:.4f} recorded")
    return out


if __name__ == "__main__":
    main()
