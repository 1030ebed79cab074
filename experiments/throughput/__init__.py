"""Throughput benchmark: dapt's training step vs the transformers ``run_mlm.py`` recipe.

``python -m experiments.throughput.bench`` (``make bench``) runs both on the same
model, data, sequence length, batch and mask rate, alternating A/B, and reports tokens/s, the loss
reached, MFU, the data pipeline's speed, streaming memory and each performance lever's effect.
Modules: ``common`` (shared setup and timing), ``hf_baseline`` (the HF Trainer recipe), ``dapt_run``
(dapt's Lightning path), ``levers`` (one-lever-at-a-time step timings), ``pipeline`` (data and
memory), ``bench`` (the entry point).
"""
