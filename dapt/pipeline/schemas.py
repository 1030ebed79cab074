"""The config groups' schemas, registered with Hydra's ConfigStore.

Each group YAML (``conf/model/*.yaml``, ``conf/data/common.yaml``, ...) starts with
``defaults: [/<group>_schema@_here_, _self_]``, so Hydra itself types the group at composition: an
unknown key or a value of the wrong type in a YAML file or an override is rejected before any run
starts, and ``--cfg job`` shows typed values. ``dapt.launch.sweeps.check_overrides`` turns Hydra's multi-line
report into dapt's one-line error; ``dapt.pipeline.run_config.validate`` still runs each group's
range checks (``__post_init__``), which Hydra does not call.

Groups without a fixed schema are left to their validators: ``masking`` (each strategy has its
own dataclass, chosen by ``masking.name``), ``trainer`` (Lightning ``Trainer`` arguments, checked
against its signature) and ``paths``.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from dapt.data.config import DataConfig
from dapt.evaluation.finetuning import DownstreamConfig
from dapt.modeling.loading import ModelConfig
from dapt.modeling.optim import OptimizerConfig, SchedulerConfig
from dapt.modeling.remedies import RemedyConfig
from dapt.pipeline.base_prep import BasePrepConfig
from dapt.pipeline.selection import SelectionConfig
from dapt.pipeline.vocabulary import VocabularyConfig
from dapt.tracking.loggers import LoggerConfig


def schema_name(group: str) -> str:
    """The ConfigStore name of ``group``'s schema. Stored at the top level, not inside the group, so it
    is never offered as an option of the group (``--help``, ``model=<option>``)."""
    return f"{group}_schema"


GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "base_prep": BasePrepConfig,
    "logger": LoggerConfig,
    "downstream": DownstreamConfig,
    "remedy": RemedyConfig,
    "vocabulary": VocabularyConfig,
    "selection": SelectionConfig,
}

# Groups whose options combine (Hydra's multi-select, ``remedy=[l2sp,llrd]``): their schema is listed
# once in conf/train.yaml (``remedy_schema@remedy``) before the options, because an option that
# extended the schema itself would reset the keys set by the options merged before it.
COMBINABLE_GROUPS = ("remedy",)


def register_schemas() -> None:
    """Store every group's schema as ``<group>_schema``; idempotent (Hydra replaces same-name entries)."""
    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(name=schema_name(group), node=schema)
