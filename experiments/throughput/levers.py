"""One lever at a time: the dapt training step with exactly one setting changed, timed A/B.

Why: a lever is kept only if it pays on this machine, and the head-to-head alone cannot say which
part of the speed-up comes from where. Every variant gets its own copy of the same weights and
optimizer, trains on the same real packed and masked batches, and runs ``lever_steps`` steps per
round, variants in alternating order every round; the median step time per variant is reported.

The step is the hot loop of ``MLMModule.training_step`` without Lightning around it: masked batch →
(sparse) loss → backward → clip to 1.0 → AdamW → zero grads.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dapt.data.packing import BlockPacker
from dapt.data.sources import iter_documents
from dapt.data.stream import collate_blocks
from dapt.masking import build_masker
from dapt.modeling.optim import OptimizerConfig, build_optimizer
from dapt.modeling.sparse_head import dense_mlm_loss, sparse_mlm_loss
from experiments.throughput.common import BenchSettings, fresh_copy, train_source


@dataclass(frozen=True)
class Lever:
    """A variant of the dapt step. ``dapt_has_it``: whether dapt's default configuration uses it."""

    name: str
    description: str
    dense_head: bool = False
    attention_dropout: float | None = None
    compile: bool = False
    optimizer: str | None = None
    threads: int | None = None
    bf16: bool | None = None  # None: dapt's precision (settings.precision)


LEVERS: dict[str, Lever] = {
    lever.name: lever
    for lever in (
        Lever("dense_head", "vocabulary projection over all positions (HF's dense MLM loss) instead of sparse", dense_head=True),
        Lever("compile", "torch.compile on the encoder (model.compile=true)", compile=True),
        Lever("optimizer_fused", "AdamW fused=True", optimizer="fused"),
        Lever("optimizer_foreach", "AdamW foreach=True (multi-tensor), dapt's CPU default before this benchmark", optimizer="foreach"),
        Lever("optimizer_for_loop", "AdamW per-parameter loop", optimizer="for_loop"),
        Lever("one_thread", "torch.set_num_threads(1)", threads=1),
    )
}
# `--levers` accepts these names too: `sparse_head` is timed as its opposite (dense_head);
# `attention_dropout` flips dapt's attention-probability dropout (0 <-> the checkpoint's value);
# `precision` flips bf16 autocast (on <-> off).
ALIASES = {"sparse_head": "dense_head"}
FLIPPED = ("attention_dropout", "precision")


def resolve(names: tuple[str, ...], dapt_attention_dropout: float = 0.1, checkpoint_attention_dropout: float = 0.1,
            dapt_bf16: bool = False) -> list[Lever]:
    """The variants to time for lever ``names``, relative to dapt's current defaults."""
    levers = []
    for name in names:
        if name == "precision":
            levers.append(Lever("fp32", "fp32 instead of dapt's bf16 autocast", bf16=False) if dapt_bf16
                          else Lever("bf16", "bf16 autocast instead of dapt's fp32", bf16=True))
            continue
        if name in FLIPPED:
            if dapt_attention_dropout > 0:
                levers.append(Lever("attention_dropout_off", "attention_probs_dropout_prob=0: SDPA can use its fused "
                                    "(flash) CPU kernel instead of the math path + dropout", attention_dropout=0.0))
            else:
                p = checkpoint_attention_dropout
                levers.append(Lever(f"attention_dropout_{p:g}", f"attention_probs_dropout_prob={p:g} (the checkpoint's, "
                                    "as HF trains): SDPA falls back to its math path + dropout", attention_dropout=p))
            continue
        key = ALIASES.get(name, name)
        if key not in LEVERS:
            raise ValueError(f"unknown lever {name!r}; choose from {', '.join(sorted([*LEVERS, *ALIASES, *FLIPPED]))}")
        levers.append(LEVERS[key])
    return levers


