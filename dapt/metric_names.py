"""The names of the metrics a run logs while it trains: one definition for the code that logs them
(``MLMModule``, ``ThroughputMeter``), the code that reads them back (``dapt.pipeline.fit``) and
``dapt compare``'s curves, which read them from the CSV history and W&B.

The end-of-run metrics (results.json ``metrics``, the W&B run summary, sweep objectives) are
``dapt.pipeline.results.flat_metrics``' keys.
"""

from __future__ import annotations

TRAIN_LOSS = "train/loss"
TRAIN_MASK_RATE = "train/mask_rate"
TRAIN_PENALTY = "train/penalty"  # L2-SP / EWC term added to the MLM loss (remedies)
TOKENS_PER_S = "train/tokens_per_s"
MFU = "train/mfu"
CPU_THREADS = "train/cpu_threads"

# Held-out loops: Lightning's validation loop logs under "val", its test loop under "test".
DEV_LOOP, TEST_LOOP = "val", "test"


def heldout(loop: str, heldout_set: str, stat: str) -> str:
    """``<loop>/<set>/<stat>``, e.g. ``val/domain/ppl``: a held-out set's statistic in a loop."""
    return f"{loop}/{heldout_set}/{stat}"
