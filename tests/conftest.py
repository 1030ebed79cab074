"""Shared fixtures: the real MiniLM tokenizer, the shared data dir, and composing the real config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from dapt.config import config_dir, default_data_dir, register_resolvers  # noqa: E402
from dapt.pipeline.schemas import register_schemas  # noqa: E402
from tests.helpers import MINILM  # noqa: E402

TINY_OVERRIDES = ["model=tiny", "base_prep=none", "tasks=[]", "trainer.max_steps=6", "trainer.val_check_interval=3",
                  "data.eval_tokens=256", "data.dev_eval_tokens=256", "data.batch_size=4", "data.max_seq_length=64", "data.shuffle_buffer=16",
                  "logger.wandb.enabled=false"]

register_schemas()  # the group YAMLs extend <group>_schema: every test that composes needs them


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never touch the user's ~/.cache/dapt (bases built in tests are tiny and disposable)."""
    os.environ["DAPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("dapt_cache"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(default_data_dir())
    if not (path / "README.md").exists():
        pytest.skip(f"shared data not found at {path} (set DAPT_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    from dapt.modeling.loading import load_tokenizer

    return load_tokenizer(MINILM)


@pytest.fixture(scope="module")
def one_thread() -> Any:
    """Run a module's tensor-heavy property tests on one intra-op thread (predictable on a shared box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def compose(tmp_path: Path) -> Callable[..., Any]:
    """Compose ``conf/<config_name>.yaml`` with overrides, as ``dapt train`` would (output in tmp_path)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()

    def _compose(overrides: list[str] | None = None, config_name: str = "train") -> Any:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=[*(overrides or []), f"paths.output_dir={tmp_path / 'run'}"])
        return cfg

    return _compose
