"""``dapt finetune model=<dir|hub id|package:...> task=<name>``: downstream scores for any checkpoint.

The same fine-tuning, seeds and table as the end of ``dapt train``, on its own: score a saved adapted
model, a hub model, or compare (``base_model=<source>`` and/or ``control_model=<source>`` are
fine-tuned with the same seeds and compared with the model: paired t-test, CI, minimum detectable
effect, Holm-corrected verdicts). Writes ``results.json`` in the Hydra run dir and prints ``results: <path>`` last.

``model`` is also a ``dapt train`` config group, and Hydra reads ``model=X`` as "pick option X of
group model". So ``main`` rewrites ``model=<source>`` to ``model.source=<source>`` (a ``conf/model``
option name such as ``minilm_l6`` is replaced by that option's source); the comparison models are
plain keys, ``base_model=<source>`` and ``control_model=<source>``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dapt.errors import ConfigError, DaptError

log = logging.getLogger(__name__)


def run_finetune(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` (and ``cfg.base_model`` / ``cfg.control_model`` when given) on ``cfg.task``;
    write ``results.json``."""
    from dapt.evaluation.cache import atomic_write_json
    from dapt.evaluation.downstream import downstream_config, evaluate_models, print_downstream_table

    model_node = cfg.get("model")
    model = model_node.get("source") if isinstance(model_node, DictConfig) else model_node
    if not model:
        raise ConfigError("model is not set: dapt finetune model=<dir|hub id|package:NAME> task=<name>")
    task = cfg.get("task")
    if not isinstance(task, DictConfig):
        raise ConfigError("task must name a conf/task/<name>.yaml (dapt finetune task=<name>)")
    base, control = cfg.get("base_model"), cfg.get("control_model")
    dcfg = downstream_config(cfg)
    if base or control:
        models = {"before": str(base) if base else None, "control": str(control) if control else None, "after": str(model)}
        models = {role: source for role, source in models.items() if source}
    else:
        models = {"model": str(model)}
    downstream = evaluate_models(
        [OmegaConf.to_container(task, resolve=True)],
        models,
        dcfg,
        data_dir=cfg.paths.data_dir,
        cache_dir=cfg.paths.get("cache_dir"),
        # every model here is a fixed checkpoint identified by its files: all of them may be cached
        cached_roles=tuple(models),
        run_dir=run_dir,
    )
    results = {
        "command": "finetune",
        "models": models,
        "task": OmegaConf.to_container(task, resolve=True),
        "downstream_config": {**dcfg.fingerprint(), "seeds": list(dcfg.seeds), "budget": dcfg.budget},
        "downstream": downstream,
    }
    path = run_dir / "results.json"
    atomic_write_json(path, results)
    print_downstream_table(downstream)
    print(f"results: {path}", flush=True)
    return results


def _task_fn(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        run_finetune(cfg, Path(HydraConfig.get().runtime.output_dir))
    except DaptError as exc:
        # One line, no traceback: the message names the file/line/key to fix.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def rewrite_model_overrides(argv: list[str], conf: Path) -> list[str]:
    """``model=<source>`` -> ``model.source=<source>`` (see the module docstring for why)."""
    from omegaconf import OmegaConf

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "model":
            option = conf / "model" / f"{value}.yaml"
            if value and "/" not in value and option.is_file():
                value = str(OmegaConf.load(option).get("source") or value)
            arg = f"model.source={value}"
        out.append(arg)
    return out


def main() -> None:
    """Hydra entry (``dapt finetune ...`` dispatches here); the config dir is resolved at call time."""
    import hydra

    from dapt.config import config_dir, register_resolvers
    from dapt.evaluation.tasks import resolve_task

    register_resolvers()
    try:
        conf = config_dir()
    except DaptError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        for arg in sys.argv[1:]:
            key, sep, value = arg.partition("=")
            if sep and key == "task" and "," not in value:  # a sweep (task=a,b) is left to Hydra
                resolve_task(value)  # unknown name: one line listing the available tasks
    except DaptError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *rewrite_model_overrides(sys.argv[1:], conf)]
    hydra.main(config_path=str(conf), config_name="finetune", version_base="1.3")(_task_fn)()


if __name__ == "__main__":
    main()
