"""The numeric precision a run computes in: ``auto`` picks bf16 autocast where the hardware does bf16
matmuls natively, fp32 elsewhere.

Why: on CPUs with AMX or AVX-512 BF16 (and on Ampere+/Hopper GPUs) bf16 matmuls run several times
faster than fp32 (the ratio on each machine measured is in ``experiments/throughput/README.md``).
Lightning's ``bf16-mixed`` autocasts the forward pass (on the CPU the matmuls and also LayerNorm,
softmax, attention and GELU return bf16: every activation is bf16) and keeps fp32 master weights,
optimizer state and the cross-entropy; held-out evaluation also runs the MLM head's vocabulary
projection in fp32 (``sparse_head.sparse_mlm_loss``), so a reported perplexity is not rounded at the
logits, though the encoder's activations are bf16. Without native support bf16 is emulated and
slower than fp32, so ``auto`` stays at ``32-true`` there. Whether bf16 changes a result is checked, not assumed: the bench trains the same
steps in both precisions and compares the held-out loss reduction (``experiments/throughput``), the
default run's numbers in bf16 are compared with its fp32 numbers in ``experiments/dapt_biomed``, and
the test suite checks that a bf16 step really runs the matmuls in bf16 with fp32 weights and loss.

The resolved value (never ``auto``) is what enters cache keys and results.json, so a cached base or
fine-tune score made in one precision is never served to a run in another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

AUTO = "auto"
BF16 = "bf16-mixed"
FP32 = "32-true"
# Lightning's short spellings, so that "32" and "32-true" are one precision everywhere (cache keys too).
_ALIASES = {"32": FP32, "bf16": BF16, "16": "16-mixed", "64": "64-true", "16-true": "16-true", "bf16-true": "bf16-true"}


@dataclass(frozen=True)
class Precision:
    """A Lightning precision string and why it was chosen (logged, and kept in results.json)."""

    value: str
    reason: str


def cpu_bf16_feature() -> str | None:
    """The CPU feature that runs bf16 matmuls natively (``AMX`` or ``AVX512_BF16``), or None.

    Read through torch (which asks cpuinfo), so it is what torch's kernels will use. The probes are
    private torch functions: when a torch version lacks them the answer is None (fp32), never an error.
    """
    import torch

    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return name
        except Exception:  # noqa: BLE001 - a failed probe means "not known to be supported"
            continue
    return None


def on_cuda(accelerator: Any) -> bool:
    """Whether a Lightning ``accelerator`` setting trains on a CUDA device here (``auto`` and unset,
    Lightning's default, pick the GPU when there is one)."""
    import torch

    return str(accelerator if accelerator is not None else "auto") in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def matmul_dtype(precision: str, device: str = "cpu") -> Any:
    """The dtype the matmuls of a run in ``precision`` compute in (what its MFU peak must be measured at).
    ``16-mixed`` on a CPU is bf16: Lightning's CPU autocast has no fp16 and switches to bf16."""
    import torch

    value = _ALIASES.get(str(precision), str(precision))
    if value.startswith("bf16") or (value.startswith("16") and device != "cuda"):
        return torch.bfloat16
    if value.startswith("16"):
        return torch.float16
    return torch.float64 if value.startswith("64") else torch.float32


def resolve_precision(requested: Any, accelerator: Any = "cpu") -> Precision:
    """Turn ``trainer.precision`` / ``downstream.precision`` into a concrete Lightning precision.

    Anything but ``auto`` is returned as set (``32-true``, ``bf16-mixed``, ``16-mixed``, ...).
    ``auto``: ``bf16-mixed`` on a CUDA device that supports bf16 or on a CPU with AMX / AVX-512 BF16,
    else ``32-true``.
    """
    if requested is None:
        return Precision(FP32, "Lightning's default")
    if str(requested) != AUTO:
        return Precision(_ALIASES.get(str(requested), str(requested)), "set in the config")
    if on_cuda(accelerator):
        import torch

        # including_emulation=False: pre-Ampere GPUs (V100, T4) only emulate bf16, slower than fp32 there
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Precision(BF16, f"auto: {torch.cuda.get_device_name(0)} supports bf16")
        return Precision(FP32, f"auto: {torch.cuda.get_device_name(0)} has no bf16")
    feature = cpu_bf16_feature()
    if feature:
        return Precision(BF16, f"auto: the CPU has {feature}")
    return Precision(FP32, "auto: the CPU has neither AMX nor AVX-512 BF16 (bf16 would be emulated, slower)")
