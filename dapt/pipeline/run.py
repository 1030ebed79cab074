"""``dapt train``: compose config → prepare base → stream, mask, adapt → evaluate → results.json.

``train(cfg)`` is a pure function of the composed config (the Hydra entry point is a thin wrapper in
``dapt.commands.train``) returning ``(metrics, objects)`` so tests and sweepers can call it directly.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dapt.data.datamodule import PackedCorpusDataModule
from dapt.data.sources import as_source, describe
from dapt.errors import IncompleteRunError, RunInterrupted, RunInUseError
from dapt.io import atomic_save_dir, atomic_write_json
from dapt.launch.ddp import debug_callbacks, local_ranks
from dapt.launch.ddp import rank_overrides as rank_overrides_for
from dapt.masking import MaskingContext, build_eval_masker, build_masker
from dapt.modeling.callbacks import RngStateCheckpoint, ThroughputMeter
from dapt.modeling.loading import load_mlm_model, load_tokenizer
from dapt.pipeline.base_prep import BaseInfo, base_stream, model_fingerprint, needs_preparation, prepare_base
from dapt.pipeline.control import control_config, run_control
from dapt.pipeline.fit import DOCUMENTS, apply_cpu_threads, cached_start_evaluation, evaluate_heldout, make_module, make_trainer, tuner_history
from dapt.pipeline.preflight import preflight
from dapt.pipeline.remedies import apply_remedies
from dapt.pipeline.results import RunResults, flat_metrics, log_summary, perplexity_changes, print_summary, stage_failure
from dapt.pipeline.resume import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    CheckpointConfig,
    ResumePoint,
    RunClock,
    checkpoint_callback,
    find_resume_point,
    keep_csv_history,
    restore_csv_history,
    resume_command,
    wandb_run_id,
    write_run_config,
)
from dapt.pipeline.run_config import RunConfig, checkpoint_config, general_sources, run_dir_of, validate
from dapt.pipeline.run_lock import LOCK_WAIT_SECONDS, RunLock
from dapt.pipeline.selection import select_documents
from dapt.pipeline.stop_signal import StopOnSignal
from dapt.pipeline.vocabulary import prepare_vocabulary
from dapt.precision import matmul_dtype, on_cuda
from dapt.progress import StepProgressBar
from dapt.tracking.loggers import build_loggers, finish_wandb, wandb_run_of
from dapt.versioning import provenance

log = logging.getLogger(__name__)


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, ResumePoint | None, RunLock | None]:
    """This run's directory: a new one, or with ``resume`` the interrupted run's own (then also set
    as ``paths.output_dir``, so everything that asks ``run_dir_of`` later writes there), and the
    lock that this process (global rank 0) now holds on it (None for a finished run, which is only
    read, and on other ranks). The lock is taken before ``paths.output_dir`` moves, so a run held by
    another live process is left untouched (its failure is recorded in this job's own folder)."""
    from dapt.launch.ddp import secondary_rank_process

    run_dir = run_dir_of(cfg)
    point = find_resume_point(cfg, run_dir)
    lock = None
    if not secondary_rank_process():
        for _ in range(3):  # the run may have moved on while we waited for its lock: look again once we hold it
            if point is not None and point.finished:
                break
            target = run_dir if point is None else point.run_dir
            lock = RunLock(target).acquire(wait=LOCK_WAIT_SECONDS)
            if point is None:
                break
            again = find_resume_point(cfg, run_dir)
            if again is not None and again.run_dir == point.run_dir and not again.finished:
                point = again  # (its checkpoint may be newer than when we looked)
                break
            lock.release()
            lock, point = None, again
        else:
            raise RunInUseError(f"resume: the run to continue kept changing while waiting for its lock (last: {target})")
    if point is None:
        return run_dir, None, lock
    with open_dict(cfg):
        cfg.paths.output_dir = str(point.run_dir)
    if not point.finished:
        log.warning("resuming %s from step %d (%s)", point.run_dir, point.step, point.checkpoint)
    return point.run_dir, point, lock


def train(cfg: DictConfig, *, rank_overrides: list[str] | None = None, rank_cwd: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one domain-adaptive pretraining job; returns (flat metrics, objects).

    SIGTERM/SIGINT stop it at a step boundary with a checkpoint and raise ``RunInterrupted``
    (see ``dapt.pipeline.resume``); ``resume=auto`` continues such a run. For a script-launched DDP
    trainer (``trainer=ddp`` on one machine) the other local ranks are started here, after this
    process resolved (and locked) the run folder: they run the job's command line
    (``rank_overrides``, from ``rank_cwd``) pointed at that folder and checkpoint.
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    run = validate(cfg)
    checkpoint = checkpoint_config(cfg)
    run_dir, resume, lock = resolve_run_dir(cfg)
    if resume is not None and resume.finished:  # resume=auto and this config already ran to the end
        results = json.loads((run_dir / "results.json").read_text())
        print_summary(results)
        print(f"resume=auto: this config already finished in {run_dir}; nothing recomputed. results: {run_dir / 'results.json'}", flush=True)
        return flat_metrics(results), {"results": results, "run_dir": run_dir}
    stopper = StopOnSignal(run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT if checkpoint.enabled else None)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True) if "trainer" in cfg else {}
    # Local ranks compute in rank 0's precision, not in what `auto` would pick on their own.
    children = rank_overrides_for(rank_overrides or [], run_dir, resume.checkpoint if resume else None,
                                  precision=run.precision.value)
    try:
        preflight(run, run_dir)  # positions, accelerator, free disk: seconds now instead of a late traceback
        write_run_config(run_dir, cfg)
        with local_ranks(trainer_cfg, run_dir, children, cwd=rank_cwd):
            stopper.install()
            return _train(cfg, run, run_dir, checkpoint, resume, stopper)
    except SIGTERMException:  # Lightning's stop (a SystemExit with status 0) after our signal handler asked for it
        raise stopper.interrupted(resume_hint=resume_command(sys.argv)) from None
    finally:
        stopper.uninstall()
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run: RunConfig, run_dir: Path, checkpoint: CheckpointConfig, resume: ResumePoint | None,
           stopper: StopOnSignal) -> tuple[dict[str, Any], dict[str, Any]]:
    control_cfg = control_config(cfg)
    seed = int(cfg.seed)
    data_dir = str(cfg.paths.data_dir)
    cache_dir = str(cfg.paths.cache_dir)
    pl.seed_everything(seed, workers=True, verbose=False)
    log.info("precision %s (%s)", run.precision.value, run.precision.reason)
    threads = apply_cpu_threads(run.trainer)

    tokenizer = load_tokenizer(run.model.tokenizer or run.model.source)
    selection = None
    if run.selection.enabled:  # kNN-TAPT / DSIR: train on the corpus documents most like the task's train text
        selection = select_documents(run.selection, sources=[as_source(s) for s in run.data.train], data_dir=data_dir, cache_dir=cache_dir)
        run.data = replace(run.data, train=[selection.as_source()])
        log.info("selection.%s: training on %d selected documents (%s)", run.selection.method, selection.documents, selection.path)

    def data_for(tokenizer: Any) -> tuple[Any, PackedCorpusDataModule]:
        return run_data(cfg, run, tokenizer)  # run.data as it is now (after a selection replaced it)

    masker, datamodule = data_for(tokenizer)

    loaded = load_mlm_model(
        run.model.source,
        random_init=run.model.random_init,
        config_overrides=run.model.config_overrides,
        attn_implementation=run.model.attn_implementation,
    )
    model = loaded.model
    base = BaseInfo(source=run.model.source, path=loaded.path, steps=0, cache_key=None, cached=False)
    if needs_preparation(run.base_prep, loaded.has_pretrained_head):
        base = prepare_base(
            model=model, tokenizer=tokenizer, model_cfg=run.model, model_path=loaded.path, base_cfg=run.base_prep,
            data_dir=data_dir, cache_dir=cache_dir, trainer_kwargs=run.trainer,
        )
        if base.cached:
            model = load_mlm_model(base.path, attn_implementation=run.model.attn_implementation).model
    elif not loaded.has_pretrained_head:
        log.warning("model has no pretrained MLM head and base_prep.mode=never: 'before' numbers use a random head")
    start_fingerprint = base.cache_key or {**model_fingerprint(run.model, loaded.path), "init_seed": seed}

    vocabulary = None
    if run.vocabulary.name != "none":
        # Domain tokens added to the start model: the whole run (held-out sets, masks, the control arm,
        # the "before" perplexities) then uses the extended tokenizer, so its perplexities compare with
        # each other; across tokenizers only downstream scores compare (README, "Remedies"). The
        # downstream "before" stays the original start (see _downstream).
        vocabulary = prepare_vocabulary(
            run.vocabulary, model=model, tokenizer=tokenizer, start_fingerprint=start_fingerprint,
            domain_documents=lambda: _documents(run.data.train, data_dir), general_documents=lambda: _documents(general_sources(cfg), data_dir),
            domain_description=describe([as_source(s) for s in run.data.train], data_dir), cache_dir=cache_dir,
            general_description=describe(general_sources(cfg), data_dir),
        )
        model, tokenizer = vocabulary.model, vocabulary.tokenizer
        start_fingerprint = {"vocabulary": vocabulary.cache_key}
        masker, datamodule = data_for(tokenizer)

    datamodule.setup()  # held-out sets are sampled once and shared by DAPT and the control arm
    control = None
    if control_cfg.enabled:
        control = run_control(
            cfg=cfg, run=run, control=control_cfg, start_model=model, start_fingerprint=start_fingerprint,
            tokenizer=tokenizer, masker=masker, datamodule=datamodule, data_dir=data_dir, cache_dir=cache_dir,
            root_dir=str(run_dir), base=base_stream(run.base_prep) if base.cache_key else None,
        )

    # Remedies change DAPT's model in place (freezing, LoRA), so they come after the control arm took its copy.
    remedies = apply_remedies(
        run.remedy, model=model, run=run, general_sources=general_sources(cfg) if run.remedy.ewc.weight else [], masker=masker,
        tokenizer=tokenizer, data_dir=data_dir, cache_dir=cache_dir, start_fingerprint=start_fingerprint, seed=seed,
    )
    module = make_module(model, run, eval_names=datamodule.eval_names, test_names=datamodule.test_names, remedies=remedies)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    experiment = str(cfg.experiment_name)
    tags = [str(t) for t in (cfg.get("tags") or [])]
    csv_history = keep_csv_history(run_dir, resume.step) if resume else []
    loggers = build_loggers(run.logger, run_dir, run_name=run_dir.name, group=experiment, tags=tags, config=resolved,
                            run_id=wandb_run_id(run_dir))
    restore_csv_history(loggers, csv_history)
    throughput = _throughput_monitor(model, run, masker.config.rate)
    clock = RunClock()  # wall time over all attempts of this run (a resumed attempt adds its own)
    callbacks: list[Any] = [throughput, StepProgressBar(description=f"dapt {run.data.name}"), stopper, RngStateCheckpoint(), clock]
    callbacks += debug_callbacks(run_dir)  # DAPT_RECORD_BLOCKS=1: each rank lists the blocks it trained on
    if checkpoint.enabled:
        callbacks.append(checkpoint_callback(checkpoint, run_dir))
    trainer = make_trainer(run.trainer, callbacks=callbacks, loggers=loggers, root_dir=str(run_dir), checkpointing=checkpoint.enabled)

    clock.start()  # the start model's evaluation, training and the final evaluation are timed
    before, before_cached = cached_start_evaluation(
        cache_dir, start_fingerprint, run, datamodule, lambda: evaluate_heldout(trainer, module, datamodule),
        write=trainer.is_global_zero, read=trainer.world_size == 1,
    )
    hint = resume_command(sys.argv)
    stopper.raise_if_signalled(trainer, resume_hint=hint)
    pl.seed_everything(seed, workers=True, verbose=False)  # the same RNG state as the control arm's fit
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume else None)
    stopper.raise_if_signalled(trainer, resume_hint=hint, training_done=True)
    after = evaluate_heldout(trainer, module, datamodule)
    stopper.raise_if_signalled(trainer, resume_hint=hint)
    train_seconds = clock.seconds()

    results: dict[str, Any] = {}
    objects: dict[str, Any] = {"trainer": trainer, "module": module, "datamodule": datamodule, "tokenizer": tokenizer}
    sharded = "fsdp" in type(trainer.strategy).__name__.lower() or "deepspeed" in type(trainer.strategy).__name__.lower()
    # A sharded strategy holds a slice of each weight per rank: every rank takes part in gathering
    # the full state dict, then rank 0 saves it. Other strategies save the module as it is.
    full_state = _gathered_model_state(trainer) if sharded and cfg.get("save_model", True) else None
    train_sources = datamodule.all_ranks_tokens_per_source()  # a collective: every rank takes part
    if trainer.is_global_zero:
        model_dir = run_dir / "model"
        failure: dict[str, Any] | None = None  # a stage after training that failed (results.json keeps the rest)
        late: Exception | None = None
        if cfg.get("save_model", True):
            try:
                atomic_save_dir(
                    model_dir,
                    # LoRA: adapters merged into the weights first, so from_pretrained loads a plain model
                    lambda tmp: (remedies.export(module.model).save_pretrained(tmp, state_dict=full_state), tokenizer.save_pretrained(tmp)),
                )
            except Exception as exc:  # noqa: BLE001 - disk full: the perplexities are still written below
                failure, late = stage_failure("save_model", exc), exc
        # Per-document loss sums of every arm, beside results.json: other runs scored on the same
        # held-out sets (a sweep) can be compared with paired CIs from them.
        atomic_write_json(run_dir / "heldout_documents.json", {
            "before": before[DOCUMENTS], "after": after[DOCUMENTS], "control": control.heldout.get(DOCUMENTS) if control else None,
        })
        record = RunResults(
            experiment=experiment,
            before=before,
            before_cached=before_cached,
            after=after,
            control=control.as_results() if control is not None else None,
            changes=perplexity_changes(after, before, control.heldout if control else None),
            tokens_per_s=throughput.tokens_per_s,
            mfu=throughput.mfu,
            train_tokens=throughput.tokens,
            train_sources=train_sources,
            data_quality=datamodule.data_quality(),
            steps=trainer.global_step,
            resumed_from_step=resume.step if resume else None,
            train_seconds=train_seconds,
            attempts=clock.attempts,
            precision={"value": run.precision.value, "reason": run.precision.reason},
            cpu_threads={**threads, "tuner_history": tuner_history(trainer)},
            provenance=provenance(),  # git commit, code digest, libraries, CPU/GPU, host, time
            heldout_sets=datamodule.eval_info,
            base=base.as_dict(),
            remedies=remedies.as_results(run),
            vocabulary=vocabulary.as_results() if vocabulary is not None else None,
            selection=selection.as_results() if selection is not None else None,
            # no adapted model to fine-tune after a failed save: downstream is skipped
            model_dir=str(model_dir) if cfg.get("save_model", True) and failure is None else None,
            data={"name": run.data.name, "train": describe([as_source(s) for s in run.data.train], data_dir)},
            config=resolved,
        )
        if failure is None:
            try:
                record.downstream = _downstream(cfg, base, record.model_dir, run_dir, loggers, control=control.path if control else None) or None
            except Exception as exc:  # noqa: BLE001 - hours of pretraining must not be lost to a late error
                failure, late = stage_failure("downstream", exc), exc
        record.error = failure
        results = record.to_json()
        atomic_write_json(run_dir / "results.json", results)
        if failure is None:  # finished: nothing left to resume, and an earlier attempt's failure is history
            if checkpoint.enabled and not checkpoint.keep:
                shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
            (run_dir / "failure.json").unlink(missing_ok=True)
        log_summary(loggers, results["metrics"])
        print_summary(results)
        print(f"results: {run_dir / 'results.json'}", flush=True)
        if isinstance(late, RunInterrupted):  # a signal during the downstream stage: its exit status, not 2
            raise late
        if failure is not None:
            raise IncompleteRunError(f"{failure['stage']} failed ({failure['type']}: {failure['message'].splitlines()[0] if failure['message'] else ''}); "
                                     f"what finished is in {run_dir / 'results.json'}")
    finish_wandb()
    metrics = flat_metrics(results) if results else {}
    objects["results"] = results
    objects["run_dir"] = run_dir
    return metrics, objects


