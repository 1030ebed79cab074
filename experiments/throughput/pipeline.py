"""Data pipeline speed and streaming memory.

Why: the pipeline (read → tokenize → pack → shuffle buffer → collate → mask) runs in the training
process, so it must be far faster than training consumes tokens (≥ 10×), close to the fast
tokenizer's own batched speed (within 2×: no Python per-token work left), and streaming must keep
memory flat as the corpus grows (peak RSS within 1.2× for a 10× corpus).

``python -m experiments.throughput.pipeline memory CORPUS.jsonl`` is the child process of the
memory check: it streams one pass of the corpus through the real pipeline and prints its RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dapt.data.config import DataConfig
from dapt.data.sources import SourceConfig, iter_documents
from dapt.data.stream import PackedBlockStream, collate_blocks
from dapt.masking import build_masker
from experiments.throughput.common import TRAIN_FILE, BenchSettings, median, peak_rss_mb, repo_root


def _stream_batches(source: SourceConfig, data_dir: str | None, tokenizer: Any, settings: BenchSettings) -> int:
    """One pass of the real training pipeline; returns tokens delivered as masked batches."""
    from torch.utils.data import DataLoader

    config = DataConfig(train=[source], max_seq_length=settings.seq_len, batch_size=settings.batch_size)
    stream = PackedBlockStream(
        [source], data_dir, tokenizer, settings.seq_len,
        shuffle_buffer=config.shuffle_buffer, seed=0, docs_per_batch=config.docs_per_batch, max_passes=1,
    )
    loader = DataLoader(stream, batch_size=settings.batch_size, collate_fn=collate_blocks, num_workers=0, drop_last=True)
    masker = build_masker({"name": "random", "rate": settings.mask_rate}, tokenizer)
    generator = torch.Generator().manual_seed(0)
    tokens = 0
    for batch in loader:
        out = masker(batch["input_ids"], batch["word_starts"], generator)
        tokens += out["input_ids"].numel()
    return tokens


def _raw_tokenizer(texts: list[str], tokenizer: Any, docs_per_batch: int) -> tuple[int, float]:
    """The fast tokenizer alone (Rust ``encode_batch``, the same batches the packer sends)."""
    backend = tokenizer.backend_tokenizer
    started = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), docs_per_batch):
        for enc in backend.encode_batch(texts[i:i + docs_per_batch], add_special_tokens=False):
            tokens += len(enc)
    return tokens, time.perf_counter() - started


def measure_pipeline(settings: BenchSettings, tokenizer: Any, rounds: int = 2) -> dict[str, Any]:
    """Tokens/s of the full pipeline (from the JSONL file) and of the raw tokenizer (on texts
    already in memory), on the same documents, alternating, medians."""
    source = SourceConfig(type="jsonl", path=TRAIN_FILE, text_field="text", max_documents=settings.pipeline_documents)
    texts = list(iter_documents(source, settings.data_dir))
    pipe_rates, raw_rates = [], []
    for r in range(rounds):
        for which in (("pipe", "raw") if r % 2 == 0 else ("raw", "pipe")):
            if which == "pipe":
                started = time.perf_counter()
                tokens = _stream_batches(source, settings.data_dir, tokenizer, settings)
                pipe_rates.append(tokens / (time.perf_counter() - started))
            else:
                tokens, elapsed = _raw_tokenizer(texts, tokenizer, DataConfig.docs_per_batch)
                raw_rates.append(tokens / elapsed)
    return {
        "documents": len(texts),
        "pipeline_tokens_per_s": median(pipe_rates),
        "raw_tokenizer_tokens_per_s": median(raw_rates),
        "pipeline_rates": pipe_rates,
        "raw_rates": raw_rates,
    }


def _write_corpus(texts: list[str], copies: int, path: Path) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(copies):
            for text in texts:
                fh.write(json.dumps({"text": text}) + "\n")


def measure_memory(settings: BenchSettings, growth: int = 10) -> dict[str, Any]:
    """Peak RSS of one streamed pass over a corpus and over the same corpus ``growth`` × larger,
    each in a fresh process (so neither inherits the other's peak)."""
    source = SourceConfig(type="jsonl", path=TRAIN_FILE, text_field="text", max_documents=settings.memory_documents)
    texts = list(iter_documents(source, settings.data_dir))
    out: dict[str, Any] = {"documents": len(texts), "growth": growth}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(repo_root()), os.environ.get("PYTHONPATH", "")) if p))
    spec = json.dumps({"seq_len": settings.seq_len, "batch_size": settings.batch_size, "mask_rate": settings.mask_rate,
                       "model_source": settings.model_source})
    with tempfile.TemporaryDirectory(prefix="dapt_mem_") as tmp:
        procs: dict[str, subprocess.Popen[str]] = {}
        for label, copies in (("small", 1), ("large", growth)):
            path = Path(tmp) / f"corpus_{label}.jsonl"
            _write_corpus(texts, copies, path)
            if settings.inprocess:  # --smoke: plumbing only; the small pass runs first, so its peak is not the large one's
                out[label] = _memory_pass(str(path), settings)
                continue
            # Both children at once: RSS is per process, and this halves the stage's wall time.
            procs[label] = subprocess.Popen(
                [sys.executable, "-m", "experiments.throughput.pipeline", "memory", str(path), spec],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(repo_root()),
            )
        for label, proc in procs.items():
            stdout, stderr = proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"memory child ({label}) failed: {stderr[-2000:]}")
            out[label] = json.loads(stdout.strip().splitlines()[-1])
    out["peak_rss_ratio"] = out["large"]["peak_rss_mb"] / out["small"]["peak_rss_mb"]
    return out


def _memory_pass(path: str, settings: BenchSettings) -> dict[str, Any]:
    """Stream ``path`` once through the pipeline; peak RSS before and after."""
    from dapt.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(settings.model_source)
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    tokens = _stream_batches(SourceConfig(type="jsonl", path=path, text_field="text"), None, tokenizer, settings)
    return {
        "tokens": tokens,
        "seconds": time.perf_counter() - started,
        "rss_before_stream_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "corpus_mb": Path(path).stat().st_size / 2**20,
    }


def _memory_child(path: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    settings = BenchSettings(seq_len=spec["seq_len"], batch_size=spec["batch_size"], mask_rate=spec["mask_rate"],
                             model_source=spec["model_source"])
    print(json.dumps(_memory_pass(path, settings)))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(sys.argv) == 4 and sys.argv[1] == "memory":
        _memory_child(sys.argv[2], sys.argv[3])
    else:
        print("usage: python -m experiments.throughput.pipeline memory CORPUS.jsonl SPEC_JSON", file=sys.stderr)
        raise SystemExit(2)