def _batches(settings: BenchSettings, tokenizer: Any, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` real masked batches, as the data module would produce them."""
    masker = build_masker({"name": "random", "rate": settings.mask_rate}, tokenizer)
    blocks = BlockPacker(tokenizer, settings.seq_len).pack(iter_documents(train_source(settings), settings.data_dir))
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        chunk = list(itertools.islice(blocks, settings.batch_size))
        if len(chunk) < settings.batch_size:
            break
        batch = collate_blocks(chunk)
        out.append(masker(batch["input_ids"], batch["word_starts"], generator))
    if not out:
        raise RuntimeError("corpus too small for one batch")
    return out


def make_step(
    base: torch.nn.Module, lever: Lever | None, optimizer_default: str = "auto", device: str = "cpu", bf16_default: bool = False
) -> Callable[[dict[str, torch.Tensor]], float]:
    """A closure running one training step of the dapt loop with ``lever`` applied.

    The step runs under bf16 autocast when dapt's precision is bf16 (``bf16_default``, as Lightning's
    ``bf16-mixed``) unless the lever flips it; on CUDA it ends with a device sync, so its wall time is
    the step's real duration.
    """
    lever = lever or Lever("dapt", "dapt defaults")
    model = fresh_copy(base, attention_dropout=lever.attention_dropout).to(device)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4, implementation=lever.optimizer or optimizer_default))
    encoder = torch.compile(model.base_model) if lever.compile else None
    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = bf16_default if lever.bf16 is None else lever.bf16

    def step(batch: dict[str, torch.Tensor]) -> float:
        threads = torch.get_num_threads()
        if lever.threads:
            torch.set_num_threads(lever.threads)
        try:
            ids, labels = batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                if lever.dense_head:
                    loss = dense_mlm_loss(model, ids, labels)
                else:
                    loss = sparse_mlm_loss(model, ids, labels, encoder=encoder)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())  # also a device sync on CUDA
            return value
        finally:
            torch.set_num_threads(threads)

    return step


def measure_levers(
    dapt_model: torch.nn.Module, settings: BenchSettings, names: tuple[str, ...], *, checkpoint_attention_dropout: float = 0.1,
    compile_default: bool = False,
) -> dict[str, dict[str, Any]]:
    """Median step time of the dapt step and of each one-lever variant, A/B interleaved.

    ``dapt_model`` is built with dapt's model config (``common.dapt_model_config``); every variant
    starts from a copy of it.
    """
    from dapt.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(settings.model_source)
    dapt_dropout = float(getattr(dapt_model.config, "attention_probs_dropout_prob", 0.0) or 0.0)
    dapt_bf16 = "bf16" in settings.precision
    chosen = [lv for lv in resolve(names, dapt_dropout, checkpoint_attention_dropout, dapt_bf16) if not (compile_default and lv.compile)]
    variants: list[tuple[str, Lever]] = [("dapt", Lever("dapt", "dapt defaults", compile=compile_default)),
                                         *[(lv.name, lv) for lv in chosen]]
    batches = _batches(settings, tokenizer, settings.lever_rounds * settings.lever_steps + 1)
    steps: dict[str, Callable[[dict[str, torch.Tensor]], float]] = {}
    warmup_s: dict[str, float] = {}
    for name, lever in variants:
        started = time.perf_counter()
        steps[name] = make_step(dapt_model, lever, device=settings.device, bf16_default=dapt_bf16)
        steps[name](batches[0])  # warm-up (torch.compile compiles here)
        warmup_s[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    cursor = 1
    for r in range(settings.lever_rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        round_batches = [batches[(cursor + i) % len(batches)] for i in range(settings.lever_steps)]
        cursor += settings.lever_steps
        for name, _ in order:
            for b in round_batches:
                t0 = time.perf_counter()
                steps[name](b)
                times[name].append(time.perf_counter() - t0)
    tokens = settings.batch_size * settings.seq_len
    ref = statistics.median(times["dapt"])
    out: dict[str, dict[str, Any]] = {}
    for name, lever in variants:
        med = statistics.median(times[name])
        out[name] = {
            "description": lever.description if name != "dapt" else "dapt's default step (sparse head, fused AdamW, conf/model settings)",
            "step_s": med,
            "tokens_per_s": tokens / med,
            "speed_vs_dapt": ref / med,  # > 1: the variant is faster than dapt's default
            "warmup_s": warmup_s[name],
            "times": times[name],
        }
    return out
