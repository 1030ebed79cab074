"""Score saved models on a run's held-out sets outside ``dapt train``, as the pipeline scores them.

Shared by ``experiments.heldout_rescore`` (a finished run's models on today's sets) and
``experiments.dapt_biomed.heldout_budget`` (one model at several set sizes): the same config
composition, maskers, datamodule and evaluation loop as a run's start/after evaluation, in one
place, so neither script can drift from the pipeline on its own. Imports are inside the functions:
the scripts' ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass
class HeldoutSetup:
    """A composed and validated config with the tokenizer its held-out sets are built with."""

    cfg: Any
    run: Any
    tokenizer: Any

    def datamodule(self, **data_overrides: Any) -> Any:
        """The run's datamodule, built by the pipeline's own ``run_data`` (``data_overrides`` replace
        fields of its data config, e.g. ``eval_tokens``), with its held-out sets built."""
        from dapt.pipeline.run import run_data

        run = replace(self.run, data=replace(self.run.data, **data_overrides)) if data_overrides else self.run
        _, dm = run_data(self.cfg, run, self.tokenizer)
        dm.setup()
        return dm


def setup_for(overrides: list[str]) -> HeldoutSetup:
    """Compose ``overrides`` as ``dapt train`` would (no downstream tasks, no W&B) and validate them.

    Refuses runs with an extended vocabulary: they score every model with the extended tokenizer and
    an extended start, which only the run itself builds (re-run the arm instead). A run whose training
    documents came from a selection (kNN-TAPT/DSIR) is scored on the same held-out sets, but PMI or
    salient eval masks would be mined from the whole corpus rather than the selection."""
    import dapt.commands  # noqa: F401  (registers the config groups' schemas, as the dapt commands do)
    from dapt.config import compose_config
    from dapt.modeling.loading import load_tokenizer
    from dapt.pipeline.run_config import validate

    cfg = compose_config(["tasks=[]", "logger.wandb.enabled=false", *overrides])
    run = validate(cfg)
    if run.vocabulary.name != "none":
        raise SystemExit(f"vocabulary={run.vocabulary.name}: such runs are scored with their extended tokenizer and start; "
                         "re-scoring them here is not supported (re-run the arm instead)")
    return HeldoutSetup(cfg, run, load_tokenizer(run.model.tokenizer or run.model.source))


def score(model: Any, setup: HeldoutSetup, dm: Any, *, root_dir: str) -> dict[str, Any]:
    """``model``'s perplexities (with CIs), accuracies and per-document sums on every held-out set of
    ``dm``: the keys of ``dapt.pipeline.fit.evaluate_heldout``, as a run records its start and after."""
    from dapt.pipeline.fit import evaluate_heldout, make_module, make_trainer

    module = make_module(model, setup.run, eval_names=dm.eval_names, test_names=dm.test_names)
    trainer = make_trainer({**setup.run.trainer, "enable_progress_bar": False}, callbacks=[], loggers=None, root_dir=root_dir)
    return evaluate_heldout(trainer, module, dm)
