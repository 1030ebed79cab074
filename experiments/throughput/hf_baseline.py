"""The baseline: transformers' ``run_mlm.py`` recipe, as a researcher would run it instead of dapt.

Kept faithful on purpose, so the speed-up is against the real thing: ``datasets`` ``map`` with
``tokenizer(text, return_special_tokens_mask=True)``, run_mlm's ``group_texts`` (concatenate, cut
into ``seq_len`` chunks), ``DataCollatorForLanguageModeling`` (15 %, 80/10/10) and ``Trainer`` with
its defaults (fused AdamW, dense MLM loss over every position, grad-norm clipping at 1.0, SDPA
attention, no dataloader workers). Only what the comparison needs is set: the same shapes, the same
AdamW hyper-parameters and schedule as dapt, and ``train_sampling_strategy="sequential"`` so both
recipes see the documents in the same order. Tokenising and grouping happen before training in
run_mlm (cached by ``datasets``), so they are not charged to its training throughput.
"""

from __future__ import annotations

import tempfile
import time
from itertools import chain
from typing import Any

import torch

from experiments.throughput.common import BenchSettings, RunResult, StepClock


def group_texts_dataset(texts: list[str], tokenizer: Any, seq_len: int) -> Any:
    """run_mlm's preprocessing (``line_by_line=False``): tokenize, concatenate, chunk into blocks."""
    import datasets

    datasets.disable_progress_bars()
    raw = datasets.Dataset.from_dict({"text": texts})
    tokenized = raw.map(
        lambda ex: tokenizer(ex["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"]
    )

    def group_texts(examples: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = (len(concatenated[next(iter(examples))]) // seq_len) * seq_len
        return {k: [t[i:i + seq_len] for i in range(0, total, seq_len)] for k, t in concatenated.items()}

    return tokenized.map(group_texts, batched=True)


def run_hf_trainer(
    model: torch.nn.Module, tokenizer: Any, dataset: Any, settings: BenchSettings, *, seed: int, bf16: bool | None = None,
    clock: StepClock | None = None,
) -> RunResult:
    """Train ``model`` in place with the HF Trainer recipe for ``settings.steps`` steps.

    ``bf16``: ``TrainingArguments(bf16=...)``; None = the recipe's default (fp32 on CPU; bf16 on a GPU,
    as anyone would run it there). ``bf16=True`` on a CPU is the HF docs' advice for CPU training
    (autocast to bf16 on CPUs with AMX / AVX-512 BF16): the recipe at its best on this hardware.
    """
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    clock = clock or StepClock()

    class _Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.tick()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    started = time.perf_counter()
    on_gpu = settings.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="hf_bench_") as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=settings.batch_size,
            max_steps=settings.steps,
            learning_rate=settings.lr,
            lr_scheduler_type="linear",
            warmup_steps=settings.warmup_steps,
            weight_decay=0.01,
            adam_beta1=0.9,
            adam_beta2=0.98,
            adam_epsilon=1e-6,
            max_grad_norm=1.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=seed,
            data_seed=seed,
            train_sampling_strategy="sequential",
            use_cpu=not on_gpu,
            bf16=on_gpu if bf16 is None else bf16,
        )
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=settings.mask_rate)
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[_Clock()])
        trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every log dict instead
        setup_s = time.perf_counter() - started
        trainer.train()
    return RunResult(
        name="hf_trainer" if bf16 is None else f"hf_trainer_bf16={bf16}",
        step_ends=clock.ends,
        losses=clock.losses,
        tokens_per_step=settings.batch_size * settings.seq_len,
        warmup_steps=settings.warmup_steps,
        setup_s=setup_s,
        extra={"bf16": bool(args.bf16), "curve": clock.curve},
    )
