"""Config validation and resolvers.

Configs are the API: Hydra composes YAML files, and each group is validated against a dataclass here
(or the strategy's own dataclass), so a misspelt key or an out-of-range value fails at start-up with
the key's full name instead of an hour into a run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from dapt.errors import ConfigError

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """Where the Hydra configs live: ``$DAPT_CONFIG_DIR`` or the repo's ``conf/``."""
    env = os.environ.get("DAPT_CONFIG_DIR")
    path = Path(env) if env else REPO_ROOT / "conf"
    if not (path / "train.yaml").exists():
        raise ConfigError(f"no train.yaml in config dir {path} (set DAPT_CONFIG_DIR or install dapt editable)")
    return path


def default_data_dir() -> str:
    """``$DAPT_DATA_DIR``, else ``../shared/data`` beside the repo (or the cwd) when it exists."""
    env = os.environ.get("DAPT_DATA_DIR")
    if env:
        return env
    for base in (REPO_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.exists():
            return str(candidate.resolve())
    return str((REPO_ROOT.parent / "shared" / "data").resolve())


def default_cache_dir() -> str:
    """dapt's cache folder: ``$DAPT_CACHE_DIR``, else ``~/.cache/dapt`` (``paths.cache_dir``'s default,
    the MFU peak cache and the masking statistics all use it)."""
    return os.environ.get("DAPT_CACHE_DIR") or str(Path.home() / ".cache" / "dapt")


# A short random tag, one per process: run and sweep folders are named <time>_<tag>, so two runs
# started in the same second never share a folder (one results.json would silently replace the other).
RUN_TAG = secrets.token_hex(3)


def register_resolvers() -> None:
    """Resolvers used by ``conf/paths`` and ``conf/hydra``: ``${dapt_data_dir:}``, ``${dapt_cache_dir:}``
    and ``${dapt_run_tag:}`` (``RUN_TAG``)."""
    if not OmegaConf.has_resolver("dapt_data_dir"):
        OmegaConf.register_new_resolver("dapt_data_dir", default_data_dir)
    if not OmegaConf.has_resolver("dapt_cache_dir"):
        OmegaConf.register_new_resolver("dapt_cache_dir", default_cache_dir)
    if not OmegaConf.has_resolver("dapt_run_tag"):
        OmegaConf.register_new_resolver("dapt_run_tag", lambda: RUN_TAG)


@contextlib.contextmanager
def hydra_config_dir(directory: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Hydra initialised on ``directory`` (default ``config_dir()``) with dapt's resolvers, for the
    ``with`` block: for code that needs Hydra's config loader itself (``dapt.launch.sweeps``).
    Anything that only wants a composed config calls ``compose_config``."""
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(directory) if directory else config_dir()), version_base="1.3"):
        yield


def compose_config(
    overrides: Sequence[str] = (),
    config_name: str = "train",
    *,
    directory: str | os.PathLike[str] | None = None,
    return_hydra_config: bool = False,
) -> DictConfig:
    """Compose ``<config dir>/<config_name>.yaml`` with command-line style ``overrides``, as the
    ``dapt`` commands would, outside a Hydra application (diagnostics, scripts, override checks).

    A Hydra instance left initialised by earlier code is cleared first (composing twice in one
    process must work) and left uninitialised afterwards: do not call this inside a running Hydra
    job. The group YAMLs extend schemas that ``dapt.pipeline.schemas.register_schemas()`` registers
    (this layer cannot import it; the commands do, and a missing registration is a one-line error
    saying so).
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    from hydra.errors import MissingConfigException

    with hydra_config_dir(directory):
        try:
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config)
        except MissingConfigException as exc:
            if "_schema'" not in str(exc):
                raise
            raise ConfigError("the config groups' schemas are not registered: call "
                              "dapt.pipeline.schemas.register_schemas() (or import dapt.commands) before composing") from exc


# Keys earlier versions of dapt read, and what became of them: an old command line or config gets the
# new name in its error instead of "unknown key" alone. Keys are regular expressions over the whole key path.
RENAMED_KEYS: dict[str, str] = {
    r"base": "renamed 'base_prep' (the general-MLM base preparation group)",
    r"base\..+": "the 'base' group was renamed 'base_prep'",
    r"model\.name": "removed: nothing read it",
    r"task\.[^.]+\.domain": "removed from task configs: nothing read it",
}


def renamed_hint(key: str) -> str:
    """``" (<what became of it>)"`` when the whole ``key`` matches a ``RENAMED_KEYS`` pattern, else ``""``."""
    for pattern, note in RENAMED_KEYS.items():
        if re.fullmatch(pattern, key):
            return f" ({key}: {note})"
    return ""


def describe_config_error(exc: OmegaConfBaseException, prefix: str = "") -> str:
    """One line naming the key an OmegaConf error is about (Hydra's schema errors are several)."""
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or ""
    full = f"{prefix}.{key}" if prefix and key else (key or prefix)
    msg = str(exc).splitlines()[0]
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) or "not in struct" in msg or "not in '" in msg:
        return f"unknown config key '{full}'{renamed_hint(full)}"
    return f"invalid value for '{full}': {msg}"


def to_dataclass(cls: type[T], cfg: Any, *, prefix: str = "") -> T:
    """Validate ``cfg`` against dataclass ``cls`` and return an instance.

    Unknown keys and type mismatches raise ``ConfigError`` naming ``prefix.key``; range checks live
    in the dataclass's ``__post_init__`` (which must itself raise ``ConfigError``).
    """
    if not is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True)
    else:
        data = dict(cfg or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix + '.' if prefix else ''}{unknown[0]}'{renamed_hint(f'{prefix}.{unknown[0]}' if prefix else unknown[0])}"
            f" (valid keys: {', '.join(sorted(known))})"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), data)
        obj = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except (ValidationError, ConfigKeyError, OmegaConfBaseException) as exc:
        raise ConfigError(describe_config_error(exc, prefix)) from exc
    except Exception as exc:  # __post_init__ raising ConfigError is wrapped by OmegaConf
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(exc.args[0] if exc.args else None, str) and "ConfigError" in type(exc).__name__:
            raise
        raise
    return obj  # type: ignore[return-value]
