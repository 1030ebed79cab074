"""The masking interface: strategies choose positions, one shared step corrupts them.

Masking is data, not model. A ``MaskingStrategy`` looks at a batch of packed token ids (with the word
index of every token and a mask of never-maskable positions) and returns a boolean matrix of positions
to predict. ``apply_corruption`` then replaces them mask/random/keep (80/10/10 by default) and builds
labels. Keeping the two apart means every strategy gets the same corruption, the same guarantees
(special tokens never masked; packed blocks have no padding; seeded ``torch.Generator``, vectorised torch) and the same tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch

from dapt.errors import ConfigError
from dapt.masking.selection import apply_corruption


@dataclass
class MaskingInput:
    """What a strategy sees. All tensors are ``[batch, seq]`` on the same device.

    ``word_ids`` numbers the words of each row from 0 (a word = the sub-tokens the fast tokenizer
    assigned to one pre-tokenized word, so it works for WordPiece, BPE and SentencePiece alike);
    special tokens and padding have ``-1`` and ``maskable`` False.
    """

    input_ids: torch.Tensor
    word_ids: torch.Tensor
    maskable: torch.Tensor

    @classmethod
    def from_word_starts(cls, input_ids: torch.Tensor, word_starts: torch.Tensor, maskable: torch.Tensor) -> "MaskingInput":
        """Build word ids from the per-token 'starts a new word' flags that packed blocks carry.

        The first maskable token of a row, and any maskable token right after a non-maskable one,
        always starts a word: a word cut by a block boundary becomes a word of its own in the next
        block, and a word can never run across a separator or special token (which would let a
        whole-word strategy glue the last word of one document to the first of the next when the
        packer's flags are off by one).
        """
        starts = word_starts.bool() & maskable
        prev_maskable = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
        starts = starts | (maskable & ~prev_maskable)
        word_ids = starts.long().cumsum(1) - 1
        word_ids = torch.where(maskable, word_ids, torch.full_like(word_ids, -1))
        return cls(input_ids=input_ids, word_ids=word_ids, maskable=maskable)


@dataclass
class MaskingConfig:
    """Knobs shared by every strategy; strategy configs subclass this with their own fields.

    Attributes:
        name: registered strategy name (``random``, ``whole_word``, ``span``, ``pmi``, ``salient``).
        rate: fraction of maskable tokens to predict during training (Wettig et al. 2023 find 0.3-0.4
            better than 0.15 for uniform masking).
        schedule: ``constant`` or ``linear`` (rate -> final_rate over schedule_steps, then constant).
        final_rate: end rate of a linear schedule.
        schedule_steps: length of the linear schedule; null means the run's ``trainer.max_steps``.
        mask_fraction / random_fraction: corruption split of the chosen positions; the rest keep
            their token (BERT's 80/10/10).
        eval_rate / eval_strategy / eval_seed: held-out sets are masked once with these, so every
            evaluation of every run (whatever its train strategy) sees identical masks.
    """

    name: str = "random"
    rate: float = 0.15
    schedule: str = "constant"
    final_rate: float | None = None
    schedule_steps: int | None = None
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    eval_rate: float = 0.15
    eval_strategy: str = "random"
    eval_seed: int = 1234

    def __post_init__(self) -> None:
        for key in ("rate", "eval_rate"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"masking.{key}={value} must be in (0, 1)")
        if self.final_rate is not None and not 0.0 < self.final_rate < 1.0:
            raise ConfigError(f"masking.final_rate={self.final_rate} must be in (0, 1)")
        if self.schedule not in ("constant", "linear"):
            raise ConfigError(f"masking.schedule={self.schedule!r}: choose constant or linear")
        if self.schedule == "linear" and self.final_rate is None:
            raise ConfigError("masking.schedule=linear needs masking.final_rate")
        for key in ("mask_fraction", "random_fraction"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"masking.{key}={value} must be in [0, 1]")
        if self.schedule_steps is not None and self.schedule_steps <= 0:
            raise ConfigError(f"masking.schedule_steps={self.schedule_steps} must be a positive number of steps (or null)")
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            raise ConfigError(
                f"masking.mask_fraction + masking.random_fraction = {self.mask_fraction + self.random_fraction} exceeds 1"
            )


@dataclass
class MaskingContext:
    """What a strategy may need beyond its config, e.g. corpus statistics for PMI or salient terms.

    ``domain_documents`` / ``general_documents`` are zero-argument callables returning fresh
    iterators of document strings (streamed, never a whole corpus in memory); ``cache_dir`` is where
    statistics computed from them are cached.
    """

    tokenizer: Any = None
    domain_documents: Callable[[], Any] | None = None
    general_documents: Callable[[], Any] | None = None
    cache_dir: str | None = None


class MaskingStrategy(ABC):
    """Chooses which positions the model must predict. Subclasses register with ``@register``."""

    config_class: ClassVar[type[MaskingConfig]] = MaskingConfig

    def __init__(self, config: MaskingConfig, context: MaskingContext | None = None) -> None:
        self.config = config
        self.context = context

    def __getstate__(self) -> dict[str, Any]:
        """Drop the context when pickled (e.g. into DataLoader workers).

        The context holds a tokenizer and document-iterator callables (often closures that do not
        pickle); strategies read it once at construction, so a worker never needs it.
        """
        state = self.__dict__.copy()
        state["context"] = None
        return state

    @abstractmethod
    def select(self, batch: MaskingInput, rate: float, generator: torch.Generator) -> torch.Tensor:
        """Return a bool ``[batch, seq]`` matrix, True where the token is to be predicted.

        Must never select a position whose ``maskable`` is False, and the expected fraction of
        selected maskable tokens must equal ``rate``.
        """


_REGISTRY: dict[str, type[MaskingStrategy]] = {}


def register(name: str) -> Callable[[type[MaskingStrategy]], type[MaskingStrategy]]:
    """Class decorator: make a strategy available as ``masking.name=<name>``."""

    def wrap(cls: type[MaskingStrategy]) -> type[MaskingStrategy]:
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_strategies() -> list[str]:
    from dapt import masking  # noqa: F401  (imports every strategy module, filling the registry)

    return sorted(_REGISTRY)


def strategy_class(name: str, key: str = "masking.name") -> type[MaskingStrategy]:
    """The registered strategy ``name``; ``key`` names the config key in the error message."""
    names = available_strategies()
    if name not in _REGISTRY:
        raise ConfigError(f"{key}={name!r} is not a strategy; available: {', '.join(names)}")
    return _REGISTRY[name]


def schedule_length(config: MaskingConfig, default_steps: int | None = None) -> int | None:
    """Steps of the linear schedule: ``schedule_steps``, else the run's ``max_steps`` when positive.

    Lightning uses ``max_steps=-1`` for "unbounded"; a non-positive length would run the schedule
    backwards, so it counts as missing.
    """
    for steps in (config.schedule_steps, default_steps):
        if steps is not None and steps > 0:
            return int(steps)
    return None


def rate_at(config: MaskingConfig, step: int, default_steps: int | None = None) -> float:
    """The training mask rate at optimizer ``step`` under the configured schedule.

    ``linear`` interpolates ``rate -> final_rate`` over the schedule length and then stays at
    ``final_rate``. A linear schedule without a length raises ``ConfigError`` rather than silently
    training at a constant rate (``build_masker`` checks this at start-up).
    """
    if config.schedule == "constant" or config.final_rate is None:
        return config.rate
    steps = schedule_length(config, default_steps)
    if steps is None:
        raise ConfigError(
            "masking.schedule=linear needs masking.schedule_steps (or a positive trainer.max_steps)"
        )
    frac = min(max(step, 0) / steps, 1.0)
    return config.rate + (config.final_rate - config.rate) * frac


@dataclass
class Masker:
    """Strategy + schedule + corruption: turns packed blocks into ``(input_ids, labels)``.

    Built once per run from the tokenizer; the data module calls it on every training batch (after
    the batch reaches its device, so it knows the optimizer step) and once for the held-out sets.
    """

    strategy: MaskingStrategy
    mask_token_id: int
    vocab_size: int
    special_ids: torch.Tensor
    default_schedule_steps: int | None = None
    _random_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def config(self) -> MaskingConfig:
        return self.strategy.config

    def maskable(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Positions that may be masked: every non-special token (packed blocks have no padding)."""
        return ~torch.isin(input_ids, self.special_ids.to(input_ids.device))

    def random_token_ids(self) -> torch.Tensor:
        if self._random_ids is None:
            all_ids = torch.arange(self.vocab_size)
            self._random_ids = all_ids[~torch.isin(all_ids, self.special_ids)]
        return self._random_ids

    def __call__(
        self,
        input_ids: torch.Tensor,
        word_starts: torch.Tensor,
        generator: torch.Generator,
        *,
        step: int = 0,
        rate: float | None = None,
    ) -> dict[str, torch.Tensor]:
        maskable = self.maskable(input_ids)
        batch = MaskingInput.from_word_starts(input_ids, word_starts, maskable)
        rate = rate if rate is not None else rate_at(self.config, step, self.default_schedule_steps)
        selected = self.strategy.select(batch, rate, generator) & maskable
        inputs, labels = apply_corruption(
            input_ids,
            selected,
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            mask_fraction=self.config.mask_fraction,
            random_fraction=self.config.random_fraction,
            generator=generator,
            random_token_ids=self.random_token_ids(),
        )
        # n_maskable lets the training loop log the achieved rate (masked / maskable) per batch.
        return {"input_ids": inputs, "labels": labels, "n_maskable": maskable.sum()}


def build_masker(
    cfg: Any, tokenizer: Any, *, default_schedule_steps: int | None = None, context: MaskingContext | None = None
) -> Masker:
    """Validate ``cfg`` (a dict/DictConfig of the ``masking`` group) and build its ``Masker``.

    Unknown keys fail here, naming the key, because each strategy declares its config dataclass.
    """
    from dapt.config import to_dataclass

    name = cfg["name"] if "name" in cfg else "random"
    cls = strategy_class(name)
    config = to_dataclass(cls.config_class, cfg, prefix="masking")
    if config.schedule == "linear" and schedule_length(config, default_schedule_steps) is None:
        raise ConfigError(
            "masking.schedule=linear needs masking.schedule_steps (or a positive trainer.max_steps)"
        )
    strategy_class(config.eval_strategy, "masking.eval_strategy")  # fails at start-up, naming the key
    strategy = cls(config, _with_tokenizer(context, tokenizer))
    return masker_for(strategy, tokenizer, default_schedule_steps=default_schedule_steps)


def build_eval_masker(cfg: Any, tokenizer: Any, *, context: MaskingContext | None = None) -> Masker:
    """The held-out masker: ``eval_strategy`` at a constant ``eval_rate``, whatever the train strategy.

    Perplexities are only comparable across runs and steps if every run masks its held-out sets
    identically, so this ignores the train ``rate``/``schedule`` (call it with the generator from
    ``eval_generator``). When ``eval_strategy`` is the train strategy its own knobs (span length,
    PMI vocabulary...) are kept; otherwise the eval strategy's defaults are used.
    """
    from dapt.config import to_dataclass

    train_name = cfg["name"] if "name" in cfg else "random"
    train_config = to_dataclass(strategy_class(train_name).config_class, cfg, prefix="masking")
    eval_cls = strategy_class(train_config.eval_strategy, "masking.eval_strategy")
    if train_config.eval_strategy == train_name:  # same strategy: keep its own knobs
        values = asdict(train_config)
    else:  # another strategy: its defaults, plus the shared corruption split and eval settings
        shared = ("mask_fraction", "random_fraction", "eval_rate", "eval_strategy", "eval_seed")
        values = {k: getattr(train_config, k) for k in shared}
    values.update(name=train_config.eval_strategy, rate=train_config.eval_rate, schedule="constant",
                  final_rate=None, schedule_steps=None)
    eval_config = to_dataclass(eval_cls.config_class, values, prefix="masking")
    strategy = eval_cls(eval_config, _with_tokenizer(context, tokenizer))
    return masker_for(strategy, tokenizer)


def eval_generator(cfg: Any, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``masking.eval_seed`` (default 1234): same eval masks every time."""
    seed = cfg["eval_seed"] if "eval_seed" in cfg else MaskingConfig.eval_seed
    return torch.Generator(device=device).manual_seed(int(seed))


def _with_tokenizer(context: MaskingContext | None, tokenizer: Any) -> MaskingContext:
    if context is None:
        return MaskingContext(tokenizer=tokenizer)
    if context.tokenizer is None:
        return replace(context, tokenizer=tokenizer)
    return context


def masker_for(strategy: MaskingStrategy, tokenizer: Any, *, default_schedule_steps: int | None = None) -> Masker:
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no mask token; it cannot be used for MLM")
    special = sorted(set(tokenizer.all_special_ids))
    return Masker(
        strategy=strategy,
        mask_token_id=int(tokenizer.mask_token_id),
        vocab_size=len(tokenizer),
        special_ids=torch.tensor(special, dtype=torch.long),
        default_schedule_steps=default_schedule_steps,
    )
