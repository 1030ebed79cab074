"""One MLM fit and one held-out evaluation, built the same way for the DAPT run and its control arm.

The control arm is only a control if it differs from DAPT in the training text alone: same module,
optimizer, schedule, masking, batch shape, trainer settings and seed. Both therefore build their
``MLMModule`` and ``Trainer`` here, from the same validated config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import pytorch_lightning as pl
import torch

from dapt import metric_names
from dapt.modeling.callbacks import CPU_THREADS, START_THREADS, AtomicCheckpointIO
from dapt.modeling.mlm_module import MLMModule

log = logging.getLogger(__name__)

HELDOUT_STATS = ("ppl", "acc")
DOCUMENTS = "documents"  # key of the per-document tables in evaluate_heldout's result


def stage_keys(heldout: dict[str, Any], stage: str) -> dict[str, Any]:
    """``evaluate_heldout`` keys as results.json names them: ``domain_ppl`` -> ``domain_ppl_<stage>``,
    ``domain_ppl_ci`` -> ``domain_ppl_<stage>_ci`` (the per-document tables are left out)."""
    return {(f"{k[:-3]}_{stage}_ci" if k.endswith("_ci") else f"{k}_{stage}"): v for k, v in heldout.items() if k != DOCUMENTS}


def relative_change(new: dict[str, Any], reference: dict[str, Any], key: str) -> tuple[float, float, float] | None:
    """``ppl_new / ppl_ref - 1`` for held-out set ``key`` (e.g. ``domain_dev_ppl``) with its paired CI.

    Both arms were scored on the same documents and masks, so the CI resamples documents jointly
    (``paired_change_ci``). None when either side lacks the per-document table.
    """
    import numpy as np

    from dapt.modeling.perplexity import paired_change_ci

    a, b = new.get(DOCUMENTS, {}).get(key), reference.get(DOCUMENTS, {}).get(key)
    if not a or not b:
        return None
    if a["ids"] != b["ids"] or a["counts"] != b["counts"]:
        log.warning("%s: the two arms were not scored on the same masked tokens; no paired change reported", key)
        return None
    return paired_change_ci(np.asarray(a["sums"]), np.asarray(b["sums"]), np.asarray(a["counts"]))


def make_module(model: torch.nn.Module, run: Any, *, eval_names: Sequence[str], test_names: Sequence[str],
                remedies: Any = None) -> MLMModule:
    """The ``MLMModule`` of a fit; ``remedies`` (``dapt.pipeline.remedies.AppliedRemedies``, DAPT only)
    adds its penalty and layer-wise learning-rate decay."""
    return MLMModule(
        model,
        tune_cpu_threads=run.trainer.get(CPU_THREADS) == "auto",
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        total_steps=int(run.trainer["max_steps"]),
        eval_names=eval_names,
        test_names=test_names,
        compile_model=run.model.compile,
        penalty=remedies.penalty if remedies is not None else None,
        layer_decay=remedies.layer_decay if remedies is not None else 1.0,
    )


def apply_cpu_threads(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Set the thread count ``trainer.cpu_threads`` asks for and say what the run uses (``results.json``
    ``cpu_threads``; ``run_config.cpu_threads`` says why it matters). Every setting sets the count
    explicitly (``all`` and ``auto`` the process's starting count), so an earlier job of a sweep in the
    same process, or a tuner stopped mid-run, cannot leave its count to the next run."""
    setting = trainer_cfg.get(CPU_THREADS, "all")
    torch.set_num_threads(setting if isinstance(setting, int) else START_THREADS)
    threads = torch.get_num_threads()
    log.info("cpu threads: %s", f"{threads}, fixed (the same bits on the same machine and software)" if setting != "auto" else
             f"tuned to the load from {threads} (trainer.cpu_threads=auto: fastest, but runs are not bit-reproducible)")
    return {"setting": setting, "threads": threads}


def tuner_history(trainer: pl.Trainer) -> list[list[int]]:
    """[global step, threads kept] after each probe of a ``CpuThreadTuner`` (empty: fixed threads)."""
    from dapt.modeling.callbacks import CpuThreadTuner

    return [[int(step), int(n)] for cb in trainer.callbacks if isinstance(cb, CpuThreadTuner) for step, n in cb.history]


def make_trainer(trainer_kwargs: dict[str, Any], *, callbacks: list[Any], loggers: list[Any] | None, root_dir: str,
                 checkpointing: bool = False) -> pl.Trainer:
    kwargs = {k: v for k, v in trainer_kwargs.items() if k != CPU_THREADS}
    kwargs.setdefault("enable_checkpointing", checkpointing)
    # Held-out metrics are evaluated before, during and after fit; metric states created under
    # inference_mode could not be updated later, so evaluation runs under no_grad instead.
    kwargs.setdefault("inference_mode", False)
    return pl.Trainer(logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()], default_root_dir=root_dir, **kwargs)