def _gathered_model_state(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of ``MLMModule.model``; a collective call on every rank."""
    state = trainer.strategy.lightning_module_state_dict()
    prefix = "model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _throughput_monitor(model: torch.nn.Module, run: RunConfig, mask_rate: float) -> ThroughputMeter:
    """Tokens/s for every run, plus MFU (model FLOP/s ÷ the measured, disk-cached matmul peak)."""
    from dapt.modeling.flops import flops_per_token, measured_peak_flops

    device = "cuda" if on_cuda(run.trainer.get("accelerator")) else "cpu"
    dtype = matmul_dtype(run.precision.value, device)  # MFU against the peak of the precision the matmuls run in
    try:
        peak = measured_peak_flops(dtype=dtype, device=device)
    except Exception as exc:  # noqa: BLE001 - a failed measurement must not stop training
        log.warning("could not measure the matmul peak for MFU: %s", exc)
        peak = None

    def remeasure() -> float | None:
        try:
            return measured_peak_flops(dtype=dtype, device=device, refresh=True)
        except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory mid-run: no MFU, not a failed run
            log.warning("could not re-measure the matmul peak for MFU: %s", exc)
            return None

    # On a GPU the peak is one device's and each rank has its own; on a CPU it is measured with all of
    # this process's threads before any rank starts, i.e. the host's, which local ranks share.
    return ThroughputMeter(flops_per_token=flops_per_token(model, run.data.max_seq_length, mask_rate), peak_flops=peak,
                             remeasure_peak=remeasure, peak_per_rank=device == "cuda")


def run_data(cfg: DictConfig, run: RunConfig, tokenizer: Any) -> tuple[Any, PackedCorpusDataModule]:
    """The masker and checked datamodule of a run for ``tokenizer`` (rebuilt when the vocabulary is
    extended): missing/empty/binary/malformed corpora fail here, before any model work, and a budget
    that repeats the corpus is warned about. The one place a run's maskers and held-out sets are built,
    so scripts that re-score saved models (experiments.heldout_scoring) build exactly the run's sets."""
    data_dir, cache_dir = str(cfg.paths.data_dir), str(cfg.paths.cache_dir)
    max_steps = int(run.trainer["max_steps"])
    context = MaskingContext(
        tokenizer=tokenizer,
        domain_documents=lambda: _documents(run.data.train, data_dir),
        general_documents=lambda: _documents(general_sources(cfg), data_dir),
        cache_dir=str(Path(cache_dir) / "masking"),
    )
    masker = build_masker(cfg.masking, tokenizer, default_schedule_steps=max_steps, context=context)
    eval_masker = build_eval_masker(cfg.masking, tokenizer, context=context)
    datamodule = PackedCorpusDataModule(run.data, tokenizer, masker, data_dir=data_dir, seed=int(cfg.seed), eval_masker=eval_masker)
    datamodule.check_inputs()
    datamodule.plan_batches(max_steps * int(run.trainer.get("accumulate_grad_batches") or 1))
    return masker, datamodule


def _documents(sources: list[Any], data_dir: str) -> Any:
    from dapt.data.sources import iter_documents

    return iter_documents([as_source(s) for s in sources if s], data_dir)


def _downstream(cfg: DictConfig, base: BaseInfo, model_dir: str | None, run_dir: Path, loggers: list[Any], *,
                control: str | None = None) -> dict[str, Any]:
    tasks = cfg.get("tasks") or []
    if not tasks:
        return {}
    from dapt.evaluation.downstream import evaluate_downstream

    # The "before" model is what DAPT started from: the prepared base, or the checkpoint itself, also
    # with vocabulary=extend (the extended start is untrained in its new rows, a handicapped baseline;
    # this way runs with and without extension share one "before"). A randomly initialised model
    # without a base has no saved starting point to fine-tune.
    if base.cache_key:
        before: str | None = base.path
    else:
        before = None if bool(cfg.model.get("random_init", False)) else base.source
    return evaluate_downstream(cfg, before=before, after=model_dir, control=control, run_dir=run_dir, wandb_run=wandb_run_of(loggers))

