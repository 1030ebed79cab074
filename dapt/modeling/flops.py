"""Model FLOPs per training token and the machine's measured matmul peak, for an MFU figure.

Why: tokens/s alone does not say how far a run is from what the hardware can do. MFU = achieved
model FLOP/s ÷ peak FLOP/s makes the gap visible and comparable across models and machines.

The formula (the usual "matmul FLOPs" convention of Kaplan et al. 2020 / PaLM, adapted to MLM):

    forward FLOPs per input token
        F_enc  = 2 · P_enc                      every Linear weight of the encoder, one MAC = 2 FLOPs
               + 4 · n_layers · seq_len · d     attention scores QKᵀ and the weighted sum AV
        F_head = 2 · P_head                     head transform (d×d) + decoder (d×V), per predicted position
    training FLOPs per input token (backward ≈ 2 × forward)
        3 · (F_enc + r · F_head)                r = mask rate with sparse prediction, 1 with a dense head

Embedding look-ups, LayerNorm, softmax, GELU, biases and the optimizer step are not counted (≈1-2 %
of the total for BERT-style models), so MFU is slightly conservative. The sparse head is counted at
its real cost (``r`` of the positions); a dense head is counted at full cost, so the two recipes'
MFU figures each describe the work they actually do.

``measured_peak_flops`` times large square matmuls (the best rate over a few seconds, i.e. what the
BLAS reaches with the current thread count) and caches the result on disk (``dapt.config.default_cache_dir()``:
``$DAPT_CACHE_DIR`` or ``~/.cache/dapt``), so training runs do not pay for it every time.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

PEAK_CACHE_FILE = "peak_flops.json"
log = logging.getLogger(__name__)


def _config_value(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"model config has none of {names}; cannot count attention FLOPs")


def _linear_params(module: torch.nn.Module) -> int:
    """Weights (not biases) of every ``nn.Linear`` inside ``module``: the MACs per token of its matmuls."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def _encoder_and_head_params(model: torch.nn.Module) -> tuple[int, int]:
    """(encoder Linear weights, MLM-head Linear weights).

    The head is everything outside ``model.base_model`` (BERT's ``cls``, RoBERTa's ``lm_head``,
    DistilBERT's ``vocab_transform``/``vocab_projector``); an unused pooler inside the encoder is
    skipped because MLM forward never calls it.
    """
    encoder = getattr(model, "base_model", model)
    enc = _linear_params(encoder)
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, torch.nn.Module):
        enc -= _linear_params(pooler)
    head = _linear_params(model) - _linear_params(encoder) if encoder is not model else 0
    return enc, head


def flops_per_token(model: torch.nn.Module, seq_len: int, mask_rate: float, sparse: bool = True) -> float:
    """Training FLOPs per input token (forward + backward) of an MLM step; see the module docstring.

    Args:
        model: a transformers masked-LM (``AutoModelForMaskedLM``) or anything with ``config`` and
            ``base_model``.
        seq_len: tokens per block (attention length).
        mask_rate: fraction of tokens that are predicted (only matters with ``sparse=True``).
        sparse: True when only masked positions reach the vocabulary projection (dapt), False for
            the dense head of the HF recipe.
    """
    if seq_len < 1 or not 0.0 <= mask_rate <= 1.0:
        raise ValueError(f"seq_len={seq_len}, mask_rate={mask_rate}")
    config = model.config
    n_layers = _config_value(config, "num_hidden_layers", "n_layers", "num_layers")
    d_model = _config_value(config, "hidden_size", "dim", "d_model")
    enc_params, head_params = _encoder_and_head_params(model)
    forward_enc = 2.0 * enc_params + 4.0 * n_layers * seq_len * d_model
    forward_head = 2.0 * head_params
    share = mask_rate if sparse else 1.0
    return 3.0 * (forward_enc + share * forward_head)


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float, n_peaks: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s as a fraction of ``n_peaks`` × ``peak_flops``.

    The one MFU formula in dapt (the training callback and the throughput bench both call it).
    ``n_peaks`` is how many devices the rate is spread over (ranks, or hosts for a shared CPU peak).
    NaN when there is no positive peak. The raw ratio is returned: a value above 1 is not clamped,
    because it means the peak was measured too low (another job took cycles while it was timed),
    and only the caller can decide what to do about that (``ThroughputMeter`` measures the peak
    again, then stops reporting MFU for the run rather than report a wrong one).
    """
    total_peak = peak_flops * n_peaks
    return tokens_per_s * flops_per_tok / total_peak if total_peak > 0 else float("nan")


def _cache_dir() -> Path:
    from dapt.config import default_cache_dir

    return Path(default_cache_dir())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from dapt.versioning import cpu_model

    return cpu_model()


def _cache_key(device: torch.device, dtype: torch.dtype) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else 0
    return f"{device.type}|{_device_name(device)}|{dtype}|threads={threads}|torch={torch.__version__}"


def _time_matmuls(device: torch.device, dtype: torch.dtype, seconds: float, n: int) -> float:
    """Best FLOP/s of ``n×n @ n×n`` over ``seconds`` (best, not median: a peak is what the BLAS can do)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up: thread pool start, BLAS kernel selection
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * n**3 / elapsed)
        if time.perf_counter() > deadline:
            return best


def measured_peak_flops(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seconds: float = 2.0,
    *,
    refresh: bool = False,
    size: int | None = None,
) -> float:
    """The dense matmul peak FLOP/s of ``device`` at ``dtype``, measured once and cached on disk.

    The cache key holds the device name, dtype, CPU thread count and torch version, so a different
    machine or thread count measures again. ``refresh=True`` measures again and keeps the higher of
    the new and the cached value: on a shared machine a measurement can only be too low (other jobs
    took cycles), never too high, so the best one seen is the best estimate of the peak.
    """
    device = torch.device(device)
    key = _cache_key(device, dtype)
    path = _cache_dir() / PEAK_CACHE_FILE
    cache: dict[str, Any] = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("flops", 0) > 0:
        entry = cache[key]
        log.info("MFU peak %s: %.1f GFLOP/s (best %dx%d matmul over %ss, measured %s; %s)", dtype, entry["flops"] / 1e9,
                 entry.get("matmul_size", 0), entry.get("matmul_size", 0), entry.get("seconds", "?"), entry.get("measured_at", "?"), path)
        return float(entry["flops"])
    n = size or (8192 if device.type == "cuda" else 2048)
    peak = _time_matmuls(device, dtype, seconds, n)
    previous = cache.get(key, {}).get("flops", 0.0) if isinstance(cache.get(key), dict) else 0.0
    if previous > peak:  # a peak only goes up: a measurement taken while other jobs ran is not the hardware's
        log.info("MFU peak %s: measured %.1f GFLOP/s now, keeping the cached %.1f (measured %s)", dtype, peak / 1e9,
                 previous / 1e9, cache[key].get("measured_at", "?"))
        return float(previous)
    log.info("MFU peak %s: %.1f GFLOP/s (best %dx%d matmul over %ss, measured now; cached in %s)", dtype, peak / 1e9, n, n, seconds, path)
    cache[key] = {"flops": peak, "matmul_size": n, "seconds": seconds, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        from dapt.io import atomic_write_json

        atomic_write_json(path, cache)
    except OSError:
        pass  # a read-only cache dir only costs a re-measurement next time
    return peak