def evaluate_heldout(trainer: pl.Trainer, module: MLMModule, datamodule: Any) -> dict[str, Any]:
    """Dev and test perplexity (with CIs) and accuracy of ``module``'s model on every held-out set.

    Returns flat keys ``<set>_ppl`` / ``<set>_ppl_ci`` / ``<set>_acc`` for test and
    ``<set>_dev_ppl`` / ``<set>_dev_ppl_ci`` / ``<set>_dev_acc`` for dev (``set`` is domain/general),
    plus ``DOCUMENTS``: per set key, the per-document loss sums and masked-token counts that paired
    comparisons between arms resample (JSON-able lists, so cached arms keep them).
    """
    out: dict[str, Any] = {DOCUMENTS: {}}
    module.heldout_documents.clear()  # a set that yields nothing this time must not reuse an old table
    stages = (("dev", metric_names.DEV_LOOP, trainer.validate, datamodule.eval_names), ("test", metric_names.TEST_LOOP, trainer.test, datamodule.test_names))
    for split, prefix, run_loop, names in stages:
        if not names:
            continue
        logged: dict[str, float] = {}
        for entry in run_loop(module, datamodule=datamodule, verbose=False):
            logged.update({k: float(v) for k, v in entry.items()})
        for name in names:
            key = name if split == "test" else f"{name}_dev"
            for stat in HELDOUT_STATS:
                value = logged.get(metric_names.heldout(prefix, name, stat))
                if value is not None:
                    out[f"{key}_{stat}"] = value
            table = module.heldout_documents.get((prefix, name))
            if table is not None:
                out[DOCUMENTS][f"{key}_ppl"] = {"ids": table[0].tolist(), "sums": table[1].tolist(), "counts": table[2].tolist()}
            low, high = logged.get(metric_names.heldout(prefix, name, "ppl_low")), logged.get(metric_names.heldout(prefix, name, "ppl_high"))
            if low is not None and high is not None:
                out[f"{key}_ppl_ci"] = [None if math.isnan(low) else low, None if math.isnan(high) else high]
    return out


def heldout_eval_payload(run: Any, datamodule: Any) -> dict[str, Any]:
    """Everything besides a model's weights that determines its held-out numbers: the sets (sources,
    sampling, eval masks, tokenizer) and the numerics (precision, accelerator, attention kernel)."""
    return {"heldout": datamodule.heldout_fingerprint(), "precision": run.trainer.get("precision"),
            "accelerator": run.trainer.get("accelerator"), "attn": run.model.attn_implementation}


def content_key(payload: dict[str, Any], length: int = 20) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


def evaluation_code_fingerprint() -> str:
    """The code that turns fixed weights into held-out numbers (part of the cache key of a start
    model's evaluation, so that any change to it recomputes rather than serves an old number)."""
    import dapt.masking as masking
    from dapt import labels, sample_stats
    from dapt.data import datamodule, heldout, packing, quality, sources, wikitext
    from dapt.modeling import loading, mlm_module, perplexity, sparse_head
    from dapt.pipeline import fit
    from dapt.versioning import source_fingerprint

    return source_fingerprint(fit, mlm_module, loading, quality, sparse_head, perplexity, heldout, datamodule,
                              packing, sources, wikitext, masking.base, masking.selection, masking.units, masking.random, masking.whole_word, masking.span,
                              masking.pmi, masking.ngrams, masking.salient, masking.term_scores, labels, sample_stats)


def _read_cached_evaluation(path: Path) -> dict[str, Any] | None:
    """The held-out numbers of a cache entry; None when it is missing, unreadable or malformed."""
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("cached evaluation %s is unreadable (%s); recomputing it", path, err)
        return None
    if isinstance(entry, dict) and isinstance(entry.get("heldout"), dict) and DOCUMENTS in entry["heldout"]:
        log.info("start model's held-out numbers read from the cache: %s", path)
        return entry["heldout"]
    log.warning("cached evaluation %s is malformed; recomputing it", path)
    return None


def cached_start_evaluation(cache_dir: str | Path, start_fingerprint: Any, run: Any, datamodule: Any,
                            compute: Callable[[], dict[str, Any]], *, write: bool, read: bool = True) -> tuple[dict[str, Any], bool]:
    """``compute()`` (the start model's ``evaluate_heldout``), read from or written to the cache.

    The start model of a run (a prepared base, a hub checkpoint) is shared by every job of a sweep
    over DAPT knobs, and so are the held-out sets: its "before" numbers are the same in all of them
    and cost as much as the final evaluation. They are cached under a key of the start model's
    content fingerprint, the held-out sets and numerics, the evaluation code and library versions;
    an unreadable entry is a miss and is rewritten. Returns (numbers, whether they came from the cache).
    ``read=False`` (data-parallel runs) always computes: each rank would decide alone, before any
    process group exists, and an entry written by another job between two ranks' reads would send
    one rank into the evaluation's collectives and the other past them (a hang).
    """
    from dapt.io import atomic_write_json, non_finite_keys
    from dapt.versioning import library_versions

    key = content_key({"start": start_fingerprint, "eval": heldout_eval_payload(run, datamodule),
                       "code": evaluation_code_fingerprint(), "libraries": library_versions()})
    path = Path(cache_dir) / "evals" / f"{key}.json"
    cached = _read_cached_evaluation(path) if read else None
    if cached is not None:
        return cached, True
    heldout = compute()
    # Strict JSON brings inf/NaN back as null, a different value: such numbers are recomputed, not cached.
    if write and not non_finite_keys(heldout):
        atomic_write_json(path, {"start": start_fingerprint, "heldout": heldout})
    return heldout, False
