"""Masking strategies. Importing this package registers every strategy module.

Add a strategy: subclass ``MaskingStrategy`` in its own module, decorate it with ``@register(name)``,
give it a ``config_class`` dataclass (subclass of ``MaskingConfig``) for its knobs, import the module
here, and add ``conf/masking/<name>.yaml``.
"""

from dapt.masking import pmi, random, salient, span, whole_word  # noqa: F401  (register the strategies)
from dapt.masking.base import (
    Masker,
    MaskingConfig,
    MaskingContext,
    MaskingInput,
    MaskingStrategy,
    available_strategies,
    build_eval_masker,
    build_masker,
    eval_generator,
    masker_for,
    rate_at,
    register,
    strategy_class,
)
from dapt.masking.selection import achieved_rate, apply_corruption

__all__ = [
    "Masker",
    "MaskingConfig",
    "MaskingContext",
    "MaskingInput",
    "MaskingStrategy",
    "achieved_rate",
    "apply_corruption",
    "available_strategies",
    "build_eval_masker",
    "build_masker",
    "eval_generator",
    "masker_for",
    "rate_at",
    "register",
    "strategy_class",
]
