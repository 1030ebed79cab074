"""Runs of a W&B ``entity/project`` through the public API (online only), as ``runs.Run``s.

Apart from the local loaders because it is the one source that needs network and a login, and whose
config arrives half nested, half dotted (sweep parameters): it is merged into one tree and flattened
like a local run's, so W&B runs and run folders compare key for key.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from dapt.errors import DaptError
from dapt.reporting.runs import CURVE_KEYS, Run, frame_by_step, is_scalar
from dapt.reporting.table import flatten


def wandb_filters(filters: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``key=value`` filters as a W&B API (MongoDB-style) filter."""
    direct = {"group": "group", "job_type": "jobType", "state": "state", "name": "display_name", "sweep": "sweep"}
    clauses = []
    for key, value in filters:
        if key == "tag" or key == "tags":
            clauses.append({"tags": {"$in": [value]}})
        elif key in direct:
            clauses.append({direct[key]: value})
        elif key.startswith(("summary.", "summary_metrics.")):
            clauses.append({f"summary_metrics.{key.split('.', 1)[1]}": value})
        else:
            clauses.append({f"config.{key.removeprefix('config.')}": value})
    if not clauses:
        return {}
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def load_wandb_runs(project: str, filters: Sequence[tuple[str, Any]] = (), api: Any = None) -> list[Run]:
    """Runs of W&B ``entity/project`` through the public API (needs network and an API key)."""
    if api is None:
        import wandb

        if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            raise DaptError(
                f"reading W&B project '{project}' needs network access and a W&B login (WANDB_API_KEY or `wandb login`); "
                "offline, pass sweep or run folders instead (or `wandb sync` them first)"
            )
        try:
            api = wandb.Api(timeout=30)
        except Exception as exc:  # noqa: BLE001
            raise DaptError(f"cannot reach the W&B API for '{project}': {exc}") from exc
    try:
        remote = list(api.runs(project, filters=wandb_filters(filters) or None))
    except Exception as exc:  # noqa: BLE001 - wandb raises CommError/ValueError/HTTP errors
        raise DaptError(f"cannot list W&B runs of '{project}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    runs = []
    for r in remote:
        config = {k: v for k, v in dict(r.config).items() if not k.startswith("_")}
        summary = getattr(r.summary, "_json_dict", None) or dict(r.summary)
        state = getattr(r, "state", "finished")
        runs.append(Run(
            name=getattr(r, "name", None) or r.id,
            status={"finished": "ok", "failed": "failed", "crashed": "failed"}.get(state, state),
            config=flatten(_unflatten_wandb(config)),
            metrics={k: v for k, v in summary.items() if not k.startswith("_") and is_scalar(v)},
            wandb_name=getattr(r, "name", None) or None,
            _history_loader=_remote_history(r),
        ))
    return runs


def _netrc_has_wandb() -> bool:
    try:
        import netrc

        return any("wandb" in host for host in netrc.netrc().hosts)
    except Exception:  # noqa: BLE001
        return False


def _unflatten_wandb(config: dict[str, Any]) -> dict[str, Any]:
    """W&B keeps nested config as dicts, but sweep parameters as dotted keys: merge both into a tree."""
    tree: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and set(value) == {"value"}:
            value = value["value"]
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return tree


def _remote_history(run: Any) -> Any:
    def load() -> Any:
        import pandas as pd

        try:
            frame = run.history(keys=list(CURVE_KEYS), x_axis="trainer/global_step", pandas=True)
        except Exception:  # noqa: BLE001
            return pd.DataFrame()
        return frame_by_step(frame)

    return load
